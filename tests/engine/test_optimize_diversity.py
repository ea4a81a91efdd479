"""Several images in one MaximizeUnit job, and Lucid's diversity objective over them: the Gram similarity
matches a direct transcription of Lucid's formula, the objective lowers it, and a several-image job's
images do not depend on its batch companions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convlens.server.engine.optimize.diversity import gram_similarity
from convlens.server.engine.optimize.maximize import MaximizeJob, MaximizeSettings, evaluate
from convlens.server.engine.optimize.objectives import ChannelMean, ClassLogit
from convlens.server.engine.optimize.runner import run_step
from tests.engine.conftest import LiteNet, seeded

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CPU = torch.device("cpu")
LAYER = "_blocks.1"


def job(objective, seed: int, steps: int = 30, **kw) -> MaximizeJob:
    settings = MaximizeSettings.resolve("lucid", steps=steps, size=32, seed=seed, pad=2, jitter=2,
                                        final_jitter=1, **kw)
    return MaximizeJob(settings, objective, mean=MEAN, std=STD, device=CPU)


def run(module, jobs) -> None:
    while not all(j.done for j in jobs):
        run_step(module, [j for j in jobs if not j.done])


def lucid_diversity(acts: torch.Tensor) -> torch.Tensor:
    """Lucid's diversity, transcribed loop by loop: -sum_{i != j} <G_i, G_j> / n, Grams unit-normed."""
    n, c = acts.shape[:2]
    flat = acts.reshape(n, c, -1)
    grams = [g / g.norm() for g in flat @ flat.transpose(1, 2)]
    return -sum(sum((grams[i] * grams[j]).sum() for j in range(n) if j != i) for i in range(n)) / n


def test_gram_similarity_is_lucids_diversity_rescaled_and_bounded():
    acts = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(0))
    n = acts.shape[0]
    torch.testing.assert_close(gram_similarity(acts), -lucid_diversity(acts) / (n - 1))
    same = acts[:1].expand(3, -1, -1, -1)
    torch.testing.assert_close(gram_similarity(same), torch.tensor(1.0))  # identical images
    # Two images whose channels never co-occur with the other's: orthogonal Grams.
    a = F.pad(torch.ones(1, 2, 3, 3), (0, 0, 0, 0, 0, 2))
    b = F.pad(torch.ones(1, 2, 3, 3), (0, 0, 0, 0, 2, 0))
    assert float(gram_similarity(torch.cat([a, b]))) == 0.0
    assert float(gram_similarity(acts[:1])) == 0.0


def test_diversity_lowers_the_gram_similarity_of_a_jobs_images():
    net = seeded(LiteNet())
    plain = job(ChannelMean(LAYER, 2), seed=3, images=4, diversity_layer=LAYER)
    diverse = job(ChannelMean(LAYER, 2), seed=3, images=4, diversity=1.0, diversity_layer=LAYER)
    start = evaluate(net, [job(ChannelMean(LAYER, 2), seed=3, images=4, diversity_layer=LAYER)])[0]
    run(net, [plain])
    run(net, [diverse])
    without, with_ = evaluate(net, [plain, diverse])
    assert len(without.images) == len(with_.images) == 4
    # The same start (same seed); without the objective the four converge to one style, with it they part.
    assert without.gram_similarity > 0.9, without.gram_similarity
    assert with_.gram_similarity < 0.6 * without.gram_similarity, (with_.gram_similarity, without.gram_similarity)
    # Each image still drives the unit above where it started.
    assert all(v > s for (v, _), (s, _) in zip(with_.images, start.images, strict=True))


def test_a_diverse_job_is_the_same_alone_and_batched():
    net = seeded(LiteNet())
    alone = job(ChannelMean(LAYER, 2), seed=5, steps=6, images=3, diversity=1.0, diversity_layer=LAYER)
    run(net, [alone])
    again = job(ChannelMean(LAYER, 2), seed=5, steps=6, images=3, diversity=1.0, diversity_layer=LAYER)
    others = [job(ClassLogit(1), seed=1, steps=6, diversity_layer=""),
              job(ChannelMean(LAYER, 0), seed=2, steps=6, images=2, diversity=5.0, diversity_layer=LAYER),
              job(ChannelMean(LAYER, 2), seed=6, steps=6, images=4, diversity_layer=LAYER)]
    batch = [others[0], again, *others[1:]]
    run(net, batch)
    for i in range(3):
        torch.testing.assert_close(again.image(i), alone.image(i), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(again.image(0), again.image(1))  # three images, not one thrice
    # Evaluation rows are the job's own too, in a mixed batch.
    lone, mixed = evaluate(net, [alone])[0], evaluate(net, batch)[1]
    assert [round(v, 4) for v, _ in lone.images] == [round(v, 4) for v, _ in mixed.images]
    assert abs(lone.gram_similarity - mixed.gram_similarity) < 1e-5


def test_one_image_job_has_one_row_and_no_similarity():
    net = seeded(LiteNet())
    j = job(ClassLogit(1), seed=0, steps=1)
    assert j.make_input().shape[0] == 1
    e = evaluate(net, [j])[0]
    assert e.images == () and e.gram_similarity == 0.0

"""The per-channel top-k index against a plain-Python recomputation; exact shard merges (ties included)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.candidates import candidates
from convlens.server.engine.topk.index import Entry, ImageId, TopKIndex, coverage_of, from_candidates, merge

C, H, W = 5, 4, 6


def _ids(n: int) -> list[ImageId]:
    # Paths out of lexical order on purpose: ids, not arrival order, break ties.
    return [ImageId(f"dir{i % 3}/img{(7 * i) % n:03d}.jpg", f"{i:08x}") for i in range(n)]


def _acts(n: int, seed: int, levels: int = 4) -> torch.Tensor:
    """Few distinct values, so ties are everywhere: across images, positions and channels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, levels, (n, C, H, W), generator=g).float()


def _build(ids: list[ImageId], acts: torch.Tensor, batch: int, k_max: int = 6, per_image: int = 3) -> TopKIndex:
    index = TopKIndex("layer", C, (H, W), k_max, per_image)
    for s in range(0, len(ids), batch):
        index.add(ids[s:s + batch], candidates(acts[s:s + batch], per_image))
    return index


def _reference_max(ids, acts, channel, k):
    rows = []
    for img, a in zip(ids, acts[:, channel].numpy(), strict=True):
        flat = a.ravel()
        pos = int(np.flatnonzero(flat == flat.max())[0])
        rows.append((-float(flat.max()), img, pos // W, pos % W))
    rows.sort()
    return [Entry(-v, img, y, x) for v, img, y, x in rows[:k]]


def _reference_mean(ids, acts, channel, k):
    rows = []
    for img, a in zip(ids, acts[:, channel].numpy(), strict=True):
        flat = a.ravel()
        pos = int(np.flatnonzero(flat == flat.max())[0])
        rows.append((-float(np.float32(flat.mean())), img, pos // W, pos % W))
    rows.sort()
    return [Entry(-v, img, y, x) for v, img, y, x in rows[:k]]


def _reference_regions(ids, acts, channel, k, per_image, cap):
    """Local 3x3 peaks (ties count as peaks), the best `per_image` of each image, then a capped greedy."""
    rows = []
    for img, a in zip(ids, acts[:, channel].numpy(), strict=True):
        peaks = []
        for y in range(H):
            for x in range(W):
                nb = a[max(0, y - 1):y + 2, max(0, x - 1):x + 2]
                if a[y, x] == nb.max():
                    peaks.append((-float(a[y, x]), y, x))
        peaks.sort()
        rows += [(v, img, y, x) for v, y, x in peaks[:per_image]]
    rows.sort()
    out, taken = [], {}
    for v, img, y, x in rows:
        if taken.get(img, 0) < cap:
            taken[img] = taken.get(img, 0) + 1
            out.append(Entry(-v, img, y, x))
    return out[:k]


def test_top_k_equals_plain_python_recomputation():
    ids, acts = _ids(23), _acts(23, 0)
    index = _build(ids, acts, batch=4)
    assert index.count == 23 and index.coverage == coverage_of(ids)
    for c in range(C):
        assert index.top(c, 6, ranking="max") == _reference_max(ids, acts, c, 6)
        assert index.top(c, 6, ranking="mean") == _reference_mean(ids, acts, c, 6)
        for cap in (2, 3):
            got = index.top(c, 6, max_per_image=cap)
            want = _reference_regions(ids, acts, c, 6, 3, cap)
            assert got == want[:len(got)] and len(got) >= 2  # an exact prefix, never a wrong entry


def test_statistics_match_numpy():
    ids, acts = _ids(11), torch.randn(11, C, H, W, generator=torch.Generator().manual_seed(3))
    index = _build(ids, acts, batch=3)
    a = acts.numpy()
    for c in range(C):
        s = index.stats(c)
        assert s.images == 11
        assert s.max == pytest.approx(float(a[:, c].max()))
        assert s.mean == pytest.approx(float(a[:, c].mean()), abs=1e-5)
        assert s.positive_fraction == pytest.approx(float((a[:, c] > 0).mean()))


@pytest.mark.parametrize("seed", range(4))
def test_any_shard_split_merges_to_the_single_pass_exactly(seed):
    n = 31
    ids, acts = _ids(n), _acts(n, seed, levels=3)
    whole = _build(ids, acts, batch=5)
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    cuts = sorted(rng.sample(range(1, n), 3))
    shards = []
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        part = order[lo:hi]
        shards.append(_build([ids[i] for i in part], acts[part], batch=rng.randint(1, 4)))
    rng.shuffle(shards)
    assert merge(shards).same_as(whole)
    assert merge([merge(shards[:2]), merge(shards[2:])]).same_as(whole)  # associative


def test_vector_layer_ranks_images_per_class():
    n, classes = 9, 4
    logits = torch.randn(n, classes, generator=torch.Generator().manual_seed(1))
    ids = _ids(n)
    index = TopKIndex("fc", classes, (1, 1), 5, 2)
    index.add(ids, candidates(logits, 2))
    for c in range(classes):
        want = sorted(range(n), key=lambda i: (-float(logits[i, c]), ids[i]))[:5]
        got = index.top(c, 5)
        assert [e.image for e in got] == [ids[i] for i in want]
        assert all((e.y, e.x) == (0, 0) for e in got)
        assert index.top(c, 5, max_per_image=2) == got  # one position: one region per image


def test_memory_stays_bounded_by_channels_times_k(tmp_path):
    k_max, per_image = 3, 2
    index = TopKIndex("layer", C, (H, W), k_max, per_image)
    for s in range(0, 400, 20):
        ids = [ImageId(f"img{i:04d}.png", "d") for i in range(s, s + 20)]
        index.add(ids, candidates(torch.randn(20, C, H, W), per_image))
    assert index.count == 400
    assert len(index.images) <= 3 * C * k_max
    file_format.save(index, tmp_path / "i.npz")
    assert file_format.load(tmp_path / "i.npz").same_as(index)


def test_nan_never_ranks_and_merge_refuses_other_shapes():
    acts = torch.full((2, C, H, W), float("nan"))
    acts[1, :, 1, 2] = 5.0
    ids = _ids(2)
    index = TopKIndex("layer", C, (H, W), 4, 2)
    index.add(ids, candidates(acts, 2))
    assert index.top(0, 4) == [Entry(5.0, ids[1], 1, 2)]  # the all-NaN image holds no entry
    with pytest.raises(ValueError, match="different shapes"):
        merge([index, TopKIndex("layer", C, (H, W), 5, 2)])
    with pytest.raises(ValueError, match="twice"):
        from_candidates(index, [ids[0], ids[0]], candidates(acts, 2))

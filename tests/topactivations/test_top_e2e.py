"""TopActivations through a real server on a folder of real photos, checked against plain forward hooks.

The model is a torchvision ResNet-18 (seeded random weights, 64-px input) served from a model folder, so
the whole file runs in seconds; the dataset is a folder of the photos scikit-image ships, written as
JPEG and PNG in sub-folders, plus one file that is not an image.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.client import Client, FailedPreconditionError, InvalidArgumentError, NotFoundError
from convlens.server.launcher import ServerProcess
from convlens.server.models.preprocess import prepare

from .conftest import PHOTOS, PRE

pytestmark = pytest.mark.slow


def start(setup: dict[str, object], *extra: str) -> ServerProcess:
    root = setup["root"]
    args = ["--device", "cpu", "--no-embedded", "--model-repo", str(Path(root) / "repo"),  # type: ignore[arg-type]
            "--dataset", f"photos={setup['photos']}", "--index-dir", str(setup["index"]), *extra]
    return ServerProcess(args, log_path=Path(root) / f"server-{time.monotonic_ns()}.log")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(setup: dict[str, object]) -> Iterator[ServerProcess]:
    with start(setup) as srv:
        yield srv


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


def reference(setup: dict[str, object], layer: str, channel: int, ranking: str = "max"
              ) -> list[tuple[str, float, int, int]]:
    """Independent: one image at a time, a plain forward hook, numpy argmax, sorted by (-score, path)."""
    model: torch.nn.Module = setup["model"]  # type: ignore[assignment]
    module = dict(model.named_modules())[layer]
    rows = []
    for rel in setup["paths"]:  # type: ignore[union-attr]
        with Image.open(Path(setup["photos"]) / rel) as img:  # type: ignore[arg-type]
            pixels = np.asarray(img.convert("RGB"))
        x, _ = prepare(pixels, PRE)
        out: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, o, out=out: out.append(o.detach()))
        try:
            with torch.no_grad():
                model(x[None])
        finally:
            handle.remove()
        a = out[0][0, channel].numpy()
        pos = int(np.argmax(a))
        score = float(a.max()) if ranking == "max" else float(a.mean())
        rows.append((rel, score, pos // a.shape[1], pos % a.shape[1]))
    return sorted(rows, key=lambda r: (-r[1], r[0]))


@pytest.mark.parametrize(("layer", "channel", "ranking"),
                         [("layer2", 3, "max"), ("layer2", 77, "mean"), ("layer4.1.conv2", 5, "max")])
def test_top_k_equals_plain_forward_hooks(server: ServerProcess, setup: dict[str, object], layer: str,
                                          channel: int, ranking: str) -> None:
    with Client(server.address, timeout=300) as c:
        top = c.top_activations("resnet18", layer, channel, k=6, dataset="photos", ranking=ranking)
    want = reference(setup, layer, channel, ranking)[:6]
    assert [e.source for e in top] == [w[0] for w in want]
    np.testing.assert_allclose([e.score for e in top], [w[1] for w in want], rtol=1e-4, atol=1e-5)
    assert [(e.y, e.x) for e in top] == [(w[2], w[3]) for w in want]
    assert top.images_scanned == len(PHOTOS) and top.dataset == "photos"
    assert top.stats is not None and top.stats.images == len(PHOTOS)
    assert all(e.digest and e.image_index == -1 for e in top)
    if ranking == "max":  # the best image's spatial max is the channel's max over the dataset
        assert top.stats.max == pytest.approx(want[0][1], rel=1e-4, abs=1e-5)


def test_several_regions_per_image_are_distinct_peaks(server: ServerProcess) -> None:
    with Client(server.address, timeout=300) as c:
        one = c.top_activations("resnet18", "layer2", 3, k=8, dataset="photos")
        many = c.top_activations("resnet18", "layer2", 3, k=8, dataset="photos", max_per_image=3)
    assert (many[0].source, many[0].score, many[0].y, many[0].x) == (one[0].source, one[0].score, one[0].y, one[0].x)
    scores = [e.score for e in many]
    assert scores == sorted(scores, reverse=True) and len(many) == 8
    by_image: dict[str, list[tuple[int, int]]] = {}
    for e in many:
        by_image.setdefault(e.source, []).append((e.y, e.x))
    assert max(len(v) for v in by_image.values()) > 1 and all(len(v) <= 3 for v in by_image.values())
    for spots in by_image.values():  # distinct 3x3 peaks: no two regions of one image are neighbours
        assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 1 for i, a in enumerate(spots) for b in spots[i + 1:])


def test_box_holds_every_pixel_the_unit_depends_on(server: ServerProcess, setup: dict[str, object]) -> None:
    layer, channel = "layer2.0.conv1", 11
    with Client(server.address, timeout=300) as c:
        top = c.top_activations("resnet18", layer, channel, k=3, dataset="photos", crops=True,
                                include_images=True)
    model: torch.nn.Module = setup["model"]  # type: ignore[assignment]
    module = dict(model.named_modules())[layer]
    for e in top:
        with Image.open(Path(setup["photos"]) / e.source) as img:  # type: ignore[arg-type]
            pixels = np.asarray(img.convert("RGB"))
        x, geo = prepare(pixels, PRE)
        x = x[None].requires_grad_(True)
        out: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, o, out=out: out.append(o))
        try:
            model(x)
        finally:
            handle.remove()
        out[0][0, channel, e.y, e.x].backward()
        ys, xs = np.nonzero(x.grad[0].abs().sum(0).numpy())
        assert len(ys) > 0
        x0, y0, x1, y1 = e.box
        assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, (e.box, xs.min(), xs.max())
        # The original box covers the same pixels at the original resolution; the crop is cut from there.
        ox0, oy0, ox1, oy1 = e.original_box
        assert ox0 <= (x0 + geo.crop_left) / geo.scale + 1 and (x1 + geo.crop_left) / geo.scale - 1 <= ox1
        assert e.crop is not None
        bw, bh = ox1 - ox0, oy1 - oy0
        s = min(1.0, 256 / max(bw, bh))  # larger crops come downscaled to 256 px, aspect kept
        assert e.crop.size == (max(1, round(bw * s)), max(1, round(bh * s)))
        assert e.crop.size[0] > (x1 - x0)  # the original is larger than the 64-px input: more detail
        assert e.image is not None and max(e.image.size) <= 640


def test_caller_images_are_ranked_without_an_index(server: ServerProcess, setup: dict[str, object]) -> None:
    photos = [np.asarray(Image.open(Path(setup["photos"]) / p).convert("RGB"))  # type: ignore[arg-type]
              for p in setup["paths"][:4]]  # type: ignore[index]
    with Client(server.address, timeout=300) as c:
        top = c.top_activations("resnet18", "layer2", 3, k=4, images=photos, crops=True)
    want = [r for r in reference(setup, "layer2", 3) if r[0] in setup["paths"][:4]]  # type: ignore[index]
    assert [setup["paths"][e.image_index] for e in top] == [w[0] for w in want]  # type: ignore[index]
    assert [e.source for e in top] == [f"images[{e.image_index}]" for e in top]
    assert top.dataset == "" and top.images_scanned == 4 and all(e.crop is not None for e in top)


def test_bad_inputs_name_the_field_and_the_valid_range(server: ServerProcess) -> None:
    with Client(server.address, timeout=300) as c:
        with pytest.raises(InvalidArgumentError) as e:
            c.top_activations("resnet18", "layer2", 128, dataset="photos")
        assert e.value.field_violations[0].field == "channel" and "valid 0..127" in str(e.value)
        with pytest.raises(InvalidArgumentError) as e:
            c.top_activations("resnet18", "layer2", 0, k=65, dataset="photos")
        assert e.value.field_violations[0].field == "k" and "valid 1..64" in str(e.value)
        with pytest.raises(InvalidArgumentError) as e:
            c.top_activations("resnet18", "layer2", 0, max_per_image=9, dataset="photos")
        assert e.value.field_violations[0].field == "max_per_image" and "valid 1..4" in str(e.value)
        with pytest.raises(NotFoundError) as nf:
            c.top_activations("resnet18", "layer2", 0, dataset="imagenet")
        assert nf.value.field_violations[0].field == "dataset" and "samples, photos" in str(nf.value)
        with pytest.raises(NotFoundError) as nf:
            c.top_activations("resnet18", "layer9", 0, dataset="photos")
        assert nf.value.field_violations[0].field == "layer"


def test_concurrent_first_requests_share_one_scan(server: ServerProcess) -> None:
    layer = "layer3"
    results: list[object] = []

    def call() -> None:
        with Client(server.address, timeout=300) as c:
            results.append(c.top_activations("resnet18", layer, 1, k=3, dataset="photos"))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all([e.source for e in r] == [e.source for e in results[0]] for r in results)  # type: ignore[attr-defined]
    assert metric(server, "convlens_index_builds_total", layer=layer, outcome="ok") == 1
    assert metric(server, "convlens_index_images_scanned_total", layer=layer) == len(PHOTOS)


def test_list_datasets_counts_and_indexes(server: ServerProcess) -> None:
    with Client(server.address, timeout=300) as c:
        c.top_activations("resnet18", "layer1", 0, dataset="photos")
        datasets = {d.name: d for d in c.list_datasets()}
    assert set(datasets) == {"samples", "photos"}
    photos = datasets["photos"]
    assert (photos.image_count, photos.skipped_count) == (len(PHOTOS), 1)
    assert ("resnet18", "layer1", "ready") in {(i.model, i.layer, i.state) for i in photos.indexes}
    assert datasets["samples"].image_count >= 15


def test_index_is_reused_after_restart_and_rebuilt_when_a_file_changes(setup: dict[str, object]) -> None:
    layer = "layer4"
    with start(setup) as first, Client(first.address, timeout=300) as c:
        before = c.top_activations("resnet18", layer, 2, k=4, dataset="photos")
        assert metric(first, "convlens_index_images_scanned_total", layer=layer) == len(PHOTOS)
        # The scan went through the scheduler (batched beside other work), one task per image.
        assert metric(first, "convlens_scheduler_tasks_total", rpc="TopActivationsScan") == len(PHOTOS)
        assert metric(first, "convlens_index_build_progress", layer=layer) == 1.0
    with start(setup) as second, Client(second.address, timeout=300) as c:
        again = c.top_activations("resnet18", layer, 2, k=4, dataset="photos")
        assert [(e.source, e.score) for e in again] == [(e.source, e.score) for e in before]
        assert metric(second, "convlens_index_loads_total", layer=layer) == 1
        assert metric(second, "convlens_scheduler_tasks_total", rpc="TopActivationsScan") == 0  # no forward
    # One photo's content changes (same path): a new dataset digest, so the index is scanned again. With
    # --index-on-demand 0 the first call says how far the build is, and a later one gets the new index.
    changed = Path(setup["photos"]) / setup["paths"][0]  # type: ignore[index, operator]
    Image.fromarray(np.asarray(Image.open(changed).convert("RGB"))[::-1].copy()).save(changed, quality=92)
    with start(setup, "--index-on-demand", "0") as third, Client(third.address, timeout=300) as c:
        with pytest.raises(FailedPreconditionError) as e:
            c.top_activations("resnet18", layer, 2, k=4, dataset="photos")
        assert "convlens index build resnet18 photos layer4" in str(e.value) and "images (" in str(e.value)
        for _ in range(300):
            if metric(third, "convlens_index_builds_total", layer=layer, outcome="ok") == 1:
                break
            time.sleep(0.1)
        rebuilt = c.top_activations("resnet18", layer, 2, k=4, dataset="photos")
        assert metric(third, "convlens_index_images_scanned_total", layer=layer) == len(PHOTOS)
        assert rebuilt.stats is not None and rebuilt.stats.images == len(PHOTOS)


def test_cli_top_writes_a_contact_sheet_and_datasets_lists(server: ServerProcess, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from convlens.client._cli import main as cli

    out = tmp_path / "sheet.png"
    assert cli(["-s", server.address, "--timeout", "300", "top", "resnet18", "layer2", "3", "-k", "6",
                "--dataset", "photos", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "over 8 images of photos" in text and f"wrote {out}" in text
    sheet = Image.open(out)
    assert sheet.size == (3 * 160, 30 + 2 * (160 + 30))  # a title row, 2 rows of 3 cells
    assert np.asarray(sheet.convert("L")).std() > 20  # crops drawn, not a blank page
    assert cli(["-s", server.address, "datasets"]) == 0
    table = capsys.readouterr().out
    assert "photos" in table and "resnet18:layer2" in table


def test_selected_outputs_are_there_iff_asked_and_equal_the_full_answer(server: ServerProcess) -> None:
    with Client(server.address, timeout=300) as c:
        full = c.top_activations("resnet18", "layer2", 3, k=3, dataset="photos", crops=True, include_images=True)
        stats_only = c.top_activations("resnet18", "layer2", 3, k=3, dataset="photos", outputs=["stats"])
        crops = c.top_activations("resnet18", "layer2", 3, k=3, dataset="photos", outputs=["crops"])
        default = c.top_activations("resnet18", "layer2", 3, k=3, dataset="photos")
    assert len(full) == 3 and full.stats is not None
    assert len(stats_only) == 0 and stats_only.stats == full.stats
    assert stats_only.images_scanned == full.images_scanned and stats_only.channels == full.channels
    # Crops imply the entries; no pictures, no stats.
    assert crops.stats is None and [e.source for e in crops] == [e.source for e in full]
    assert all(e.image is None and e.crop is not None for e in crops)
    assert [np.asarray(e.crop).tolist() for e in crops] == [np.asarray(e.crop).tolist() for e in full]
    assert [(e.score, e.box) for e in default] == [(e.score, e.box) for e in full]
    assert default.stats == full.stats and all(e.crop is None and e.image is None for e in default)

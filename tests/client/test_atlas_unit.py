"""The atlas's per-unit pieces without a server: class predictions on the photo itself, one Saliency call per
photo under concurrent units, the class association label, the boxes drawn on the photos, the progress bar,
the first-layer filters' atomic write and the CLI's per-call timeout."""

from __future__ import annotations

import hashlib
import io
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from convlens.client._types import Geometry, Prediction, TopActivation
from convlens.client.atlas import _build
from convlens.client.atlas._pages import association, dominant
from convlens.client.atlas._photo import BRIGHT, DIM, display_scale, draw_region, photo_box, ring_widths
from convlens.client.atlas._unit import ClassPredictor, class_association


def label_of(image: Image.Image) -> str:
    """The fake model: a class that depends on every pixel, so a boxed copy gets another class."""
    return f"class {hashlib.sha256(image.tobytes()).hexdigest()[:12]}"


class FakeSaliency:
    """Saliency's predictions: top-1 = label_of(the image asked about); counts calls. With `gate`, the
    first call says it started and then waits for the gate (so others can ask while it is in flight)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[str] = []
        self.gate, self.started = gate, threading.Event()
        self._lock = threading.Lock()

    def saliency(self, image: Image.Image, model: str, **_: Any) -> Any:
        with self._lock:
            self.calls.append(label_of(image))
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        return SimpleNamespace(predictions=[Prediction(3, label_of(image), 2.0, 0.75)])


def photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def entry(plain: Image.Image, source: str, box: tuple[int, int, int, int]) -> TopActivation:
    """A top-list entry of one unit: the photo without a box, and (as the server draws it) a boxed copy."""
    boxed = plain.copy()
    boxed.paste((255, 214, 0), box)
    return TopActivation(-1, source, 1.0, 0, 0, box, box, None, boxed, digest=f"d-{source}", photo=plain)


def test_a_photos_class_is_predicted_on_the_photo_whichever_unit_asks() -> None:
    plain = photo(1)
    fake = FakeSaliency()
    predictor = ClassPredictor(fake, timeout=5)  # type: ignore[arg-type]
    # Two units whose top lists hold the same photo, each with its own box.
    first = predictor.predict("m", entry(plain, "a.png", (0, 0, 8, 8)))
    second = predictor.predict("m", entry(plain, "a.png", (30, 20, 50, 40)))
    assert first is not None and second is not None
    assert first.label == second.label == label_of(plain)
    assert first.label != label_of(entry(plain, "a.png", (0, 0, 8, 8)).image)  # the fake tells them apart
    assert fake.calls == [label_of(plain)] and predictor.calls == 1
    other = predictor.predict("m", entry(photo(2), "b.png", (0, 0, 8, 8)))
    assert other is not None and other.label == label_of(photo(2)) and predictor.calls == 2
    # No photo (a server without the "photos" output): no class, no call.
    bare = TopActivation(-1, "c.png", 1.0, 0, 0, (0, 0, 1, 1), (0, 0, 1, 1), None, photo(3), digest="d")
    assert predictor.predict("m", bare) is None and len(fake.calls) == 2


def test_one_saliency_call_per_photo_however_many_units_ask_at_once() -> None:
    """Units asking while the first call for their photo is in flight wait for it instead of calling."""
    gate = threading.Event()
    fake = FakeSaliency(gate)
    predictor = ClassPredictor(fake, timeout=5)  # type: ignore[arg-type]
    plain = photo(4)
    results: list[str | None] = []
    lock = threading.Lock()

    def ask(box: tuple[int, int, int, int]) -> None:
        p = predictor.predict("m", entry(plain, "a.png", box))
        with lock:
            results.append(None if p is None else p.label)

    first = threading.Thread(target=ask, args=((0, 0, 4, 4),))
    first.start()
    assert fake.started.wait(60)  # the first call is in flight, held at the gate
    others = [threading.Thread(target=ask, args=((i, i, i + 4, i + 4),)) for i in range(1, 8)]
    for t in others:
        t.start()
    gate.set()
    for t in [first, *others]:
        t.join(60)
    assert results == [label_of(plain)] * 8
    assert len(fake.calls) == 1 and predictor.calls == 1


def test_a_failed_prediction_is_raised_to_every_asker_and_asked_again_later() -> None:
    class Failing(FakeSaliency):
        def saliency(self, image: Image.Image, model: str, **_: Any) -> Any:
            self.calls.append("x")
            if len(self.calls) == 1:
                raise TimeoutError("deadline")
            return super().saliency(image, model)

    fake = Failing()
    predictor = ClassPredictor(fake, timeout=5)  # type: ignore[arg-type]
    plain = photo(5)
    with pytest.raises(TimeoutError):
        predictor.predict("m", entry(plain, "a.png", (0, 0, 4, 4)))
    again = predictor.predict("m", entry(plain, "a.png", (0, 0, 4, 4)))
    assert again is not None and again.label == label_of(plain)


def p(label: str, probability: float) -> Prediction:
    return Prediction(0, label, 1.0, probability)


def test_class_association_counts_and_mean_probability() -> None:
    classes = class_association([p("cat", 0.9), p("dog", 0.4), None, p("dog", 0.6), p("cat", 0.5), p("fox", 0.2)])
    assert classes == [{"label": "cat", "count": 2, "probability": pytest.approx(0.7)},
                       {"label": "dog", "count": 2, "probability": pytest.approx(0.5)},
                       {"label": "fox", "count": 1, "probability": pytest.approx(0.2)}]


@pytest.mark.parametrize(("labels", "expected", "short"), [
    # One class is the top-1 of at least half the photos (and two or more): an association, with its share.
    (["cat", "cat", "cat", "dog", "fox", "cup"], "cat (3/6) · mean p 0.50", "cat (3/6)"),
    (["cat", "cat", "dog"], "cat (2/3) · mean p 0.50", "cat (2/3)"),
    # Every photo a different class (the 19-photo samples set): no association, but which classes they are.
    (["cup", "cat", "dog", "fox", "owl", "car"], "no dominant class · top photos are cup, cat, dog +3 more",
     "mixed: cup, cat +4 more"),
    # A tie, or a plurality short of half: not called an association either.
    (["cat", "cat", "dog", "dog"], "no dominant class · top photos are cat, dog", "mixed: cat, dog"),
    (["cat", "cat", "dog", "fox", "owl", "cup"], "no dominant class · top photos are cat, dog, fox +2 more",
     "mixed: cat, dog +3 more"),
    (["cat"], "no dominant class · top photos are cat", "mixed: cat"),
])
def test_association_label_names_a_class_only_when_it_dominates(labels: list[str], expected: str,
                                                                  short: str) -> None:
    e = {"classes": class_association([p(label, 0.5) for label in labels]), "top": [{}] * len(labels)}
    assert association(e) == expected and association(e, short=True) == short
    assert (dominant(e) is not None) == (not expected.startswith("no dominant"))
    assert association({"classes": [], "top": []}) == ""


def test_the_box_is_mapped_onto_the_downscaled_photo_and_ringed_at_display_size() -> None:
    # A 1280x960 original sent as a 640x480 photo: the original box (200, 100)-(238, 138) is halved.
    geo = Geometry(960, 1280, 256, 341, 16, 58, 224, 224, 0.2)
    assert photo_box((640, 480), (200, 100, 238, 138), geo) == (100, 50, 119, 69)
    assert photo_box((640, 480), (0, 0, 1280, 960), geo) == (0, 0, 640, 480)
    assert photo_box((64, 48), (10, 10, 20, 20), None) == (10, 10, 20, 20)  # no geometry: already in photo px
    # Shown at most 300x220: a 640x480 photo at 0.458 -> the 3-px ring is 7 image px, the 1-px edge 3.
    assert display_scale((640, 480)) == pytest.approx(220 / 480)
    assert ring_widths((640, 480)) == (7, 3) and ring_widths((100, 80)) == (3, 1)

    plain = Image.new("RGB", (640, 480), (200, 100, 50))
    box = (100, 50, 119, 69)
    shown = np.asarray(draw_region(plain, box))
    assert (shown[50:69, 100:119] == (200, 100, 50)).all()  # the region itself untouched
    assert tuple(shown[300, 400]) == (int(200 * DIM), int(100 * DIM), int(50 * DIM))  # the rest dimmed
    ring, edge = ring_widths((640, 480))
    assert tuple(shown[60, 100 - 1]) == BRIGHT and tuple(shown[60, 100 - ring]) == BRIGHT  # left ring
    assert tuple(shown[69 + ring - 1, 110]) == BRIGHT  # below
    assert tuple(shown[60, 100 - ring - 1]) == (0, 0, 0) and tuple(shown[60, 100 - ring - edge]) == (0, 0, 0)
    assert tuple(shown[60, 100 - ring - edge - 1]) == tuple(shown[300, 400])  # then the dimmed photo
    # A box touching the photo's edge keeps its ring visible along the inside of that edge.
    whole = np.asarray(draw_region(plain, (0, 0, 640, 480)))
    assert tuple(whole[240, 0]) == BRIGHT and tuple(whole[240, 320]) == (200, 100, 50)


def test_progress_bar_draws_done_total_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(_build, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    out = io.StringIO()
    bar = _build.ProgressBar(out, total=10, done=3, width=10)  # 3 found finished by an earlier build
    assert out.getvalue() == "\r[###-------]    3/10 units  0 s   "
    clock[0] = 110.0
    bar.advance()  # one unit in 10 s, 6 left: ~60 s
    assert out.getvalue().rsplit("\r", 1)[1] == "[####------]    4/10 units  10 s, ~60 s left   "
    for _ in range(6):
        bar.advance()
    assert out.getvalue().rsplit("\r", 1)[1] == "[##########]   10/10 units  10 s   "  # done: no estimate
    bar.finish()
    assert out.getvalue().endswith("\n")
    _build.ProgressBar(None, total=3, done=0).advance()  # --quiet: draws nothing, and does not fail


class FakeFilters:
    def __init__(self) -> None:
        self.calls = 0

    def get_filters(self, model: str, layer: str, **_: Any) -> Any:
        self.calls += 1
        return SimpleNamespace(grid=photo(7, (40, 20)))


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


def test_filters_png_is_written_whole_and_a_torn_one_is_rewritten(tmp_path: Path) -> None:
    from convlens.client._types import LayerInfo, ModelDetails, ModelInfo

    info = ModelInfo("m", "embedded", (32, 32), 5, 32, (0.5,) * 3, (0.5,) * 3, True, 1, "")
    details = ModelDetails(info, [LayerInfo("conv", "Conv2d", (4, 8, 8), 1, None, True)], [])
    fake = FakeFilters()
    path = tmp_path / "m" / "filters.png"
    assert _build._filters(fake, details, tmp_path, 5) == "filters.png"  # type: ignore[arg-type]
    assert fake.calls == 1 and size_of(path) == (40, 20)
    assert sorted(p.name for p in path.parent.iterdir()) == ["filters.png"]  # no temporary file left
    assert _build._filters(fake, details, tmp_path, 5) == "filters.png"  # type: ignore[arg-type]
    assert fake.calls == 1  # a whole one is kept
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])  # torn, as an interrupted plain write leaves it
    assert _build._filters(fake, details, tmp_path, 5) == "filters.png"  # type: ignore[arg-type]
    assert fake.calls == 2 and path.read_bytes() == whole


@pytest.mark.parametrize(("argv", "expected"), [([], 900.0), (["--timeout", "45"], 45.0),
                                                (["--timeout", "2000"], 2000.0)])
def test_cli_atlas_takes_the_users_timeout_else_a_long_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          argv: list[str], expected: float) -> None:
    import convlens.client.atlas as atlas
    from convlens.client._cli import main

    seen: list[Any] = []

    def fake_build(client: Any, out: Any, options: Any, **_: Any) -> Any:
        seen.append(options)
        return _build.BuildReport(Path(out), 0, 0, 0, 0.0, 0)

    monkeypatch.setattr(atlas, "build_atlas", fake_build)
    assert main(["-s", "localhost:1", *argv, "atlas", "m", "-o", str(tmp_path), "--quiet"]) == 0
    assert [o.timeout for o in seen] == [expected]

"""The atlas's planning and page pieces, without a server: channel ranges, layer choice, depth matching,
class association, the manifest's atomic resume, and pages that link only what exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convlens.client._types import LayerInfo, ModelDetails, ModelInfo, Prediction
from convlens.client.atlas import AtlasOptions, _plan, parse_channels
from convlens.client.atlas._manifest import NAME, Manifest
from convlens.client.atlas._pages import association, search_script
from convlens.client.atlas._plan import blocks, choose_layers, depth, match_depths, plan
from convlens.client.atlas._unit import class_association


def details(names_shapes: list[tuple[str, tuple[int, ...]]]) -> ModelDetails:
    info = ModelInfo("m", "embedded", (32, 32), 5, 32, (0.5,) * 3, (0.5,) * 3, True, 1, "")
    layers = [LayerInfo(n, "Conv2d" if s else "Linear", s, 1, None, False) for n, s in names_shapes]
    return ModelDetails(info, layers, [])


LITE = details([("_conv_stem", (8, 16, 16)), *[(f"_blocks.{i}", (4 + i, 8, 8)) for i in range(4)],
                ("_blocks.3._depthwise_conv", (20, 8, 8)), *[(f"_blocks.{i}", (4 + i, 8, 8)) for i in range(4, 10)],
                ("_fc", (5,))])


def test_parse_channels() -> None:
    assert parse_channels("0-3,8, 10-11,2") == (0, 1, 2, 3, 8, 10, 11)
    for bad in ("", "3-1", "a", "1-"):
        with pytest.raises(ValueError):
            parse_channels(bad)


def test_every_nth_block_keeps_the_last_and_only_outer_blocks() -> None:
    assert [b.name for b in blocks(LITE)] == [f"_blocks.{i}" for i in range(10)]
    chosen = choose_layers(LITE, AtlasOptions("m", every_nth_block=4))
    assert [layer.name for layer in chosen] == ["_blocks.0", "_blocks.4", "_blocks.8", "_blocks.9"]


def test_named_layers_are_checked() -> None:
    with pytest.raises(ValueError, match="no layer 'nope'"):
        choose_layers(LITE, AtlasOptions("m", layers=("nope",)))
    with pytest.raises(ValueError, match="no channel map"):
        choose_layers(LITE, AtlasOptions("m", layers=("_fc",)))
    # Channels beyond a layer's width are left out, not requested.
    p = plan(LITE, AtlasOptions("m", layers=("_blocks.0", "_blocks.9"), channels=(0, 4, 12)))
    assert [u.id for u in p.units] == ["m/_blocks.0/0", "m/_blocks.9/0", "m/_blocks.9/4", "m/_blocks.9/12"]


def test_depths_match_nearest() -> None:
    assert depth(LITE, "_conv_stem") == 0.0 and depth(LITE, "_fc") == 1.0
    assert match_depths([("a", 0.1), ("b", 0.9)], [("x", 0.0), ("y", 0.5), ("z", 1.0)]) == [("a", "x"), ("b", "z")]


# A torchvision ResNet's catalog (named_modules order): containers come before their children.
RESNET = details([("conv1", (4, 16, 16)), ("bn1", (4, 16, 16)), ("relu", (4, 16, 16)), ("maxpool", (4, 8, 8)),
                  ("layer1", (4, 8, 8)),
                  *[(f"layer1.{b}{leaf}", (4, 8, 8)) for b in (0, 1) for leaf in ("", ".conv1", ".bn1", ".relu",
                                                                                    ".conv2", ".bn2")],
                  ("layer2", (8, 4, 4)), ("layer2.0", (8, 4, 4)), ("layer2.0.conv1", (8, 4, 4)),
                  ("layer2.0.downsample", (8, 4, 4)), ("layer2.0.downsample.0", (8, 4, 4)),
                  ("layer2.0.downsample.1", (8, 4, 4)), ("layer2.0.unused", ()),
                  ("avgpool", (8, 1, 1)), ("fc", (5,))])


def test_depth_counts_leaf_modules_not_containers() -> None:
    """Relative depth is the position of a layer's last leaf among the leaves that ran: 4 stem leaves,
    5 per layer1 block, 3 in layer2.0 (the unused one did not run), avgpool, fc = 19 leaves, 0..18."""
    leaves = [*"conv1 bn1 relu maxpool".split(),
              *[f"layer1.{b}.{x}" for b in (0, 1) for x in "conv1 bn1 relu conv2 bn2".split()],
              "layer2.0.conv1", "layer2.0.downsample.0", "layer2.0.downsample.1", "avgpool", "fc"]
    assert _plan.leaves(RESNET) == leaves
    assert depth(RESNET, "conv1") == 0.0 and depth(RESNET, "fc") == 1.0
    assert depth(RESNET, "layer1.0") == 8 / 18  # its last leaf, layer1.0.bn2, is the 9th
    assert depth(RESNET, "layer1") == depth(RESNET, "layer1.1") == 13 / 18
    assert depth(RESNET, "layer2.0") == 16 / 18 and depth(RESNET, "layer1.0.relu") == 6 / 18
    # (Counting catalog entries, containers included, put layer1.0 at 5/25: before any of its own leaves.)
    with pytest.raises(ValueError, match="did not run"):
        depth(RESNET, "layer2.0.unused")
    with pytest.raises(ValueError, match="no layer"):
        depth(RESNET, "layer9")


def test_class_association_counts_then_rank() -> None:
    def top1(label: str | None) -> Prediction | None:
        return None if label is None else Prediction(0, label, 1.0, 0.5)

    assert class_association([top1(x) for x in ["cat", "dog", None, "dog", "cat", "fox"]]) == [
        {"label": "cat", "count": 2, "probability": 0.5}, {"label": "dog", "count": 2, "probability": 0.5},
        {"label": "fox", "count": 1, "probability": 0.5}]
    entry = {"classes": class_association([top1(x) for x in ["cat", "dog", "cat"]]), "top": [{}, {}, {}]}
    assert association(entry, short=True) == "cat (2/3)"


def test_manifest_resumes_only_with_the_same_signature(tmp_path: Path) -> None:
    sig = AtlasOptions("m").signature()
    first = Manifest(tmp_path, sig)
    first.record("m/l/0", {"channel": 0})
    assert not list(tmp_path.glob(".manifest-*"))  # the temporary file was renamed over the manifest
    assert Manifest(tmp_path, sig).done("m/l/0") and Manifest(tmp_path, sig).reused == 1
    other = Manifest(tmp_path, AtlasOptions("m", steps=7).signature())
    assert not other.done("m/l/0")  # other settings: the old units do not count
    assert json.loads((tmp_path / NAME).read_text())["units"] == {"m/l/0": {"channel": 0}}


def test_search_data_is_a_script_with_urls() -> None:
    cat = {"label": "cat", "count": 2, "probability": 0.5}
    text = search_script([{"model": "m", "layer": "_blocks.1", "channel": 3, "classes": [cat], "top": [{}] * 3},
                          {"model": "m", "layer": "_blocks.2", "channel": 0, "top": [{}] * 3,
                           "classes": [{**cat, "count": 1}, {**cat, "label": "dog", "count": 1}]}])
    assert text.startswith("window.CONVLENS_ATLAS = ")
    data = json.loads(text.split("= ", 1)[1].rstrip(";\n"))
    assert data == [{"model": "m", "layer": "_blocks.1", "channel": 3, "url": "m/_blocks.1/3.html",
                     "classes": ["cat"], "association": "cat"},
                    {"model": "m", "layer": "_blocks.2", "channel": 0, "url": "m/_blocks.2/0.html",
                     "classes": ["cat", "dog"], "association": None}]


def fake_entry(model: str, layer: str, c: int) -> dict[str, object]:
    return {"model": model, "layer": layer, "channel": c, "dead": c == 1,
            "fv": {"file": f"{c}-fv.png", "objective": 1.0, "predictions": ["a"]},
            "diverse": {"files": [f"{c}-div0.png", f"{c}-div1.png"], "objectives": [1.0, 2.0],
                        "gram_similarity": 0.2, "weight": 20.0},
            "top": [{"source": "s.png", "score": 3.0, "y": 0, "x": 0, "box": [0, 0, 1, 1],
                     "crop": f"{c}-top0.png", "photo": f"{c}-photo0.jpg", "label": "cat", "probability": 0.5}],
            "dataset": "samples", "stats": {"images": 1, "mean": 0.1, "max": 2.0, "positive_fraction": 0.5},
            "classes": [{"label": "cat", "count": 1, "probability": 0.5}]}


def test_every_link_and_image_of_a_written_site_resolves(tmp_path: Path) -> None:
    """write_site over two models with --compare: each relative href/src of each page names a file."""
    import re

    from convlens.client.atlas._build import write_site

    other = details([("conv1", (4, 8, 8)), ("layer1.0", (4, 8, 8)), ("layer2.0", (4, 4, 4)), ("fc", (5,))])
    other = ModelDetails(ModelInfo("r", "torchvision", (32, 32), 5, 32, (0.5,) * 3, (0.5,) * 3, True, 1, ""),
                         other.layers, [])
    options = AtlasOptions("m", layers=("_blocks.1", "_blocks.8"), channels=(0, 1, 2))
    plans = [plan(LITE, options), plan(other, options, layers=["layer1.0", "layer2.0"])]
    done = {}
    for p in plans:
        for u in p.units:
            if u.channel == 2 and u.layer == "_blocks.8":
                continue  # an unfinished unit: not shown, not linked
            done[u.id] = fake_entry(u.model, u.layer, u.channel)
            folder = tmp_path / u.image_dir()
            folder.mkdir(parents=True, exist_ok=True)
            for name in ("fv.png", "div0.png", "div1.png", "top0.png", "photo0.jpg"):
                (folder / f"{u.channel}-{name}").write_bytes(b"x")
    rows = [("_blocks.1", 0.2, "layer1.0", 0.3), ("_blocks.8", 0.8, "layer2.0", 0.6)]
    write_site(tmp_path, plans, done, rows, {"m": None, "r": None})
    pages = sorted(tmp_path.rglob("*.html"))
    assert (tmp_path / "compare.html") in pages and (tmp_path / "m" / "_blocks.8" / "1.html") in pages
    assert not (tmp_path / "m" / "_blocks.8" / "2.html").exists()
    checked = 0
    for page in pages:
        for ref in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            assert (page.parent / ref).resolve().is_file(), f"{page.relative_to(tmp_path)} -> {ref}"
            checked += 1
    assert checked > 100
    layer_page = (tmp_path / "m" / "_blocks.1" / "index.html").read_text()
    assert layer_page.count('class="cell dead"') == 1  # channel 1 is marked dead

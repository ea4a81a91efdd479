"""`convlens` subcommands against the fake server."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convlens.client._cli import main
from convlens.v1 import convlens_pb2 as pb

from .fake_server import MODEL, WEIGHTS, FakeServer


def test_models(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-s", server.target, "--token", "abc", "models"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["NAME", "FORMAT", "INPUT"]
    assert out[1].split()[:4] == [MODEL, "embedded", "224x224", "1000"]
    assert server.rec.metadata[-1]["authorization"] == "Bearer abc"


def test_server_from_environment(server: FakeServer, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVLENS_SERVER", server.target)
    assert main(["models"]) == 0
    assert MODEL in capsys.readouterr().out


def test_layers(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--server", server.target, "layers", MODEL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "OUTPUT", "PARAMS", "RF", "JUMP", "FILTERS"]
    assert lines[1].split() == ["_conv_stem", "Conv2d", "32x112x112", "864", "3x3", "2x2", "yes"]
    assert lines[2].split() == ["_fc", "Linear", "1000", "1,281,000", "-", "-"]


def test_filters(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid, npy = tmp_path / "grid.png", tmp_path / "w.npy"
    assert main(["-s", server.target, "filters", MODEL, "_conv_stem", "-o", str(grid), "--npy", str(npy),
                 "--scaling", "symmetric"]) == 0
    out = capsys.readouterr().out
    assert "weights [4, 3, 3, 3]" in out and "dead channels (2): [1, 3]" in out
    with Image.open(grid) as im:
        assert im.size == (40, 20)
    np.testing.assert_array_equal(np.load(npy), WEIGHTS)


def test_saliency(server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img, out_png, npy = tmp_path / "in.png", tmp_path / "out.png", tmp_path / "a.npy"
    Image.fromarray(np.full((10, 14, 3), 99, np.uint8)).save(img)
    assert main(["-s", server.target, "saliency", str(img), "--target", "281", "--method", "guided_backprop",
                 "-o", str(out_png), "--npy", str(npy)]) == 0
    out = capsys.readouterr().out
    assert "guided_backprop of class 281" in out and "tabby" in out and "modified activations: 42" in out
    assert "note: fake server" in out
    with Image.open(out_png) as im:
        assert im.size == (14, 10)
    assert np.load(npy).shape == (3, 10, 14)
    req = server.rec.requests[-1]
    assert req.target.class_index == 281 and req.method == 2
    # Only what the command writes or prints: no heatmap, and the overlay as an output, not render_overlay.
    assert set(req.outputs) == {pb.SALIENCY_OUTPUT_OVERLAY, pb.SALIENCY_OUTPUT_PREDICTIONS,
                                pb.SALIENCY_OUTPUT_ATTRIBUTION} and not req.render_overlay

    assert main(["-s", server.target, "saliency", str(img), "--unit", "_blocks.10:5:3:4"]) == 0
    u = server.rec.requests[-1].target.unit
    assert (u.layer, u.channel, u.y, u.x) == ("_blocks.10", 5, 3, 4)
    assert "unit _blocks.10:5 at y=3 x=4" in capsys.readouterr().out


def test_server_errors_exit_1_with_violations(server: FakeServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "in.png"
    Image.new("RGB", (4, 4)).save(img)
    assert main(["-s", server.target, "saliency", str(img), "--model", "bad"]) == 1
    err = capsys.readouterr().err
    assert "error: INVALID_ARGUMENT: bad request" in err and "target.unit.layer: no layer 'nope'" in err
    assert main(["-s", server.target, "layers", "nope"]) == 1
    assert "error: NOT_FOUND" in capsys.readouterr().err
    assert main(["-s", server.target, "saliency", str(tmp_path / "missing.png")]) == 2
    assert main(["-s", server.target, "saliency", str(img), "--unit", "x:y"]) == 2


def test_serve_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("convlens.server.app")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "convlens.server.app", fake)
    assert main(["-s", "x:1", "serve", "--port", "50052", "--help"]) == 0
    assert seen == [["--port", "50052", "--help"]]


def test_serve_without_server_package(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "convlens.server.app", None)  # makes the import fail
    assert main(["serve"]) == 2
    assert "pip install 'convlens[server]'" in capsys.readouterr().err

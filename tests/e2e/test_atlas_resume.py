"""`convlens atlas` against a real server: a build killed midway and restarted recomputes nothing that was
finished, counted by the server's own metrics (MaximizeUnit calls answered OK)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convlens.client import Client
from convlens.client.atlas import MANIFEST_NAME, AtlasOptions, build_atlas
from convlens.server.launcher import ServerProcess
from tests.e2e.test_maximize_e2e import metric

pytestmark = pytest.mark.slow
MODEL = "resnet18"  # the e2e repository's small torchvision net: 10 classes at 64 px, random weights
LAYERS = ("layer1.0", "layer2.0")
CHANNELS = (0, 1, 2)


def maximize_ok(server: ServerProcess) -> float:
    return metric(server, "grpc_server_handled_total", grpc_method="MaximizeUnit", grpc_code="OK")


def finished(out: Path) -> set[str]:
    path = out / MANIFEST_NAME
    return set(json.loads(path.read_text())["units"]) if path.exists() else set()


def test_killed_build_resumes_without_recomputing_finished_units(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "atlas"
    argv = [sys.executable, "-m", "convlens.client._cli", "--server", server.address, "atlas", MODEL, "-o",
            str(out), "--layers", ",".join(LAYERS), "--channels", "0-2", "--steps", "10", "--size", "32",
            "--jobs", "2", "--top", "3", "--diverse", "2", "--quiet"]
    log = tmp_path / "atlas.stderr"
    with log.open("wb") as stderr:  # a file, not a pipe: a killed child leaves no unclosed reader behind
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while len(finished(out)) < 2 and proc.poll() is None:  # observable state, not a timer
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to tidy up: only the manifest's atomic writes help
    finally:
        proc.wait(timeout=60)
    done_before = finished(out)
    assert proc.returncode == -signal.SIGKILL, log.read_text(errors="replace")
    assert 2 <= len(done_before) < len(LAYERS) * len(CHANNELS), "kill it midway (make the steps longer)"
    kept = {unit: (out / MODEL / unit.split("/")[1] / "img" / f"{unit.split('/')[2]}-fv.png").stat().st_mtime_ns
            for unit in done_before}

    while metric(server, "convlens_active_jobs", rpc="MaximizeUnit") > 0:  # the killed build's calls end
        time.sleep(0.05)
    before = maximize_ok(server)
    options = AtlasOptions(MODEL, layers=LAYERS, channels=CHANNELS, steps=10, size=32, jobs=2, top_k=3,
                           diverse_images=2)
    with Client(server.address, timeout=120) as client:
        report = build_atlas(client, out, options, progress=None)
    after = maximize_ok(server)

    remaining = len(LAYERS) * len(CHANNELS) - len(done_before)
    assert report.reused == len(done_before) and report.computed == remaining
    assert after - before == 2 * remaining  # two MaximizeUnit calls (default + diverse set) per unit left
    assert finished(out) == {f"{MODEL}/{layer}/{c}" for layer in LAYERS for c in CHANNELS}
    for unit, mtime in kept.items():  # the finished units' images were not rewritten
        assert (out / MODEL / unit.split("/")[1] / "img" / f"{unit.split('/')[2]}-fv.png").stat().st_mtime_ns == mtime
    for layer in LAYERS:
        for c in CHANNELS:
            assert (out / MODEL / layer / f"{c}.html").exists()

    # A third build finds everything done: no optimisation at all.
    with Client(server.address, timeout=120) as client:
        again = build_atlas(client, out, options, progress=None)
    assert again.computed == 0 and maximize_ok(server) == after

"""Model control in a real `convlens serve` process: --model-control poll follows the folders, admin tokens
guard LoadModel / UnloadModel, each control call leaves an audit line, and convlens_model_loaded follows."""

from __future__ import annotations

import shutil
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from convlens.client import Client, FailedPreconditionError, NotFoundError, PermissionDeniedError
from convlens.client._cli import main as cli
from convlens.server.launcher import ServerProcess
from tests.models.tiny_folders import copy_in, image, logit, variant_of, write_folder

T = TypeVar("T")
PIXELS = image(1)


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 120.0) -> T:
    """Ask `probe` until it answers (the server's own observable state); the timeout only bounds a failure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = probe()
        if found is not None and found is not False:
            return found
        time.sleep(0.05)
    raise AssertionError(f"never saw: {what}")


def gauge(url: str, model: str) -> float | None:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    key = f'convlens_model_loaded{{format="torchscript",model="{model}"}} '
    values = [float(line[len(key):]) for line in text.splitlines() if line.startswith(key)]
    return values[0] if values else None


def state(c: Client, name: str) -> str | None:
    return next((e.state for e in c.repository_index() if e.name == name), None)


def test_poll_mode_admin_tokens_audit_and_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "repo"
    write_folder(root / "alpha", 1)
    tokens = tmp_path / "tokens"
    tokens.write_text("ops:s3cret-ops:admin\nviewer:s3cret-viewer\n")
    log = tmp_path / "server.log"
    args = ["--device", "cpu", "--no-embedded", "--model-repo", str(root), "--model-control", "poll",
            "--repository-poll-s", "0.1", "--auth-tokens", str(tokens)]
    with (ServerProcess(args, log_path=log) as srv,
          Client(srv.address, token="s3cret-viewer", timeout=60) as viewer,
          Client(srv.address, token="s3cret-ops", timeout=60) as ops):
        assert state(viewer, "alpha") == "READY"

        # A folder copied into the running server's repository is loaded by the poll and served.
        write_folder(tmp_path / "beta-src", 2)
        copy_in(tmp_path / "beta-src", root / "beta")
        eventually(lambda: state(viewer, "beta") == "READY", "beta READY after the poll")
        s = viewer.saliency(PIXELS, "beta", target=0, overlay=False)
        assert variant_of([p.label for p in s.predictions]) == 2
        assert s.target_value == pytest.approx(logit(2, PIXELS), abs=1e-4)
        assert gauge(srv.metrics_url, "beta") == 1

        # A broken folder is listed UNAVAILABLE with its reason; the others serve on.
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "model.toml").write_text('format = "torchscript"\nfile = "nope.pt"\n')
        copy_in(tmp_path / "broken", root / "alpha2")
        entry = eventually(lambda: next((e for e in viewer.repository_index()
                                         if e.name == "alpha2" and "nope.pt" in e.reason), None), "alpha2's reason")
        assert entry.state == "UNAVAILABLE" and "'nope.pt' not found" in entry.reason

        # Only admin tokens change what is served; anyone with a token may list.
        with pytest.raises(PermissionDeniedError) as err:
            viewer.load_model("beta")
        assert "admin" in err.value.message and err.value.reason == "ADMIN_TOKEN_REQUIRED"
        assert [e.state for e in ops.load_model("beta")] == ["READY"]  # poll mode: read the folder now
        with pytest.raises(FailedPreconditionError) as err:
            ops.unload_model("beta")
        assert "poll mode" in err.value.message and err.value.reason == "POLL_MODE"

        # The CLI lists the repository, loads (poll mode: reads the folder now) and is refused alike.
        assert cli(["-s", srv.address, "--token", "s3cret-viewer", "repository", "list"]) == 0
        out = capsys.readouterr().out
        assert "beta" in out and "READY" in out and "alpha2" in out and "UNAVAILABLE" in out
        assert cli(["-s", srv.address, "--token", "s3cret-ops", "repository", "load", "beta"]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["beta", "1", "READY"]
        assert cli(["-s", srv.address, "--token", "s3cret-viewer", "repository", "load", "beta"]) == 1
        assert "error: PERMISSION_DENIED" in capsys.readouterr().err
        assert cli(["-s", srv.address, "--token", "s3cret-ops", "repository", "unload", "beta"]) == 1
        assert "error: FAILED_PRECONDITION" in capsys.readouterr().err

        # The folder removed: the poll unloads it; new calls answer NOT_FOUND; the gauge drops to 0.
        shutil.rmtree(root / "beta")
        eventually(lambda: "beta" not in {m.name for m in viewer.list_models()}, "beta unloaded")
        with pytest.raises(NotFoundError):
            viewer.saliency(PIXELS, "beta", target=0)
        assert gauge(srv.metrics_url, "beta") == 0
        assert viewer.saliency(PIXELS, "alpha", target=0, overlay=False).target_value == pytest.approx(
            logit(1, PIXELS), abs=1e-4)
    text = log.read_text()
    assert text.count("audit LoadModel caller=viewer target=beta code=PERMISSION_DENIED") == 2  # SDK, CLI
    assert text.count("audit LoadModel caller=ops target=beta code=OK") == 2
    assert text.count("audit UnloadModel caller=ops target=beta code=FAILED_PRECONDITION") == 2
    assert "audit RepositoryIndex caller=viewer" in text

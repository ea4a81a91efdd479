"""`convlens serve` flags and CONVLENS_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from convlens.server.config import DEFAULT_CPU_SHARDS, DEFAULT_POLICIES, from_args
from convlens.server.scheduler.policy import BatchPolicy


def test_defaults() -> None:
    cfg = from_args([])
    assert (cfg.port, cfg.metrics_port, cfg.device, cfg.max_message_mb) == (50051, 9464, "auto", 64)
    assert cfg.model_repo is None and cfg.embedded and cfg.metrics
    assert cfg.policy_for("cpu") == DEFAULT_POLICIES["cpu"]
    assert cfg.policy_for("cuda:1") == DEFAULT_POLICIES["cuda"]


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CONVLENS_PORT", "6000")
    monkeypatch.setenv("CONVLENS_DEVICE", "cpu")
    monkeypatch.setenv("CONVLENS_MODEL_REPO", str(tmp_path))
    monkeypatch.setenv("CONVLENS_BATCH", "cpu=2:1,cuda:0=64:8")
    cfg = from_args(["--port", "7000", "--batch", "cpu=3:0"])
    assert cfg.port == 7000 and cfg.device == "cpu" and cfg.model_repo == tmp_path
    assert cfg.policy_for("cpu") == BatchPolicy(3, 0.0, DEFAULT_CPU_SHARDS)  # shards: the CPU default
    assert cfg.policy_for("cuda:0") == BatchPolicy(64, 0.008, 1)


def test_shards_are_the_third_field() -> None:
    assert from_args(["--batch", "cpu=8:2:3"]).policy_for("cpu") == BatchPolicy(8, 0.002, 3)


@pytest.mark.parametrize("argv", [["--batch", "cpu"], ["--batch", "cpu=0:1"], ["--batch", "cpu=a:b"],
                                  ["--batch", "cpu=4:2:0"], ["--batch", "cpu=4:2:x"],
                                  ["--max-message-mb", "0"], ["--max-queue", "0"]])
def test_bad_flags_exit_with_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        from_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err

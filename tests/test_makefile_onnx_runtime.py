"""The Makefile installs one ONNX runtime: onnxruntime-gpu where nvidia-smi answers, else onnxruntime. Both ship
the `onnxruntime` module folder, so the server extra must hold neither (a reinstall would put the CPU one back
over the GPU one's files), and a runtime left by a past install is removed before the other goes in."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def planned(tmp_path: Path, nvidia_smi_exit: int | None) -> list[str]:
    """The commands `make venv` would run for a new virtualenv (make -n), with a stand-in nvidia-smi that exits
    with `nvidia_smi_exit` first on PATH (None: no nvidia-smi at all)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = [str(bin_dir)]
    if nvidia_smi_exit is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!/bin/sh\nexit {nvidia_smi_exit}\n")
        fake.chmod(0o755)
    else:  # only the tools make needs: no directory that could hold a real nvidia-smi
        for tool in ("sh", "make"):
            found = shutil.which(tool)
            assert found is not None
            (bin_dir / tool).symlink_to(found)
    env = {**os.environ, "PATH": os.pathsep.join(path + ([os.environ["PATH"]] if nvidia_smi_exit is not None
                                                         else []))}
    venv = tmp_path / "venv"
    run = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", "venv"], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return run.stdout.replace(str(venv), "VENV").splitlines()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize(("nvidia_smi_exit", "extra", "other"), [
    (0, "gpu", "onnxruntime"), (9, "cpu", "onnxruntime-gpu"), (None, "cpu", "onnxruntime-gpu")])
def test_make_picks_the_onnx_runtime_of_the_machine(tmp_path: Path, nvidia_smi_exit: int | None, extra: str,
                                                    other: str) -> None:
    lines = planned(tmp_path, nvidia_smi_exit)
    installs = [line for line in lines if " install -q -e " in line]
    assert installs == [f"VENV/bin/pip install -q -e '.[server,{extra},dev,ray]'"]
    (swap,) = [line for line in lines if " uninstall " in line]
    assert swap == (f"if VENV/bin/pip show {other} >/dev/null 2>&1; then VENV/bin/pip uninstall -q -y onnxruntime "
                    "onnxruntime-gpu; fi")
    assert lines.index(swap) < lines.index(installs[0])  # the other runtime goes before the chosen one comes


def test_the_extras_hold_one_runtime_each_and_the_server_none() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def runtimes(extra: str) -> list[str]:
        return [r.split(">")[0].split("=")[0].strip() for r in extras[extra] if r.startswith("onnxruntime")]
    assert runtimes("cpu") == ["onnxruntime"] and runtimes("gpu") == ["onnxruntime-gpu"]
    assert [e for e in extras if e not in ("cpu", "gpu") and runtimes(e)] == []

"""An index build killed with SIGKILL in the middle of writing its file (issue #15): a real `convlens index
build` process is stopped by the test-only fault CONVLENS_TEST_FAULTS=index_write_stall=1 once half of the
file is written (it says so on stderr), then killed. Afterwards no damaged index is ever loaded: the previous
index is intact and reused, the half-written temporary is ignored and removed by the next writer, and a
damaged final file (as a non-atomic writer or a disk fault would leave) is rebuilt, by the CLI and by a server.
One process is killed (the expensive part: ~10 s to start); the rest runs in this one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convlens.client._cli import main as cli
from convlens.server.datasets.registry import DatasetRegistry
from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.index import TopKIndex
from convlens.server.indexing.build import build_index, index_key
from convlens.server.indexing.manager import IndexManager
from convlens.server.indexing.sources import DatasetSource, ModelSource
from convlens.server.indexing.store import IndexKey, load_if_valid, save
from convlens.server.metrics import Metrics
from convlens.server.scheduler import Scheduler
from convlens.server.scheduler.memory import FAULTS_ENV, STALL_MARK
from tools.reliability.tiny import EAGER as MODEL
from tools.reliability.tiny import write_photos, write_repo

LAYER = "layer2"  # of a 32 px resnet18


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("killed")
    return {"repo": write_repo(root / "repo", formats=("torchvision",)), "photos": write_photos(root / "photos", 10)}


def sources(tiny: dict[str, Path]) -> tuple[ModelSource, DatasetSource]:
    return ModelSource(MODEL, tiny["repo"]), DatasetSource("tiny", (("tiny", tiny["photos"]),))


def args(tiny: dict[str, Path], index_dir: Path, *extra: str) -> list[str]:
    return ["index", "build", MODEL, "tiny", LAYER, "--model-repo", str(tiny["repo"]),
            "--dataset", f"tiny={tiny['photos']}", "--index-dir", str(index_dir), *extra]


def one_pass(tiny: dict[str, Path]) -> tuple[TopKIndex, IndexKey]:
    model, dataset = (s.load() for s in sources(tiny))
    return build_index(model, dataset, LAYER), index_key(model, dataset, LAYER)  # type: ignore[arg-type]


def killed_mid_write(tiny: dict[str, Path], index_dir: Path, *extra: str) -> Path:
    """Run `convlens index build` in a process of its own until half of its file is written, SIGKILL it there;
    the temporary it was writing."""
    command = [sys.executable, "-c", "from convlens.client._cli import main; raise SystemExit(main())",
               *args(tiny, index_dir, *extra)]
    env = {**os.environ, FAULTS_ENV: "index_write_stall=1"}
    seen = []
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at the mark, or at EOF if the process ended without reaching it
            seen.append(line)
            if line.startswith(STALL_MARK):
                break
        else:
            proc.wait(60)
            pytest.fail(f"the build ended (code {proc.returncode}) before writing its file: {''.join(seen)[-3000:]}")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    return Path(seen[-1][len(STALL_MARK):].strip())


async def test_a_rebuild_killed_mid_write_leaves_the_old_index_intact_and_the_next_writer_cleans_up(
        tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = sources(tiny)[0].load()
    good, key = one_pass(tiny)
    path = key.path(tmp_path)
    save(good, path)
    before = path.read_bytes()

    tmp = killed_mid_write(tiny, tmp_path, "--force")  # one real process, killed with half its file written

    assert path.read_bytes() == before  # the old index, byte for byte
    assert file_format.temporaries(path) == [tmp]  # the killed writer's half file is still there...
    assert 0 < tmp.stat().st_size < len(before)
    assert load_if_valid(tmp, key) is None  # ...could never pass for an index...
    assert sorted(p.name for p in path.parent.glob("*.npz")) == [path.name]  # ...and is listed as none
    reused = load_if_valid(path, key)
    assert reused is not None and reused.same_as(good)

    # A server (re)started on the folder answers from the intact index, without a scan.
    metrics = Metrics()
    scheduler = Scheduler(lambda name: model, [torch.device("cpu")], metrics)
    await scheduler.start()
    try:
        manager = IndexManager(DatasetRegistry.from_specs([("tiny", tiny["photos"])]), scheduler, metrics, tmp_path)
        served = await manager.get(model, manager.datasets.get("tiny"), LAYER, None)
    finally:
        await scheduler.stop(2.0)
    labels = {"model": MODEL, "dataset": "tiny", "layer": LAYER}
    assert served.same_as(good) and metrics.registry.get_sample_value("convlens_index_loads_total", labels) == 1

    assert cli(args(tiny, tmp_path)) == 0  # so does the CLI: the intact index is reused, not rebuilt
    assert "exists" in capsys.readouterr().out
    assert cli(args(tiny, tmp_path, "--force")) == 0  # the next writer builds, and removes the dead one's file
    assert "indexed" in capsys.readouterr().out
    assert file_format.temporaries(path) == [] and not tmp.exists()
    rebuilt = load_if_valid(path, key)
    assert rebuilt is not None and rebuilt.same_as(good)

    path.write_bytes(before[:1000])  # what a non-atomic writer's crash leaves: the CLI rebuilds it, not "exists"
    assert cli(args(tiny, tmp_path)) == 0
    assert "indexed" in capsys.readouterr().out
    repaired = load_if_valid(path, key)
    assert repaired is not None and repaired.same_as(good)


def test_a_temporary_being_written_by_a_live_process_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "layer.npz"
    mine = tmp_path / f"layer.npz.{file_format._writer()}.abc.tmp"  # this process: still running
    elsewhere = tmp_path / "layer.npz.otherhost-1.abc.tmp"  # another host: judged by age only
    for p in (mine, elsewhere):
        p.write_bytes(b"half")
    assert file_format.remove_stale_temporaries(path) == []
    old = os.stat(elsewhere).st_mtime - file_format.STALE_SECONDS - 1
    os.utime(elsewhere, (old, old))
    assert file_format.remove_stale_temporaries(path) == [elsewhere] and mine.exists()


async def test_a_restarted_server_rebuilds_a_damaged_index(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = sources(tiny)[0].load()
    good, key = one_pass(tiny)
    path = key.path(tmp_path)
    save(good, path)
    path.write_bytes(path.read_bytes()[:1000])  # damaged on disk
    stale = path.parent / f"{path.name}.{file_format._writer().rsplit('-', 1)[0]}-999999999.x.tmp"
    stale.write_bytes(b"half")  # a temporary whose writer (no such process) is gone
    metrics = Metrics()
    scheduler = Scheduler(lambda name: model, [torch.device("cpu")], metrics)
    await scheduler.start()
    try:
        manager = IndexManager(DatasetRegistry.from_specs([("tiny", tiny["photos"])]), scheduler, metrics, tmp_path)
        rebuilt = await manager.get(model, manager.datasets.get("tiny"), LAYER, None)
    finally:
        await scheduler.stop(2.0)
    assert rebuilt.matches(good)  # scanned again (batched on the scheduler: equal up to float rounding)
    labels = {"model": MODEL, "dataset": "tiny", "layer": LAYER}
    assert metrics.registry.get_sample_value("convlens_index_builds_total", {**labels, "outcome": "ok"}) == 1
    on_disk = load_if_valid(path, key)
    assert on_disk is not None and on_disk.same_as(rebuilt)
    assert not stale.exists()  # the server's write removed it

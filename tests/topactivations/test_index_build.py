"""Building ahead of time: `convlens index build` shards (Kubernetes style) merge to the one-pass index,
and the Ray Data pipeline on a local Ray cluster builds the same index as one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from convlens.client._cli import main as cli
from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.index import TopKIndex
from convlens.server.indexing.build import build_index, index_key
from convlens.server.indexing.cli import parse_shard
from convlens.server.indexing.sources import DatasetSource, ModelSource

from .conftest import PHOTOS

pytestmark = pytest.mark.slow
LAYER = "layer3.0.conv1"


def _args(setup: dict[str, object], index_dir: Path, *extra: str) -> list[str]:
    return ["resnet18", "photos", LAYER, "--model-repo", str(Path(setup["root"]) / "repo"),  # type: ignore[arg-type]
            "--dataset", f"photos={setup['photos']}", "--index-dir", str(index_dir), *extra]


def _sources(setup: dict[str, object]) -> tuple[ModelSource, DatasetSource]:
    return (ModelSource("resnet18", Path(setup["root"]) / "repo"),  # type: ignore[arg-type]
            DatasetSource("photos", (("photos", Path(setup["photos"])),)))  # type: ignore[arg-type]


def _one_pass(setup: dict[str, object]) -> TopKIndex:
    model, dataset = (s.load() for s in _sources(setup))
    return build_index(model, dataset, LAYER, batch_size=3)  # type: ignore[arg-type]


def test_parse_shard_reads_job_completion_index() -> None:
    assert parse_shard("2/5", {}) == (2, 5)
    assert parse_shard("5", {"JOB_COMPLETION_INDEX": "4"}) == (4, 5)
    assert parse_shard("/3", {"JOB_COMPLETION_INDEX": "0"}) == (0, 3)
    assert parse_shard(None, {}) == (0, 1)
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX"):
        parse_shard("3", {})
    with pytest.raises(ValueError, match="0 <= I < N"):
        parse_shard("3/3", {})


def test_shards_from_job_completion_index_merge_to_the_one_pass_index(
        setup: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(3):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        assert cli(["index", "build", *_args(setup, tmp_path, "--shard", "3")]) == 0
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert "indexed" in capsys.readouterr().out
    model, dataset = (s.load() for s in _sources(setup))
    key = index_key(model, dataset, LAYER)  # type: ignore[arg-type]
    assert not key.path(tmp_path).exists()
    shards = sorted(key.folder(tmp_path).glob("*.shard-*"))
    assert len(shards) == 3 and sum(file_format.load(p).count for p in shards) == len(PHOTOS)
    assert cli(["index", "merge", *_args(setup, tmp_path)]) == 0
    merged = file_format.load(key.path(tmp_path))
    assert merged.same_as(_one_pass(setup))
    assert merged.meta["skipped_count"] == "0" and merged.count == len(PHOTOS)


def test_merge_refuses_a_missing_shard(setup: dict[str, object], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["index", "build", *_args(setup, tmp_path, "--shard", "0/2")]) == 0
    assert cli(["index", "merge", *_args(setup, tmp_path)]) == 2
    assert "need every shard exactly once" in capsys.readouterr().err


def test_unknown_model_or_dataset_is_an_error(setup: dict[str, object], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(setup, tmp_path)
    assert cli(["index", "build", "nosuch", *args[1:]]) == 2
    assert "no model 'nosuch'" in capsys.readouterr().err
    assert cli(["index", "build", args[0], "nosuch", *args[2:]]) == 1
    assert "no dataset 'nosuch'" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own deprecated settings
def test_ray_build_on_a_local_cluster_equals_the_single_process_build(
        setup: dict[str, object], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the `ray` extra is part of the dev install")
    # As a user runs it: `convlens index build --ray` in a process of its own, which starts a local cluster.
    # (Started from this test process instead, late in a full run on a busy machine, the raylet twice never
    # registered: Ray forks it with a preexec_fn from a process that by then runs dozens of threads.)
    command = [sys.executable, "-c", "from convlens.client._cli import main; raise SystemExit(main())",
               "index", "build", *_args(setup, tmp_path, "--ray", "--batch-size", "3")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "indexed" in done.stdout
    model, dataset = (s.load() for s in _sources(setup))
    built = file_format.load(index_key(model, dataset, LAYER).path(tmp_path))  # type: ignore[arg-type]
    # Same entries and order; scores to float rounding (Ray's batches differ, and oneDNN computes a batch
    # of 1 slightly differently from a batch of 3).
    assert built.matches(_one_pass(setup))
    assert built.count == len(PHOTOS)

"""Versioned model folders, NAME@VERSION lookups, and what model control does without a server: modes,
embedded models, failed reloads, and the poll following the folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from convlens.server.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from convlens.server.metrics import Metrics
from convlens.server.models.repository import ModelRepository, parse_ref
from convlens.server.service.context import ServiceContext
from convlens.server.service.model_control import ModelControl
from convlens.server.transport.auth import parse_tokens, require_admin

from .tiny_folders import write_folder


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    write_folder(root / "flat", 1)
    write_folder(root / "multi" / "1", 2)
    write_folder(root / "multi" / "3", 3)
    (root / "multi" / "3" / "model.pt").write_bytes(b"")  # stays broken below unless rewritten
    write_folder(root / "multi" / "2", 4)
    (root / "multi" / "notes").mkdir()  # not a number: not a version
    (root / "odd@name").mkdir()
    (root / "nothing").mkdir()
    return root


def control(root: Path, mode: str = "explicit") -> ModelControl:
    repository = ModelRepository.load(root, include_embedded=False)
    return ModelControl(ServiceContext(repository, scheduler=None), mode=mode, metrics=Metrics())  # type: ignore[arg-type]


def test_versions_and_refs(repo: Path) -> None:
    models = ModelRepository.load(repo, include_embedded=False)
    assert sorted(models.names()) == ["flat", "multi"]
    assert models.get("flat").version == 1 and models.get("flat@1") is models.get("flat")
    assert models.get("multi").version == 2  # 3 is broken: the highest *served* version answers
    assert models.get("multi@1").labels[0] == "v2-class0"
    assert set(models.versions("multi")) == {1, 2}
    f = models.failures
    assert set(f) == {"multi@3", "odd@name", "nothing"}
    assert "'@'" in f["odd@name"] and "no model.toml" in f["nothing"] and "version folders" in f["nothing"]
    with pytest.raises(NotFound) as err:
        models.get("multi@3")
    assert "served versions: 1, 2" in err.value.message and err.value.violations[0].field == "model"
    for bad in ("multi@0", "multi@x", "@2"):
        with pytest.raises(InvalidArgument):
            parse_ref(bad)
    assert parse_ref("a@b@2") == ("a@b", 2)


def test_copies_get_new_identities(repo: Path) -> None:
    models = ModelRepository.load(repo, include_embedded=False)
    first = models.get("flat")
    read = models.read("flat")
    assert models.apply(read) == [first]  # the old copy is handed back to retire
    assert models.get("flat").copy_id != first.copy_id


async def test_modes_and_embedded(repo: Path) -> None:
    off = control(repo, "none")
    await off.start()
    with pytest.raises(FailedPrecondition, match="--model-control explicit"):
        await off.load("flat")
    assert {(s.name, s.version, s.state) for s in off.index()} >= {("flat", 1, "READY"), ("multi", 3, "UNAVAILABLE")}
    poll = control(repo, "poll")
    await poll.start()
    with pytest.raises(FailedPrecondition, match="poll mode"):
        await poll.unload("flat")
    await poll.stop()
    explicit = control(repo)
    explicit.repository.embedded.add("flat")  # as if it were embedded
    await explicit.start()
    with pytest.raises(FailedPrecondition, match="embedded"):
        await explicit.unload("flat")
    with pytest.raises(InvalidArgument):
        await explicit.load("multi@2", version=1)
    with pytest.raises(NotFound) as err:
        await explicit.load("multi", version=9)
    assert err.value.violations[0].field == "version"


async def test_failed_reload_keeps_the_served_copy(repo: Path) -> None:
    c = control(repo)
    await c.start()
    before = c.repository.get("flat")
    (repo / "flat" / "model.pt").write_bytes(b"garbage")
    with pytest.raises(FailedPrecondition, match="could not be loaded"):
        await c.load("flat")
    assert c.repository.get("flat") is before
    entry = next(s for s in c.index() if s.name == "flat")
    assert entry.state == "READY" and "the copy loaded before still serves" in entry.reason
    write_folder(repo / "multi" / "3", 5)  # fixed: the new highest version takes the unnamed calls
    states = await c.load("multi", version=3)
    assert [(s.version, s.state, s.default) for s in states] == [(1, "READY", False), (2, "READY", False),
                                                                 (3, "READY", True)]
    assert c.repository.get("multi").labels[0] == "v5-class0"


async def test_poll_follows_the_folders(repo: Path) -> None:
    c = control(repo, "poll")
    await c.start()  # (its own poll loop sleeps 5 s; the test polls by hand)
    try:
        flat, multi1 = c.repository.get("flat"), c.repository.get("multi@1")
        await c.poll_once()  # nothing changed: nothing reloaded
        assert c.repository.get("flat") is flat and c.repository.get("multi@1") is multi1
        write_folder(repo / "flat", 6)  # rewritten
        shutil.rmtree(repo / "multi" / "1")  # a version removed
        write_folder(repo / "fresh", 7)  # a new folder
        await c.poll_once()
        assert c.repository.get("flat").labels[0] == "v6-class0"
        assert set(c.repository.versions("multi")) == {2}
        assert c.repository.get("multi@2") is not None and c.repository.get("fresh").labels[0] == "v7-class0"
        shutil.rmtree(repo / "fresh")
        await c.poll_once()
        with pytest.raises(NotFound):
            c.repository.get("fresh")
        assert c.metrics.registry.get_sample_value(
            "convlens_model_loaded", {"model": "fresh", "format": "torchscript"}) == 0
    finally:
        await c.stop()


def test_admin_tokens() -> None:
    entries = parse_tokens(["ops:abc:admin", "ci:def", "plain-token", "x:tok:notadmin"], "file")
    assert [(e.name, e.admin) for e in entries] == [("ops", True), ("ci", False), ("file#3", False),
                                                   ("x", False)]
    assert entries[0].digest == parse_tokens(["ops:abc"], "f")[0].digest  # the marker is not part of the token
    require_admin("ops", True)
    with pytest.raises(PermissionDenied, match="marked admin"):
        require_admin("ci", False)


def test_model_control_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from convlens.server.config import from_args

    assert from_args([]).model_control == "none"
    with pytest.raises(SystemExit):
        from_args(["--model-control", "explicit"])  # nothing to load from
    monkeypatch.setenv("CONVLENS_MODEL_CONTROL", "poll")
    monkeypatch.setenv("CONVLENS_REPOSITORY_POLL_S", "0.5")
    cfg = from_args(["--model-repo", str(tmp_path)])
    assert (cfg.model_control, cfg.repository_poll_s) == ("poll", 0.5)
    with pytest.raises(SystemExit):
        from_args(["--model-repo", str(tmp_path), "--repository-poll-s", "0"])

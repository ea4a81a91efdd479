"""deploy/k8s/index-job.yaml: valid Kubernetes objects, and the commands they run are the real CLI's,
with shard counts that agree (checked by running them, shard by shard, as the Job would)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from convlens.server.indexing import cli as index_cli

JOB = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "index-job.yaml"
K8S_VERSION = "1.30.0"


def objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(JOB.read_text()) if d]


def test_every_object_validates_against_the_kubernetes_schemas() -> None:
    objs = objects()
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "Job", "Job"]
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {e.message} at {list(e.path)}")


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return c


def test_shards_and_merge_agree_with_the_cli() -> None:
    _, shards, merge = objects()
    spec = shards["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    build = _container(shards)
    assert build["command"] == ["convlens", "index", "build"]
    args = index_cli.parser().parse_args(build["command"][2:] + build["args"])
    n = spec["completions"]
    # Each completion index is one shard of n, read from JOB_COMPLETION_INDEX as Kubernetes sets it.
    assert [index_cli.parse_shard(args.shard, {"JOB_COMPLETION_INDEX": str(i)}) for i in range(n)] == \
        [(i, n) for i in range(n)]
    m = _container(merge)
    margs = index_cli.parser().parse_args(m["command"][2:] + m["args"])
    assert (margs.model, margs.dataset, margs.layer, margs.index_dir, margs.datasets) == \
        (args.model, args.dataset, args.layer, args.index_dir, args.datasets)
    (wait,) = merge["spec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e["value"] for e in wait["env"]}
    assert env == {"LAYER": args.layer, "SHARDS": str(n)}
    # Shards and merge share the index volume, mounted where --index-dir points.
    for job in (shards, merge):
        mounts = {v["name"]: v["mountPath"] for v in _container(job)["volumeMounts"]}
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert Path(mounts["index"]) == Path(args.index_dir) and claims["index"] == "convlens-index"

"""deploy/ checked without a cluster: Kubernetes objects against the Kubernetes schemas, the compose file and
what it references, the alert rules and dashboard queries parsed as PromQL, and every metric they use
exported by a running server."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from convlens.server.config import from_args
from convlens.server.launcher import ServerProcess
from tests.operations.conftest import scrape, serve_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"
CRD_GROUPS = ("monitoring.coreos.com/",)  # Prometheus Operator kinds: no schema in kubernetes-validate


def k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def by_kind(kind: str) -> dict[str, Any]:
    (obj,) = [o for _, o in k8s_objects() if o["kind"] == kind and o["metadata"]["name"] == "convlens"]
    return obj


def test_every_kubernetes_object_validates_against_the_schemas() -> None:
    objects = k8s_objects()
    kinds = {o["kind"] for _, o in objects}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor",
            "PrometheusRule"} <= kinds
    for name, obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            continue  # checked field by field below
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"deploy/k8s/{name}: {obj['kind']} invalid: {e.message} at {list(e.path)}")


def test_crds_have_their_required_fields() -> None:
    sm = by_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    service = by_kind("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert sm["spec"]["endpoints"] and all(e["port"] in port_names for e in sm["spec"]["endpoints"])
    rule = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert isinstance(group["name"], str) and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str)
            if "for" in r:
                assert re.fullmatch(r"\d+[smhdwy]", r["for"])
    # The operator's copy and docker-compose's plain rule file say the same thing.
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]


def _grace_arg(args: list[str]) -> float:
    for i, a in enumerate(args):
        if a.startswith("--grace="):
            return float(a.split("=", 1)[1])
        if a == "--grace":
            return float(args[i + 1])
    return 10.0  # the server's default


def test_deployment_gpu_probes_termination_and_wiring() -> None:
    dep, svc, pdb, hpa = by_kind("Deployment"), by_kind("Service"), by_kind("PodDisruptionBudget"), \
        by_kind("HorizontalPodAutoscaler")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051  # native gRPC probes, not exec
    assert pod["terminationGracePeriodSeconds"] > _grace_arg(c["args"])
    assert from_args(c["args"]).grace_seconds == _grace_arg(c["args"])  # the server accepts its arguments
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= container_ports
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "convlens"}
    (metric,) = hpa["spec"]["metrics"]
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    names = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in names


def test_compose_parses_and_references_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"convlens", "prometheus", "grafana"} <= set(services)
    build = services["convlens"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert (context / build["dockerfile"]).is_file() and (context / "pyproject.toml").is_file()
    mounts: dict[str, Path] = {}
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert host.startswith("."), f"{name}: {volume} is not a file of this repository"
            assert (DEPLOY / host).exists(), f"{name} mounts {host}, which does not exist"
            mounts[container] = DEPLOY / host
    prom = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in prom["rule_files"]:
        assert rule_file in mounts, f"prometheus reads {rule_file}, which is not mounted"
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "convlens:9464" in targets and "9464:9464" in services["convlens"]["ports"]
    assert from_args(services["convlens"]["command"]).log_format == "json"
    # Grafana: the provisioned data source is the one the dashboard uses; the provider path is mounted.
    prov = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((prov / "dashboards" / "convlens.yml").read_text())["providers"]
    assert provider["options"]["path"] in mounts
    for panel in dashboard()["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]


def test_dockerfile_cuda_base_server_extra_non_root_health_check() -> None:
    lines = [x.strip() for x in (DEPLOY / "Dockerfile").read_text().splitlines() if x.strip()
             and not x.lstrip().startswith("#")]
    base = next(x for x in lines if x.startswith("FROM "))
    assert base.startswith("FROM nvidia/cuda:") and "runtime" in base
    assert any(".[server,gpu]" in x for x in lines if x.startswith("RUN"))  # a CUDA image: onnxruntime-gpu
    user = [x for x in lines if x.startswith("USER ")][-1]
    assert user.split()[1].split(":")[0] not in ("root", "0")
    cmd = next(x for x in lines if x.startswith("CMD "))
    assert from_args(json.loads(cmd[4:])).grace_seconds > 0
    health = next(x for x in lines if x.startswith("HEALTHCHECK"))
    assert json.loads(health.split("CMD", 1)[1])[:2] == ["convlens", "health"]
    root = DEPLOY.parent
    for x in lines:
        if x.startswith("COPY "):
            for src in shlex.split(x)[1:-1]:
                assert (root / src).exists(), f"COPY {src}: missing"


# ------------------------------------------------------------------------- queries against a live server

def dashboard() -> dict[str, Any]:
    return dict(json.loads((DEPLOY / "grafana" / "dashboards" / "convlens.json").read_text()))


def queries() -> list[tuple[str, str]]:
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    out += [(f"alert {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    adapter = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    out += [("adapter", r["seriesQuery"]) for r in adapter["rules"]["custom"]]
    return out


def metric_names(expr: str) -> set[str]:
    """Every series a PromQL expression selects (Grafana's interval variables replaced first)."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exported(text: str) -> set[str]:
    """Series names a scrape can return: families and their type's suffixes."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",)}
    out = set()
    for fam in text_string_to_metric_families(text):
        out |= {fam.name + s for s in suffixes.get(fam.type, ("",))}
    return out


@pytest.fixture(scope="module")
def scraped(tiny_repo: Path) -> str:
    with ServerProcess(serve_args(tiny_repo)) as srv:
        return scrape(srv.metrics_url)


@pytest.mark.slow  # a real server process
def test_every_dashboard_alert_and_adapter_query_parses_and_uses_exported_metrics(scraped: str) -> None:
    names = exported(scraped)
    assert "grpc_server_handled_total" in names and "convlens_scheduler_queue_depth" in names
    used: set[str] = set()
    for where, expr in queries():
        series = metric_names(expr)  # raises on a PromQL syntax error
        assert series, f"{where}: selects no series"
        missing = series - names
        assert not missing, f"{where} uses {sorted(missing)}, which the server does not export"
        used |= series
    # what the issue asks the dashboard to show
    for needed in ("grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
                   "convlens_scheduler_queue_depth", "convlens_scheduler_batch_size_sum",
                   "convlens_scheduler_queue_wait_seconds_sum", "convlens_scheduler_compute_seconds_sum",
                   "convlens_active_jobs", "convlens_index_builds_total"):
        assert needed in used, needed
    # calls over HTTP (transport/http/) count in the same series with protocol="http": a panel splits them
    assert any("by (protocol" in expr for _, expr in queries()), "no query splits the RPC rate by protocol"

"""Operations flags and the SDK's channel settings, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from convlens.client._config import ChannelConfig
from convlens.server.config import from_args


def options(target: str) -> dict[str, object]:
    return dict(ChannelConfig.build(target).channel_options())


@pytest.mark.parametrize("target", ["ipv4:10.0.0.1:50051,10.0.0.2:50051", "dns:///convlens.ns.svc:50051"])
def test_multi_address_targets_balance_round_robin_over_healthy_replicas(target: str) -> None:
    opts = options(target)
    assert opts["grpc.lb_policy_name"] == "round_robin"
    config = json.loads(str(opts["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "convlens.v1.InspectionService"}


def test_single_target_keeps_pick_first_and_every_target_retries_unavailable_with_keepalive() -> None:
    opts = options("localhost:50051")
    assert "grpc.lb_policy_name" not in opts
    assert "healthCheckConfig" not in json.loads(str(opts["grpc.service_config"]))
    (method,) = json.loads(str(opts["grpc.service_config"]))["methodConfig"]
    assert method["name"] == [{"service": "convlens.v1.InspectionService"}]
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and policy["maxAttempts"] >= 3
    assert policy["initialBackoff"].endswith("s") and policy["maxBackoff"].endswith("s")
    assert opts["grpc.enable_retries"] == 1 and int(str(opts["grpc.keepalive_time_ms"])) >= 10_000
    # an explicit option wins over the defaults
    mine = dict(ChannelConfig.build("h:1", options=[("grpc.service_config", "{}")]).channel_options())
    assert mine["grpc.service_config"] == "{}"


def test_server_ops_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_AUTH_TOKENS", "ci:abc")
    cfg = from_args(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem",
                     "--auth-tokens", str(tmp_path / "t"), "--auth-exempt", "none", "--log-format", "json",
                     "--metrics-host", "127.0.0.1", "--max-connection-age", "300"])
    assert cfg.tls_cert == Path("c.pem") and cfg.tls_client_ca == Path("ca.pem")
    assert cfg.auth_tokens_file == tmp_path / "t" and cfg.auth_tokens == "ci:abc" and cfg.auth_exempt == ()
    assert cfg.log_format == "json" and cfg.metrics_host == "127.0.0.1" and cfg.max_connection_age_s == 300
    assert any("Health" in p for p in from_args([]).auth_exempt)


@pytest.mark.parametrize("argv", [["--tls-cert", "c.pem"], ["--tls-key", "k.pem"], ["--tls-client-ca", "ca.pem"],
                                  ["--log-format", "xml"], ["--max-connection-age", "-1"]])
def test_server_ops_flags_refuse_incomplete_settings(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        from_args(argv)

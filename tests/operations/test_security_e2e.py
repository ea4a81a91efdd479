"""TLS, mutual TLS and bearer tokens on a real `convlens serve` process, with certificates made by the test."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from convlens.client import TLS, Client, UnauthenticatedError, UnavailableError
from convlens.server.launcher import ServerProcess
from tests.operations.conftest import TINY, Pki, serve_args

pytestmark = pytest.mark.slow  # real server processes

TOKEN = "tok-7f3a9c1e5b2d4a6f8e0c"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convlens.client._cli", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.fixture(scope="module")
def mtls_server(tiny_repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """mTLS + tokens (file), JSON logs."""
    d = tmp_path_factory.mktemp("mtls")
    tokens = d / "tokens"
    tokens.write_text(f"batch-jobs:{TOKEN}\n")
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), pki.client_key.read_bytes(),
                                         pki.client_cert.read_bytes())
    srv = ServerProcess(serve_args(tiny_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                   "--tls-client-ca", str(pki.client_ca), "--auth-tokens", str(tokens),
                                   "--log-format", "json"),
                        log_path=d / "server.log", credentials=creds)
    with srv:
        yield srv


def client_tls(pki: Pki, *, cert: bool = True) -> TLS:
    if not cert:
        return TLS.from_files(pki.ca)
    return TLS.from_files(pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert)


def test_plain_client_against_tls_server_fails_cleanly(mtls_server: ServerProcess) -> None:
    t0 = time.monotonic()
    with Client(mtls_server.address, timeout=5) as c, pytest.raises(UnavailableError):
        c.list_models()
    assert time.monotonic() - t0 < 15  # an error, not a hang


def test_mtls_refuses_clients_without_a_trusted_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    with Client(mtls_server.address, tls=client_tls(pki, cert=False), token=TOKEN, timeout=5) as c, \
            pytest.raises(UnavailableError):
        c.list_models()
    stranger = TLS.from_files(pki.ca, private_key=pki.stranger_key, certificate_chain=pki.stranger_cert)
    with Client(mtls_server.address, tls=stranger, token=TOKEN, timeout=5) as c, pytest.raises(UnavailableError):
        c.list_models()


def test_right_token_passes_wrong_and_missing_are_unauthenticated(mtls_server: ServerProcess, pki: Pki) -> None:
    tls = client_tls(pki)
    with Client(mtls_server.address, tls=tls, token=TOKEN, timeout=30) as c:
        assert [m.name for m in c.list_models()] == [TINY]
    for token in (None, "wrong", TOKEN[:-1]):
        with Client(mtls_server.address, tls=tls, token=token, timeout=30) as c, \
                pytest.raises(UnauthenticatedError) as err:
            c.get_model(TINY)
        assert "Bearer" in err.value.message


def test_health_cli_over_mtls_needs_no_token(mtls_server: ServerProcess, pki: Pki) -> None:
    tls = ["--root-certs", str(pki.ca), "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key)]
    ok = cli("-s", mtls_server.address, *tls, "health")
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING", ok.stderr
    models = cli("-s", mtls_server.address, *tls, "--token", TOKEN, "models")
    assert models.returncode == 0 and TINY in models.stdout, models.stderr
    bad = cli("-s", mtls_server.address, "--timeout", "3", "health")  # plaintext against TLS
    assert bad.returncode == 1 and "UNAVAILABLE" in bad.stderr


def test_logs_name_the_caller_and_never_show_the_token(mtls_server: ServerProcess, pki: Pki) -> None:
    with Client(mtls_server.address, tls=client_tls(pki), token=TOKEN, timeout=30) as c:
        c.get_model(TINY)
    with Client(mtls_server.address, tls=client_tls(pki), token="bogus-" + TOKEN, timeout=30) as c, \
            pytest.raises(UnauthenticatedError):
        c.get_model(TINY)
    assert mtls_server.log_path is not None
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:  # the access line is written as the call completes
        text = mtls_server.log_path.read_text()
        if text.count('"method":"/convlens.v1.InspectionService/GetModel"') >= 2:
            break
        time.sleep(0.1)
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("logger") == "convlens.access"]
    assert any(r["code"] == "OK" and r["caller"] == "batch-jobs" and r["model"] == TINY for r in access)
    assert any(r["code"] == "UNAUTHENTICATED" for r in access)
    for secret in (TOKEN, TOKEN[:8], TOKEN[-8:]):
        assert secret not in text


def test_tls_without_client_ca_serves_any_tls_client_and_env_tokens(tiny_repo: Path, pki: Pki,
                                                                    tmp_path: Path) -> None:
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with ServerProcess(serve_args(tiny_repo, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
                                  "--metrics-host", "127.0.0.1"),
                       credentials=creds, env={"CONVLENS_AUTH_TOKENS": "ci:env-token-1"},
                       log_path=tmp_path / "log") as srv:
        with Client(srv.address, tls=TLS.from_files(pki.ca), token="env-token-1", timeout=30) as c:
            assert [m.name for m in c.list_models()] == [TINY]
        with Client(srv.address, tls=TLS.from_files(pki.ca), timeout=30) as c, pytest.raises(UnauthenticatedError):
            c.list_models()
        with Client(f"localhost:{srv.port}", tls=TLS.from_files(pki.ca), token="env-token-1", timeout=30) as c:
            assert c.health() == "SERVING"  # the certificate's DNS name checks too

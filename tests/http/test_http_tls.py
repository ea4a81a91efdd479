"""The HTTP port uses the gRPC server's certificate flags: TLS, and mutual TLS with --tls-client-ca."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from tests.operations.conftest import Pki, pki  # noqa: F401 - the session fixture, used below

from .conftest import start_front

RPC = "/convlens.v1.InspectionService/ListModels"


async def test_http_serves_tls_with_the_grpc_certificate(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    srv = await start_front(tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key)
    try:
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        async with httpx.AsyncClient(base_url=f"https://localhost:{srv.http_port}", verify=trusted) as http:
            assert (await http.post(RPC, content="{}")).status_code == 200
        async with httpx.AsyncClient(base_url=f"http://localhost:{srv.http_port}") as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.post(RPC, content="{}")
    finally:
        await srv.stop(0.0)


async def test_mutual_tls_needs_a_client_certificate(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    srv = await start_front(tmp_path, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.client_ca)
    try:
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        async with httpx.AsyncClient(base_url=f"https://localhost:{srv.http_port}", verify=with_cert) as http:
            assert (await http.post(RPC, content="{}")).status_code == 200
        for cert in (None, (pki.stranger_cert, pki.stranger_key)):
            context = ssl.create_default_context(cafile=str(pki.ca))
            if cert is not None:
                context.load_cert_chain(str(cert[0]), str(cert[1]))
            async with httpx.AsyncClient(base_url=f"https://localhost:{srv.http_port}", verify=context) as http:
                with pytest.raises(httpx.HTTPError):
                    await http.post(RPC, content="{}")
    finally:
        await srv.stop(0.0)

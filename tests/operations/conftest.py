"""Operations fixtures: a one-model repository (fast start with --no-embedded) and certificates made here."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.conftest import TinyNet

TINY = "tinyscript"


def write_tiny_repo(root: Path, size: int = 64) -> Path:
    """One TorchScript model, `size` px: starts in a second and computes Saliency in milliseconds."""
    torch.manual_seed(0)
    (root / TINY).mkdir(parents=True)
    torch.jit.script(TinyNet().eval()).save(str(root / TINY / "model.pt"))
    (root / TINY / "model.toml").write_text(
        f'format = "torchscript"\nfile = "model.pt"\n[preprocess]\nsize = {size}\nresize = {size}\n')
    return root


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repo(tmp_path_factory.mktemp("tiny-repo"))


def serve_args(repo: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--no-embedded", "--model-repo", str(repo), *extra]


def scrape(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---------------------------------------------------------------------------------------------- certificates

@dataclass(frozen=True)
class Pki:
    ca: Path             # signs the server certificate (clients trust it)
    server_cert: Path
    server_key: Path
    client_ca: Path      # signs client certificates (the server trusts it for mTLS)
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from a CA the server does not trust
    stranger_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.subject if issuer is not None else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, encipher_only=False,
                                          decipher_only=False), critical=True)
    elif server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> Path:
        (d / name).write_bytes(data)
        return d / name

    pem = serialization.Encoding.PEM
    ca_key, client_ca_key, other_ca_key = _key(), _key(), _key()
    ca = _cert("test server CA", ca_key, None, ca_key, ca=True)
    client_ca = _cert("test client CA", client_ca_key, None, client_ca_key, ca=True)
    other_ca = _cert("stranger CA", other_ca_key, None, other_ca_key, ca=True)
    server_key, client_key, stranger_key = _key(), _key(), _key()
    return Pki(
        ca=write("ca.pem", ca.public_bytes(pem)),
        server_cert=write("server.pem", _cert("localhost", server_key, ca, ca_key, ca=False, server=True)
                          .public_bytes(pem)),
        server_key=write("server-key.pem", _pem_key(server_key)),
        client_ca=write("client-ca.pem", client_ca.public_bytes(pem)),
        client_cert=write("client.pem", _cert("batch-jobs", client_key, client_ca, client_ca_key, ca=False)
                          .public_bytes(pem)),
        client_key=write("client-key.pem", _pem_key(client_key)),
        stranger_cert=write("stranger.pem", _cert("stranger", stranger_key, other_ca, other_ca_key, ca=False)
                            .public_bytes(pem)),
        stranger_key=write("stranger-key.pem", _pem_key(stranger_key)),
    )

"""Bearer tokens: who may call, read from a file (re-read when it changes) or CONVLENS_AUTH_TOKENS.

A token file holds one token per line, optionally named (`name:token`); blank lines and `#` comments are
skipped. `name:token:admin` marks a token admin: only admin tokens may call the model-control RPCs that
change what the server serves (ADMIN_METHODS; others get PERMISSION_DENIED).

A caller sends `authorization: Bearer <token>`. Tokens are compared as SHA-256 digests with
`hmac.compare_digest` against every known token, so neither the comparison nor the loop stops early on the
first differing byte or on a match. Only the token's name ever reaches a log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from convlens.server.errors import PermissionDenied

log = logging.getLogger("convlens.server.auth")

# Methods that answer without a token unless configured otherwise: probes and tooling must work before
# a caller holds a token (Kubernetes' gRPC probes cannot send one).
DEFAULT_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                  "/grpc.reflection.v1.ServerReflection/")

ADMIN_METHODS = ("/convlens.v1.ModelRepositoryService/LoadModel", "/convlens.v1.ModelRepositoryService/UnloadModel")
ADMIN_SUFFIX = ":admin"

HOW_TO = ("send the metadata 'authorization: Bearer <token>' with a token this server is configured with "
          "(SDK: Client(..., token=...); CLI: --token or CONVLENS_TOKEN)")


class Unauthenticated(Exception):
    """No token, or one the server does not know. The message says how to authenticate."""


@dataclass(frozen=True)
class _Entry:
    name: str
    digest: bytes
    admin: bool = False


def parse_tokens(lines: Iterable[str], source: str) -> list[_Entry]:
    """`name:token[:admin]` or `token` per line; an unnamed token is called `<source>#<line>`."""
    entries = []
    for i, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.partition(":")
        if not sep:
            name, token = f"{source}#{i}", line
        admin = sep and token.rstrip().endswith(ADMIN_SUFFIX)
        if admin:
            token = token.rstrip()[: -len(ADMIN_SUFFIX)]
        name, token = name.strip(), token.strip()
        if not token:
            raise ValueError(f"{source} line {i}: empty token")
        entries.append(_Entry(name, hashlib.sha256(token.encode()).digest(), bool(admin)))
    return entries


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenAuth:
    """Checks the `authorization` metadata of a call; `check(metadata)` returns the caller's token name.

    File tokens are re-read when the file's (mtime, size, inode) changes, checked at most once per
    `recheck_s`, so rotating a token is: edit the file, wait a second. A file that becomes unreadable or
    malformed keeps the last good set (logged) rather than locking everyone out.
    """

    def __init__(self, *, path: Path | None = None, env_tokens: str | None = None,
                 exempt: Iterable[str] = DEFAULT_EXEMPT, recheck_s: float = 1.0,
                 admin_methods: Iterable[str] = ADMIN_METHODS) -> None:
        self.path = path
        self.exempt = tuple(exempt)
        self.admin_methods = tuple(admin_methods)
        self.recheck_s = recheck_s
        self._env = parse_tokens((env_tokens or "").replace(",", "\n").splitlines(), "env")
        self._file: list[_Entry] = []
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._file = parse_tokens(path.read_text().splitlines(), path.name)  # errors stop start-up
            self._stamp = self._stat()
        if not self._env and not self._file:
            raise ValueError("token authentication is on but no token is configured")

    def is_exempt(self, method: str) -> bool:
        return method.startswith(self.exempt)

    def needs_admin(self, method: str) -> bool:
        return method in self.admin_methods

    def check(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The name of the presented token, or Unauthenticated."""
        return self.identify(metadata)[0]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[str, bool]:
        """(name, is admin) of the presented token, or Unauthenticated."""
        value = None
        for key, v in metadata or ():
            if key == "authorization":
                value = v.decode() if isinstance(v, bytes) else v
                break
        if value is None:
            raise Unauthenticated(f"missing bearer token: {HOW_TO}")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(f"the authorization metadata is not 'Bearer <token>': {HOW_TO}")
        presented = _digest(token.strip())
        found = None
        for entry in self._entries():  # no early exit: the time spent does not depend on which one matches
            if hmac.compare_digest(entry.digest, presented) and found is None:
                found = entry
        if found is None:
            raise Unauthenticated(f"unknown bearer token: {HOW_TO}")
        return found.name, found.admin

    def _entries(self) -> list[_Entry]:
        if self.path is not None and time.monotonic() >= self._next_check:
            self._reload()
        return self._env + self._file

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload(self) -> None:
        with self._lock:
            self._next_check = time.monotonic() + self.recheck_s
            stamp = self._stat()
            if stamp == self._stamp:
                return
            assert self.path is not None
            try:
                entries = parse_tokens(self.path.read_text().splitlines(), self.path.name)
            except (OSError, ValueError) as exc:
                log.error("token file %s not re-read (%s); keeping the %d tokens loaded before",
                          self.path, exc, len(self._file))
                self._stamp = stamp
                return
            self._file, self._stamp = entries, stamp
            log.info("token file %s re-read: %d tokens", self.path, len(entries))


def require_admin(caller: str, admin: bool) -> None:
    """PermissionDenied unless the caller's token is marked admin."""
    if not admin:
        raise PermissionDenied(f"caller {caller!r} may not change what the server serves: this call needs a "
                               "token marked admin (`name:token:admin` in the --auth-tokens file)")

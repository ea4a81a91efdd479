"""One access-log line per RPC: method, status code, milliseconds, model, peer, request id, caller.

Plain (`key=value`, grep-friendly) or JSON (one object per line, for log shippers). The caller is the
bearer token's *name*, never the token. Health checks are logged at DEBUG: probes every few seconds
would drown the lines people read.
"""

from __future__ import annotations

import json
import logging
import sys

log = logging.getLogger("convlens.access")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
# Calls that change (or list) what the server serves: each also gets an audit line (who, what, outcome).
AUDIT_PREFIX = "/convlens.v1.ModelRepositoryService/"


class AccessLog:
    def __init__(self, fmt: str = "plain", logger: logging.Logger = log) -> None:
        if fmt not in ("plain", "json"):
            raise ValueError(f"log format must be plain or json, not {fmt!r}")
        self.json = fmt == "json"
        self.logger = logger

    def enabled_for(self, method: str) -> bool:
        level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
        return self.logger.isEnabledFor(level)

    def record(self, *, method: str, code: str, ms: float, model: str, peer: str, request_id: str,
               caller: str, error: str = "", responses: int | None = None, protocol: str = "grpc") -> None:
        """`protocol` other than grpc (the HTTP front) is written as a field; gRPC lines stay as they were."""
        level = logging.DEBUG if method.startswith(HEALTH_PREFIX) else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        if self.json:
            fields: dict[str, object] = {"method": method, "code": code, "ms": round(ms, 3), "model": model,
                                         "peer": peer, "request_id": request_id, "caller": caller}
            if responses is not None:
                fields["responses"] = responses
            if protocol != "grpc":
                fields["protocol"] = protocol
            if error:
                fields["error"] = error
            line = json.dumps(fields, separators=(",", ":"))
        else:
            line = (f"{method} {code} {ms:.1f}ms model={model or '-'} peer={peer} request_id={request_id} "
                    f"caller={caller or '-'}")
            if responses is not None:
                line += f" responses={responses}"
            if protocol != "grpc":
                line += f" protocol={protocol}"
            if error:
                line += f" error={json.dumps(error)}"
        self.logger.log(level, line)


    def audit(self, *, method: str, caller: str, target: str, code: str, peer: str, request_id: str,
              error: str = "") -> None:
        """The audit line of a model-control call, beside its access line: what was asked (`target`: the model,
        NAME@VERSION for one version), by whom (the token's name; "-" when the server takes no tokens) and
        how it ended (the status code, and the error for a failure)."""
        action = method.rpartition("/")[2]
        if self.json:
            fields: dict[str, object] = {"audit": action, "caller": caller, "target": target, "code": code,
                                         "peer": peer, "request_id": request_id}
            if error:
                fields["error"] = error
            line = json.dumps(fields, separators=(",", ":"))
        else:
            line = (f"audit {action} caller={caller or '-'} target={target or '-'} code={code} peer={peer} "
                    f"request_id={request_id}")
            if error:
                line += f" error={json.dumps(error)}"
        self.logger.info(line)


def configure(fmt: str, level: str) -> None:
    """Root logging for `convlens serve`: plain text, or one JSON object per line for every logger."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # No log line of this server reports its source file, thread or process: finding them costs about a
    # third of an access line (10 us of ~30), paid on every RPC.
    logging._srcfile = None  # type: ignore[attr-defined]  # documented switch: "set to None to avoid"
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {"time": self.formatTime(record), "level": record.levelname,
                                  "logger": record.name}
        if record.name == log.name and msg.startswith("{"):
            out.update(json.loads(msg))  # access lines are already JSON: merge, don't nest a string
        else:
            out["message"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))

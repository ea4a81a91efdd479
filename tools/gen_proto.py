"""Generate (or check) the Python code for proto/convlens/v1 into client/convlens/v1.

`python tools/gen_proto.py` regenerates; `--check` fails if the committed code is stale.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "client"
PACKAGE = Path("convlens") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> None:
    # protoc finds the mypy-protobuf plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    (out_root / PACKAGE).mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in (root / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_ROOT)
        print("generated:", ", ".join(str(p) for p in generated_files(OUT_ROOT)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        expected, actual = generated_files(fresh), generated_files(OUT_ROOT)
        stale = [str(p) for p in expected if p not in actual or not filecmp.cmp(fresh / p, OUT_ROOT / p, shallow=False)]
        extra = [str(p) for p in actual if p not in expected]
    if stale or extra:
        print(f"generated code is stale: {stale + extra}; run `make proto`", file=sys.stderr)
        return 1
    print("generated code is fresh")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The public surface is pinned, typed, and importable without the server's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import convlens.client
from convlens.client import loadtest

from .fake_server import FakeServer

PUBLIC = [
    "SALIENCY_METHODS", "TLS", "AsyncClient", "ChannelStats", "Client", "ConvLensError", "DatasetInfo",
    "DeadlineExceededError",
    "DreamResult",
    "FailedPreconditionError", "FieldViolation", "Filters", "Geometry", "ImageInput", "IndexInfo", "InternalError",
    "InvalidArgumentError", "LayerInfo", "MaximizeImage", "MaximizeResult", "ModelDetails", "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError", "Prediction", "Progress", "ReceptiveField", "RequestCancelledError",
    "ResourceExhaustedError", "SaliencyResult", "StyleTransferResult", "Timeout", "TopActivation",
    "TopActivations", "UnauthenticatedError", "UnavailableError", "UnimplementedError", "UnknownError",
    "Unit",
    "__version__",
    "RepositoryModel",  # model control (issue 14)
]


def test_all_is_pinned() -> None:
    assert sorted(convlens.client.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(convlens.client, name) is not None
    # Public names come from private modules, which are not themselves part of the surface.
    assert all(not n.startswith("_") or n == "__version__" for n in convlens.client.__all__)


def test_loadtest_all_is_pinned() -> None:
    assert sorted(loadtest.__all__) == sorted([
        "RPCS", "LevelResult", "LoadTestConfig", "Sample", "format_table", "parse_metrics", "run_loadtest",
        "run_loadtest_async", "server_split", "synthetic_image", "write_csv"])


def test_py_typed_ships() -> None:
    assert (Path(convlens.client.__file__).parent / "py.typed").is_file()


BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

BLOCKED = ("torch", "torchvision", "prometheus_client", "convlens.server", "onnxruntime", "skimage")

class Block(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=60)


def test_sdk_works_without_torch(server: FakeServer) -> None:
    proc = _run(f"""
        import convlens.client
        from convlens.client import Client, AsyncClient, Unit
        from convlens.client import loadtest, _cli
        from convlens.client.atlas import AtlasOptions, build_atlas
        from convlens.client.atlas import _build, _pages, _photo, _plan, _unit
        Unit("_blocks.1", 0)
        AtlasOptions("efficientnet_lite0")
        with Client({server.target!r}) as c:
            print([m.name for m in c.list_models()])
        assert not any(m == "torch" or m.startswith(("torch.", "convlens.server", "prometheus_client"))
                       for m in sys.modules), sorted(sys.modules)
        print("ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "efficientnet_lite0" in proc.stdout and proc.stdout.strip().endswith("ok")


def test_serve_without_server_extra_says_what_to_install() -> None:
    proc = _run("""
        from convlens.client._cli import main
        sys.exit(main(["serve", "--port", "1"]))
    """)
    assert proc.returncode == 2
    assert "pip install 'convlens[server]'" in proc.stderr

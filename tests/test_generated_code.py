"""The committed generated code matches proto/ (run `make proto` after editing the contract)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_every_rpc_of_the_product_is_declared() -> None:
    from convlens.v1 import convlens_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["InspectionService"]
    assert {m.name for m in service.methods} == {
        "ListModels", "GetModel", "GetFilters", "TopActivations", "ListDatasets", "Saliency", "MaximizeUnit",
        "Dream", "StyleTransfer"}
    streaming = {m.name for m in service.methods if m.server_streaming}
    assert streaming == {"MaximizeUnit", "Dream", "StyleTransfer"}

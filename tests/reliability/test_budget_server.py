"""The per-request budget through a real server (issue #15): over-budget Saliency and optimisation requests are
refused up front with RESOURCE_EXHAUSTED, reason OVER_BUDGET and the field(s) to lower, before any job slot or
queue place is taken; requests within it compute. The budget flags are set low so small requests cross them."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from convlens.server.launcher import ServerProcess
from convlens.v1 import convlens_pb2 as pb
from convlens.v1 import convlens_pb2_grpc as pb_grpc
from tools.reliability.fuzz import server_load
from tools.reliability.tiny import EAGER
from tools.reliability.tiny import tiny_server as start_tiny_server

# 0.01 x 2^20 = 10,485 pixels: 10 Saliency rows of the 32x32 input; a 64x64 (4,096 px) MaximizeUnit, not 128x128.
FLAGS = ["--max-saliency-mpx-rows", "0.01", "--max-job-mpx", "0.01"]


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_tiny_server(tmp_path_factory.mktemp("budget"), FLAGS) as srv:
        yield srv


@pytest.fixture()
def stub(budget_server: ServerProcess) -> Iterator[pb_grpc.InspectionServiceStub]:
    with grpc.insecure_channel(budget_server.address) as channel:
        yield pb_grpc.InspectionServiceStub(channel)


def png(side: int) -> pb.Image:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, dtype=np.uint8)).save(buf, "PNG")
    return pb.Image(encoded=buf.getvalue())


def refusal(err: grpc.RpcError) -> tuple[str, list[str]]:
    """(ErrorInfo.reason, BadRequest fields) of an error answer."""
    blob = dict(err.trailing_metadata() or ())["grpc-status-details-bin"]
    reason, fields = "", []
    for detail in status_pb2.Status.FromString(blob).details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason = info.reason
        elif detail.Unpack(bad):
            fields = [v.field for v in bad.field_violations]
    return reason, fields


def saliency(steps: int) -> pb.SaliencyRequest:
    return pb.SaliencyRequest(model=EAGER, image=png(32), method=pb.SALIENCY_METHOD_INTEGRATED_GRADIENTS,
                              integrated_gradients=pb.IntegratedGradientsOptions(steps=steps),
                              outputs=[pb.SALIENCY_OUTPUT_HEATMAP])


def test_saliency_over_budget_is_refused_up_front(stub: pb_grpc.InspectionServiceStub,
                                                  budget_server: ServerProcess) -> None:
    assert stub.Saliency(saliency(8), timeout=60).heatmap.shape  # 10 rows: within
    with pytest.raises(grpc.RpcError) as info:
        stub.Saliency(saliency(64), timeout=60)  # 66 rows
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert refusal(err) == ("OVER_BUDGET", ["integrated_gradients.steps"])
    assert "66 forward/backward rows of the model's 32x32 input" in err.details()
    assert "about 10 rows" in err.details()
    assert stub.Saliency(saliency(8), timeout=60).heatmap.shape  # the server goes on


@pytest.mark.parametrize(("call", "fields"), [
    (lambda s: list(s.MaximizeUnit(pb.MaximizeUnitRequest(model=EAGER, target=pb.Target(class_index=1), size=128,
                                                          steps=2), timeout=60)), ["size", "images"]),
    (lambda s: list(s.MaximizeUnit(pb.MaximizeUnitRequest(model=EAGER, target=pb.Target(class_index=1), size=64,
                                                          images=3, steps=2), timeout=60)), ["size", "images"]),
    (lambda s: list(s.Dream(pb.DreamRequest(model=EAGER, image=png(200), max_size=128, octaves=1,
                                            steps_per_octave=1), timeout=60)), ["max_size"]),
    (lambda s: list(s.StyleTransfer(pb.StyleTransferRequest(model=EAGER, content=png(40), style=png(40), size=128,
                                                            steps=1), timeout=60)), ["size"]),
], ids=["MaximizeUnit-size", "MaximizeUnit-images", "Dream", "StyleTransfer"])
def test_optimisation_jobs_over_budget_are_refused_before_admission(
        stub: pb_grpc.InspectionServiceStub, budget_server: ServerProcess, call, fields: list[str]) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call(stub)
    err = info.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert refusal(err) == ("OVER_BUDGET", fields)
    assert "pixels per step" in err.details() and "--max-job-mpx" in err.details()
    assert server_load(budget_server.metrics_url)["jobs"] == 0


def test_a_job_within_budget_runs(stub: pb_grpc.InspectionServiceStub) -> None:
    events = list(stub.MaximizeUnit(pb.MaximizeUnitRequest(model=EAGER, target=pb.Target(class_index=1), size=64,
                                                           steps=2), timeout=120))
    assert events[-1].HasField("result")


def test_the_budget_flags_are_checked(tmp_path: Path) -> None:
    from convlens.server.config import from_args
    from convlens.server.engine.budget import Budget

    assert from_args([]).budget == Budget()
    cfg = from_args(["--max-saliency-mpx-rows", "2", "--chunk-mpx", "0.5", "--max-job-mpx", "4"])
    assert cfg.budget == Budget(saliency_pixel_rows=2 << 20, chunk_pixels=1 << 19, job_pixels=4 << 20)
    with pytest.raises(SystemExit):
        from_args(["--max-job-mpx", "0"])


def test_an_extreme_aspect_ratio_is_refused_before_it_is_upscaled(stub: pb_grpc.InspectionServiceStub) -> None:
    """1 x 60,000 pixels (180 kB) would be resized to 32 x 1,920,000 for this 32 px model (737 MB of floats;
    51 GB at Lite0's 256 px): refused, naming the field, before any of it is allocated."""
    strip = pb.Image(tensor=pb.Tensor(dtype=pb.Dtype.Value("DTYPE_UINT8"), shape=[1, 60_000, 3],
                                      data=bytes(60_000 * 3)))
    for request, field in ((pb.SaliencyRequest(model=EAGER, image=strip), "image"),
                           (pb.TopActivationsRequest(model=EAGER, layer="layer1", channel=0, images=[strip], k=1),
                            "images[0]")):
        with pytest.raises(grpc.RpcError) as info:
            getattr(stub, type(request).__name__.removesuffix("Request"))(request, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert refusal(info.value)[1] == [field] and "1920000x32" in info.value.details()

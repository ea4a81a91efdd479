"""Client against the fake server: requests arrive as encoded, responses decode into the result types."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from convlens.client import (
    SALIENCY_METHODS,
    TLS,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    Progress,
    ReceptiveField,
    Timeout,
    UnimplementedError,
    Unit,
)
from convlens.client._config import ChannelConfig
from convlens.v1 import convlens_pb2 as pb

from .fake_server import BIAS, MODEL, WEIGHTS, FakeServer

RGB = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)


@pytest.fixture
def client(server: FakeServer) -> Client:
    with Client(server.target, token="s3cret") as c:
        yield c


def test_list_and_get_model(client: Client) -> None:
    models = client.list_models()
    assert [m.name for m in models] == [MODEL, "tiny_onnx"]
    m = models[0]
    assert m.input_size == (224, 224) and m.mean == (0.5, 0.5, 0.5) and m.supports_gradients
    assert m.parameter_count == 4652008 and not models[1].supports_gradients

    d = client.get_model(MODEL)
    stem = d.layer("_conv_stem")
    assert stem.output_shape == (32, 112, 112) and stem.has_filters
    assert stem.receptive_field == ReceptiveField((3, 3), (2, 2), (0.5, 0.5))
    # rows from 0.5 + 2*y - 1, three of them (x0, y0, x1, y1); a fractional start rounds half to even
    assert stem.receptive_field.box(1, 2) == (4, 2, 7, 5)
    assert ReceptiveField((7, 5), (4, 4), (3.0, 2.0)).box(0, 1) == (4, 0, 9, 7)
    assert d.layer("_fc").receptive_field is None
    assert d.labels[:2] == ["tench", "goldfish"]
    with pytest.raises(KeyError):
        d.layer("nope")


def test_token_metadata(server: FakeServer, client: Client) -> None:
    client.list_models()
    assert server.rec.metadata[-1]["authorization"] == "Bearer s3cret"
    assert server.rec.metadata[-1]["user-agent"].startswith("convlens-python")
    with Client(server.target) as anonymous:
        anonymous.list_models()
    assert "authorization" not in server.rec.metadata[-1]


def test_get_filters(server: FakeServer, client: Client) -> None:
    f = client.get_filters(MODEL, "_conv_stem", grid=True, scaling="symmetric", max_filters=8)
    np.testing.assert_array_equal(f.weights, WEIGHTS)
    assert f.weights.dtype == np.float32
    np.testing.assert_array_equal(f.bias, BIAS)
    assert f.dead_channels == [1, 3] and f.stride == (2, 2) and f.groups == 1 and f.layer_type == "Conv2d"
    assert isinstance(f.grid, Image.Image) and f.grid.size == (40, 20)
    req = server.rec.requests[-1]
    assert req.render_grid and req.scaling == pb.FILTER_SCALING_SYMMETRIC and req.max_filters == 8
    assert client.get_filters(MODEL, "_conv_stem").grid is None  # a grid only when asked for
    assert not server.rec.requests[-1].render_grid
    with pytest.raises(ValueError, match="scaling"):
        client.get_filters(MODEL, "_conv_stem", scaling="log")


def _png_bytes(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


KINDS = ["png_path", "bmp_path", "pil", "pil_rgba", "uint8", "grey", "float", "bytes"]


@pytest.mark.parametrize("kind", KINDS)
def test_image_inputs_arrive(kind: str, tmp_path: Path, server: FakeServer, client: Client) -> None:
    expected: np.ndarray = RGB
    if kind == "png_path":
        image: object = tmp_path / "x.png"
        (tmp_path / "x.png").write_bytes(_png_bytes(RGB))
    elif kind == "bmp_path":  # not a server format: re-encoded as PNG
        Image.fromarray(RGB).save(tmp_path / "x.bmp")
        image = str(tmp_path / "x.bmp")
    elif kind == "pil":
        image = Image.fromarray(RGB)
    elif kind == "pil_rgba":
        image = Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)]))
    elif kind == "uint8":
        image = RGB
    elif kind == "grey":
        image = expected = RGB[:, :, 0].copy()
    elif kind == "float":
        image = expected = RGB.astype(np.float64) * 0.9 + 0.25
    else:
        image = _png_bytes(RGB)
    s = client.saliency(image, MODEL, target=281)  # type: ignore[arg-type]
    got = server.rec.images[-1]
    req = server.rec.requests[-1]
    if kind == "bytes":
        assert req.image.encoded == image
    if kind == "png_path":
        assert req.image.encoded == (tmp_path / "x.png").read_bytes()  # sent byte for byte
    if kind == "float":
        assert req.image.tensor.dtype == pb.DTYPE_FLOAT32
        np.testing.assert_allclose(got, expected.astype(np.float32))
    else:
        np.testing.assert_array_equal(got, expected)
    assert s.attribution.shape == (3, 20, 30)


def test_bad_image_inputs_fail_locally(server: FakeServer, client: Client) -> None:
    with pytest.raises(ValueError, match="HWC"):
        client.saliency(np.zeros((3, 20, 30), np.uint8), MODEL)
    with pytest.raises(ValueError, match="0..255"):
        client.saliency(np.full((4, 4, 3), 300.0), MODEL)
    with pytest.warns(UserWarning, match="0..255"):
        client.saliency(np.full((4, 4, 3), 0.5), MODEL)
    with pytest.raises(TypeError):
        client.saliency(12, MODEL)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        client.saliency("/no/such/file.png", MODEL)


def test_saliency_decodes_everything(server: FakeServer, client: Client) -> None:
    s = client.saliency(RGB, MODEL, method="guided_backprop")
    np.testing.assert_array_equal(s.attribution, np.arange(3 * 20 * 30, dtype=np.float32).reshape(3, 20, 30))
    assert s.heatmap.shape == (20, 30) and s.heatmap.dtype == np.float32
    assert isinstance(s.overlay, Image.Image) and s.overlay.size == (30, 20)
    assert [(p.class_index, p.label) for p in s.predictions] == [(281, "tabby"), (282, "tiger cat")]
    assert s.predictions[0].probability == pytest.approx(0.75)
    assert s.target == 281 and s.target_value == pytest.approx(12.5)  # the server's top-1, since none asked
    assert s.modified_activations == 42 and s.notes == ["fake server"]
    g = s.geometry
    assert g is not None and (g.original_height, g.original_width) == (20, 30)
    assert (g.crop_top, g.crop_left, g.input_height, g.resized_width, g.scale) == (16, 16, 224, 256, 0.5)
    assert g.to_original(0, 4) == (32.0, 40.0)
    req = server.rec.requests[-1]
    assert req.method == pb.SALIENCY_METHOD_GUIDED_BACKPROP and req.render_overlay
    assert not req.HasField("target")
    assert client.saliency(RGB, MODEL, overlay=False).overlay is None


def test_saliency_targets_round_trip(server: FakeServer, client: Client) -> None:
    s = client.saliency(RGB, MODEL, target=Unit("_blocks.10", 5, y=3, x=4))
    assert s.target == Unit("_blocks.10", 5, 3, 4)
    u = server.rec.requests[-1].target.unit
    assert (u.layer, u.channel, u.y, u.x) == ("_blocks.10", 5, 3, 4)
    s = client.saliency(RGB, MODEL, target=Unit("_blocks.10", 5, reduction="max"))
    assert s.target == Unit("_blocks.10", 5, reduction="max")
    u = server.rec.requests[-1].target.unit
    assert not u.HasField("y") and u.reduction == pb.REDUCTION_MAX
    with pytest.raises(ValueError):
        Unit("_blocks.10", 5, y=3)
    with pytest.raises(TypeError):
        client.saliency(RGB, MODEL, target="281")  # type: ignore[arg-type]


def test_method_names_and_options(server: FakeServer, client: Client) -> None:
    for i, name in enumerate(SALIENCY_METHODS, start=1):
        client.saliency(RGB, MODEL, method=name, overlay=False)
        assert server.rec.requests[-1].method == i  # the contract numbers them in this order
    n = len(server.rec.requests)
    with pytest.raises(ValueError, match="unknown saliency method"):
        client.saliency(RGB, MODEL, method="lrp")
    assert len(server.rec.requests) == n  # refused before any call

    client.saliency(RGB, MODEL, method="smoothgrad", samples=8, noise_level=0.1,
                    base_method="guided_backprop", seed=3)
    sg = server.rec.requests[-1].smoothgrad
    assert (sg.samples, sg.seed, sg.base_method) == (8, 3, pb.SALIENCY_METHOD_GUIDED_BACKPROP)
    assert sg.noise_level == pytest.approx(0.1)

    client.saliency(RGB, MODEL, method="integrated_gradients", steps=20, baseline="blurred", blur_sigma=4)
    req = server.rec.requests[-1]
    assert req.integrated_gradients.steps == 20 and req.integrated_gradients.baseline == pb.BASELINE_BLURRED
    client.saliency(RGB, MODEL, method="integrated_gradients", baseline=np.zeros((20, 30, 3), np.uint8))
    req = server.rec.requests[-1]
    assert req.integrated_gradients.baseline == pb.BASELINE_IMAGE and req.baseline_image.HasField("tensor")
    client.saliency(RGB, MODEL, method="grad_cam", cam_layer="_blocks.15")
    assert server.rec.requests[-1].grad_cam.layer == "_blocks.15"


def test_errors_carry_code_message_and_violations(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        client.saliency(RGB, "bad")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message == "bad request"
    assert e.value.field_violations == [("target.unit.layer", "no layer 'nope'"), ("method", "unsupported")]
    assert e.value.field_violations[0].field == "target.unit.layer"
    assert "INVALID_ARGUMENT: bad request" in str(e.value)
    with pytest.raises(NotFoundError) as nf:
        client.get_model("resnet9000")
    assert nf.value.field_violations == [("model", "not served")]
    with pytest.raises(UnimplementedError):
        client.top_activations(MODEL, "_blocks.3", 1, dataset="none")


def test_deadline(server: FakeServer) -> None:
    with Client(server.target, timeout=0.2) as c, pytest.raises(DeadlineExceededError):
        c.saliency(RGB, "slow")
    with Client(server.target, timeout=60) as c:
        with pytest.raises(DeadlineExceededError):
            c.saliency(RGB, "slow", timeout=0.2)  # a per-call timeout overrides the client's
        assert c.list_models(timeout=5)


def test_top_activations(server: FakeServer, client: Client) -> None:
    top = client.top_activations(MODEL, "_blocks.3", 7, k=4, crops=True, images=[RGB, Image.fromarray(RGB)],
                                 ranking="mean", max_per_image=2)
    assert top.images_scanned == 17 and top.channels == 40 and len(top) == 1
    assert top.stats is not None and (top.stats.images, top.stats.max, top.stats.positive_fraction) == (17, 9.5, 0.25)
    a = top[0]
    assert (a.source, a.score, a.y, a.x, a.box, a.original_box, a.digest) == (
        "skimage/chelsea.png", 9.5, 4, 5, (1, 2, 30, 40), (2, 4, 60, 80), "ab12")
    assert isinstance(a.crop, Image.Image) and a.image is None
    req = server.rec.requests[-1]
    assert (req.layer, req.channel, req.k, req.include_crops, len(req.images), req.dataset) == (
        "_blocks.3", 7, 4, True, 2, "samples")
    assert (req.ranking, req.max_per_image) == (pb.RANKING_MEAN, 2)
    with pytest.raises(ValueError, match="ranking"):
        client.top_activations(MODEL, "_blocks.3", 7, ranking="median")


def test_list_datasets(client: Client) -> None:
    (d,) = client.list_datasets()
    assert (d.name, d.image_count, d.skipped_count, d.digest) == ("samples", 19, 1, "ff")
    assert [(i.layer, i.state, i.images_done, i.images_total) for i in d.indexes] == [("_blocks.2", "building", 3, 19)]


def test_streaming_progress_then_result(server: FakeServer, client: Client) -> None:
    seen: list[Progress] = []
    r = client.maximize_unit(MODEL, Unit("_blocks.3", 2), steps=3, parameterization="pixel", seed=5,
                             on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3] and seen[0].total == 3
    assert seen[2].objectives == {"objective": 3.0}
    assert seen[0].preview is None and isinstance(seen[1].preview, Image.Image)
    assert r.image.size == (16, 16) and r.objective == 7.0 and r.predictions[0].label == "goldfish"
    req = server.rec.requests[-1]
    assert req.parameterization == pb.PARAMETERIZATION_PIXEL and req.steps == 3
    assert req.target.unit.channel == 2

    events = list(client.stream_dream(RGB, MODEL, "_blocks.5", octaves=2, channel=0, guide=RGB))
    assert [type(e).__name__ for e in events] == ["Progress"] * 3 + ["DreamResult"]
    req = server.rec.requests[-1]
    assert req.octaves == 2 and req.HasField("channel") and req.channel == 0 and req.HasField("guide")

    r2 = client.style_transfer(RGB, Image.fromarray(RGB), MODEL, style_layers=["_blocks.1"], optimizer="adam")
    assert (r2.style_loss, r2.content_loss) == (1.5, 0.25)
    assert list(server.rec.requests[-1].style_layers) == ["_blocks.1"]
    with pytest.raises(NotFoundError):
        client.dream(RGB, "missing", "_blocks.5")
    with pytest.raises(ValueError, match="optimizer"):
        client.style_transfer(RGB, RGB, MODEL, optimizer="sgd")  # type: ignore[typeddict-item]


def test_stream_stopped_early_is_fine(client: Client) -> None:
    events = client.stream_maximize_unit(MODEL, 1)
    assert isinstance(next(iter(events)), Progress)
    events.close()  # type: ignore[attr-defined]  # cancels the call
    assert client.list_models()  # the channel is still healthy


def test_channel_config() -> None:
    one = dict(ChannelConfig.build("localhost:50051", max_message_mb=8).channel_options())
    assert one["grpc.max_receive_message_length"] == 8 * 1024 * 1024 and "grpc.lb_policy_name" not in one
    many = dict(ChannelConfig.build("ipv4:10.0.0.1:50051,10.0.0.2:50051").channel_options())
    assert many["grpc.lb_policy_name"] == "round_robin"
    pick_first = [("grpc.lb_policy_name", "pick_first")]
    custom = dict(ChannelConfig.build("dns:///x:1", options=pick_first).channel_options())
    assert custom["grpc.lb_policy_name"] == "pick_first"
    assert ChannelConfig.build("x", timeout=5).timeout == Timeout(5.0, 600.0)
    assert ChannelConfig.build("x", timeout=None).timeout == Timeout(None, None)
    assert ChannelConfig.build("x", tls=True).tls == TLS()
    assert ChannelConfig.build("x", token="t").metadata == (("authorization", "Bearer t"),)


def test_tls_from_root_certs_path(tmp_path: Path) -> None:
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    cfg = ChannelConfig.build("x:1", tls=pem)
    assert cfg.tls is not None and cfg.tls.root_certificates == pem.read_bytes()
    with Client("127.0.0.1:1", tls=TLS(server_name="convlens.test")):
        pass  # a secure channel builds without touching the network

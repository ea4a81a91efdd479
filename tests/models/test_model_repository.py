"""--model-repo folders: torchvision, TorchScript and ONNX models side by side with broken ones."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from convlens.server.errors import FailedPrecondition, NotFound
from convlens.server.models.loaders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelConfigError,
    load_folder,
    parse_preprocess,
)
from convlens.server.models.onnx_module import OnnxModule
from convlens.server.models.repository import ModelRepository

from .conftest import make_tiny_cnn


def write(folder: Path, toml: str, **files: bytes | str) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(toml)
    for name, content in files.items():
        path = folder / name.replace("__", ".")
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


def export_onnx(model: torch.nn.Module, path: Path, size: int = 32) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but offline
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def make_resnet10() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


@pytest.fixture
def resnet10() -> torch.nn.Module:
    return make_resnet10()


@pytest.fixture(scope="module")
def repo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repo with one good model of each format, built once per module."""
    root = tmp_path_factory.mktemp("repo")
    tiny = make_tiny_cnn()
    r18 = write(root / "r18", 'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\n'
                'labels = "labels.txt"\ndescription = "a random resnet"\n[preprocess]\nsize = 64\n',
                labels__txt="".join(f"thing {i}\n" for i in range(10)))
    torch.save(make_resnet10().state_dict(), r18 / "weights.pt")
    ts = write(root / "ts", 'format = "torchscript"\nfile = "model.pt"\n[preprocess]\nsize = 32\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, still the format people ship
        torch.jit.save(torch.jit.script(tiny), str(ts / "model.pt"))
    onnx_dir = write(root / "onnx", 'format = "onnx"\nfile = "model.onnx"\n[preprocess]\nsize = 32\n'
                     'resize = 40\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
    export_onnx(tiny, onnx_dir / "model.onnx")
    return root


@pytest.fixture
def repo(repo_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the template, for tests that add or break folders."""
    return Path(shutil.copytree(repo_template, tmp_path / "repo"))


@pytest.fixture(scope="module")
def loaded(repo_template: Path) -> ModelRepository:
    return ModelRepository.load(repo_template, include_embedded=False)


def test_loads_every_format(loaded: ModelRepository, resnet10, tiny_cnn) -> None:
    models = loaded
    assert models.failures == {}
    assert models.names() == ["onnx", "r18", "ts"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_cnn(x)
        assert torch.allclose(models.get("ts").module(x), expected, atol=1e-5)
        assert torch.allclose(models.get("onnx").module(x), expected, atol=1e-4)
        x64 = torch.randn(2, 3, 64, 64)
        assert torch.allclose(models.get("r18").module(x64), resnet10(x64), atol=1e-5)


def test_torchvision_model(loaded: ModelRepository, resnet10) -> None:
    model = loaded.get("r18")
    assert model.format == "torchvision" and model.supports_gradients
    assert model.labels[3] == "thing 3" and model.num_classes == 10
    assert model.description == "a random resnet"
    assert model.preprocess.height == 64 and model.preprocess.resize == 73
    assert model.preprocess.mean == IMAGENET_MEAN and model.preprocess.std == IMAGENET_STD
    layers = {s.name: s for s in model.layers}
    assert layers["layer1"].output_shape == (64, 16, 16)
    assert layers["conv1"].has_filters and layers["conv1"].receptive_field.size_y == 7
    assert torch.equal(model.module.get_submodule("conv1").weight, resnet10.conv1.weight)


def test_torchscript_model(loaded: ModelRepository, tiny_cnn) -> None:
    model = loaded.get("ts")
    assert model.format == "torchscript" and model.supports_gradients
    assert model.labels == [f"class_{i}" for i in range(5)]
    layers = {s.name: s for s in model.layers}
    assert layers["conv1"].type == "Conv2d" and layers["conv1"].has_filters
    # Script submodules take no hooks: conv layers are found through their weights.
    assert layers["conv1"].output_shape == (8, 32, 32)
    assert layers["block.0"].output_shape == (8, 16, 16)
    assert layers["conv3"].receptive_field.size_y == 9
    assert torch.equal(model.module.get_submodule("conv3").weight, tiny_cnn.conv3.weight)


def test_onnx_model(loaded: ModelRepository, tiny_cnn) -> None:
    model = loaded.get("onnx")
    assert model.format == "onnx" and not model.supports_gradients
    assert model.preprocess.mean == (0.5,) * 3 and model.preprocess.resize == 40
    layers = {s.name: s for s in model.layers if s.has_filters}
    assert set(layers) == {"conv1", "block.0", "conv3"}  # block.0 named from the exporter's scope
    assert layers["conv1"].output_shape == (8, 32, 32)
    assert layers["block.0"].output_shape == (8, 16, 16)
    assert layers["conv3"].output_shape == (6, 16, 16)
    assert layers["conv1"].parameter_count == 8 * 3 * 9 + 8
    conv1 = model.module.get_submodule("conv1")
    assert torch.equal(conv1.weight, tiny_cnn.conv1.weight) and torch.equal(conv1.bias, tiny_cnn.conv1.bias)
    conv3 = model.module.get_submodule("conv3")
    assert (conv3.groups, conv3.stride, conv3.padding) == (2, (1, 1), (1, 1))
    assert torch.equal(conv3.weight, tiny_cnn.conv3.weight)
    # BN was fused into block.0 by the exporter: different weights, same function.
    assert model.module.get_submodule("block.0").weight.shape == (8, 8, 3, 3)


def test_onnx_hooks_see_conv_outputs(loaded: ModelRepository, tiny_cnn) -> None:
    module = loaded.get("onnx").module
    seen: dict[str, torch.Tensor] = {}
    handle = module.get_submodule("conv3").register_forward_hook(lambda m, i, o: seen.setdefault("onnx", o))
    ref = tiny_cnn.conv3.register_forward_hook(lambda m, i, o: seen.setdefault("torch", o))
    try:
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            module(x)
            tiny_cnn(x)
    finally:
        handle.remove()
        ref.remove()
    assert torch.allclose(seen["onnx"], seen["torch"], atol=1e-4)
    with pytest.raises(FailedPrecondition):
        module(torch.randn(1, 3, 32, 32, requires_grad=True))


def test_onnx_fixed_batch_and_copies(tmp_path: Path, tiny_cnn) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_cnn, (torch.zeros(1, 3, 16, 16),), str(tmp_path / "m.onnx"), dynamo=False)
    module = OnnxModule(tmp_path / "m.onnx")
    assert module.fixed_batch == 1 and module.input_hw == (16, 16)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), tiny_cnn(x), atol=1e-4)
    import copy

    clone = copy.deepcopy(module)  # ServedModel.replica deep-copies; the session is rebuilt
    assert torch.allclose(clone(x), module(x))
    # With no [preprocess] size, a fixed-size graph gives its own.
    (tmp_path / "model.toml").write_text('format = "onnx"\nfile = "m.onnx"\n')
    served = load_folder(tmp_path)
    assert (served.preprocess.height, served.preprocess.width) == (16, 16)


def test_broken_folders_are_reported(repo: Path, caplog) -> None:
    write(repo / "bad_toml", 'format = "torchvision"\narch = \n')
    write(repo / "no_weights", 'format = "torchvision"\narch = "resnet18"\nweights = "missing.pt"\n')
    write(repo / "bad_arch", 'format = "torchvision"\narch = "resnet9000"\nweights = "w.pt"\n', w__pt=b"")
    write(repo / "mismatch", 'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\n'
          "num_classes = 7\n", weights__pt=(repo / "r18" / "weights.pt").read_bytes())
    write(repo / "bad_format", 'format = "keras"\nfile = "m.h5"\n')
    write(repo / "garbage_onnx", 'format = "onnx"\nfile = "model.onnx"\n', model__onnx=b"not onnx")
    (repo / "no_config").mkdir()
    with caplog.at_level(logging.ERROR, logger="convlens.models"):
        models = ModelRepository.load(repo, include_embedded=False)
    assert models.names() == ["onnx", "r18", "ts"]
    f = models.failures
    assert set(f) == {"bad_toml", "no_weights", "bad_arch", "mismatch", "bad_format", "garbage_onnx",
                      "no_config"}
    assert "not valid TOML" in f["bad_toml"]
    assert "'missing.pt' not found" in f["no_weights"]
    assert "unknown torchvision arch 'resnet9000'" in f["bad_arch"]
    assert "do not fit resnet18 with num_classes=7" in f["mismatch"]
    assert "format must be one of" in f["bad_format"]
    assert f["garbage_onnx"]
    assert "no model.toml" in f["no_config"]
    assert all(name in caplog.text for name in f)


def test_labels_must_match_outputs(repo: Path) -> None:
    (repo / "r18" / "labels.txt").write_text("only\ntwo\n")
    (repo / "r18" / "model.toml").write_text(
        'format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\nnum_classes = 10\n'
        'labels = "labels.txt"\n[preprocess]\nsize = 64\n')
    models = ModelRepository.load(repo, include_embedded=False)
    assert "labels file has 2 lines, the model has 10 outputs" in models.failures["r18"]


def test_get_unknown_model(loaded: ModelRepository) -> None:
    with pytest.raises(NotFound) as err:
        loaded.get("vgg")
    assert err.value.message == "no model 'vgg'; served models: onnx, r18, ts"
    assert err.value.violations[0].field == "model"


def test_preprocess_table() -> None:
    default = parse_preprocess(None)
    assert (default.height, default.width, default.resize) == (224, 224, 256)
    assert parse_preprocess({"size": [240, 320], "resize": 300}).width == 320
    for bad in [{"size": "big"}, {"mean": [1, 2]}, {"std": [0, 1, 1]}, {"crop": 3}, {"resize": -1}]:
        with pytest.raises(ModelConfigError):
            parse_preprocess(bad)


@pytest.mark.slow
def test_embedded_default_is_served(tmp_path: Path) -> None:
    # A model folder may not shadow an embedded model.
    write(tmp_path / "efficientnet_lite0", 'format = "torchscript"\nfile = "x.pt"\n')
    models = ModelRepository.load(tmp_path)
    assert "efficientnet_lite0" in models.names()
    model = models.get("efficientnet_lite0")
    assert model.format == "embedded" and model.supports_gradients
    assert set(models.failures) == {"efficientnet_lite0"}
    assert "already served" in models.failures["efficientnet_lite0"]


def test_torchscript_copies(loaded: ModelRepository, tiny_cnn) -> None:
    import copy

    module = loaded.get("ts").module
    clone = copy.deepcopy(module)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clone(x), tiny_cnn(x), atol=1e-5)
    assert [n for n, _ in clone.named_modules()] == [n for n, _ in module.named_modules()]
    with pytest.raises(AttributeError):
        module.get_submodule("conv9")

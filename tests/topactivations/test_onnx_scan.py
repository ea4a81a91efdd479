"""ONNX models scan in onnxruntime (the layer as an extra graph output) and rank like the torch model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from convlens.server.datasets import DirectoryDataset
from convlens.server.indexing.build import build_index
from convlens.server.models.loaders import load_folder
from convlens.server.models.preprocess import prepare
from tests.e2e.conftest import TinyNet

from .conftest import write_photos


def test_onnx_conv_layer_top_k_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = TinyNet().eval()
    folder = tmp_path / "tinyonnx"
    folder.mkdir()
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(folder / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamo=False)
    (folder / "model.toml").write_text('format = "onnx"\nfile = "model.onnx"\n[preprocess]\nsize = 32\nresize = 32\n')
    model = load_folder(folder)
    assert model.format == "onnx"
    dataset = DirectoryDataset("photos", tmp_path / "photos")
    write_photos(tmp_path / "photos")
    index = build_index(model, dataset, "conv2", batch_size=3)
    assert index.count == len(dataset.listing().images)
    # Reference: the torch network, one image at a time, a plain hook on conv2.
    rows = []
    for image in dataset.listing().images:
        x, _ = prepare(dataset.read(image), model.preprocess)
        out: list[torch.Tensor] = []
        h = net.conv2.register_forward_hook(lambda _m, _i, o, out=out: out.append(o.detach()))
        try:
            with torch.no_grad():
                net(x[None])
        finally:
            h.remove()
        a = out[0][0, 5].numpy()
        rows.append((-float(a.max()), image.path, int(np.argmax(a))))
    rows.sort()
    top = index.top(5, 4)
    assert [e.image.path for e in top] == [r[1] for r in rows[:4]]
    np.testing.assert_allclose([e.value for e in top], [-r[0] for r in rows[:4]], rtol=1e-4, atol=1e-5)
    assert [e.y * 16 + e.x for e in top] == [r[2] for r in rows[:4]]

"""A folder of real photos and a small served model, shared by the TopActivations tests.

The model is a torchvision ResNet-18 (seeded random weights, 64-px input) in a model folder; the photos
are those scikit-image ships, written as JPEG and PNG in sub-folders, plus one file that is not an image.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image

from convlens.server.models.model import Preprocess

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "brick")
PRE = Preprocess(64, 64, 72, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's defaults


def write_photos(root: Path) -> list[str]:
    import skimage.data

    paths = []
    for i, name in enumerate(PHOTOS):
        a = getattr(skimage.data, name)()
        sub = root / ("set_a" if i % 2 else "set_b" / Path("nested"))
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"{name}.jpg" if i % 3 else f"{name}.png")
        Image.fromarray(a).save(path, quality=92)
        paths.append(path.relative_to(root).as_posix())
    (root / "set_a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return sorted(paths)


def write_model(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "weights.pt")
    (folder / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
    (folder / "model.toml").write_text('format = "torchvision"\narch = "resnet18"\nweights = "weights.pt"\n'
                                       'labels = "labels.txt"\n[preprocess]\nsize = 64\nresize = 72\n')
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("top")
    model = write_model(root / "repo" / "resnet18")
    photos = root / "photos"
    paths = write_photos(photos)
    return {"root": root, "model": model, "photos": photos, "paths": paths, "index": root / "index"}

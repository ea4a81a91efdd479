"""Class names: ImageNet's from torchvision (no download), a labels file, or generic names."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def imagenet_categories() -> tuple[str, ...]:
    # The weights enum's metadata ships inside torchvision; reading it fetches nothing.
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def generic_labels(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def default_labels(num_classes: int) -> list[str]:
    """ImageNet's names for a 1000-way classifier, else class_0 .. class_{n-1}."""
    if num_classes == 1000:
        return list(imagenet_categories())
    return generic_labels(num_classes)


def read_labels(path: Path) -> list[str]:
    """One label a line; blank trailing lines ignored (a file often ends with a newline)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]

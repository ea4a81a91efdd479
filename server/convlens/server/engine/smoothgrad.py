"""SmoothGrad (Smilkov et al. 2017): a base method averaged over noisy copies of the image.

Noise is Gaussian with stdev `noise` of the 0..255 pixel range, i.e. noise * 255 pixel units, which is
noise / std[c] in the model's normalised units. Each image draws its copies from its own generator seeded
with `seed`, one copy per call in a fixed order, so a request gives the same result alone or in any batch
and chunking.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from convlens.server.engine.gradients import CHUNK, accumulate
from convlens.server.engine.integrated_gradients import path_rows
from convlens.server.engine.layers import LayerResolver
from convlens.server.engine.targets import Target

BASES = ("gradient", "guided_backprop", "deconvnet", "integrated_gradients")
_RULES = {"gradient": None, "guided_backprop": "guided_backprop", "deconvnet": "deconvnet"}


def noisy_copies(x: torch.Tensor, samples: int, noise: float, std: tuple[float, ...], seed: int
                 ) -> Iterator[torch.Tensor]:
    """`samples` copies of one image [C, H, W] with noise drawn on the CPU (the same on every device)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scale = torch.tensor([noise / s for s in std], dtype=torch.float32).view(-1, 1, 1)
    for _ in range(samples):
        eps = torch.randn(tuple(x.shape), generator=generator, dtype=torch.float32) * scale
        yield x + eps.to(device=x.device, dtype=x.dtype)


def smoothgrad(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: list[Target],
    *,
    base: str,
    samples: int,
    noise: float,
    std: tuple[float, ...],
    seed: int,
    baselines: torch.Tensor | None = None,  # for base integrated_gradients
    steps: int = 50,
    chunk: int = CHUNK,
    resolver: LayerResolver | None = None,
) -> tuple[torch.Tensor, int]:
    """([B, C, H, W] mean attribution, ReLU-family calls modified per forward)."""
    out = torch.zeros_like(inputs)
    batch = inputs.shape[0]

    if base != "integrated_gradients":
        def rows() -> Iterator[tuple[int, torch.Tensor, float]]:
            for i in range(batch):
                for copy in noisy_copies(inputs[i], samples, noise, std, seed):
                    yield i, copy, 1.0

        def done(i: int, total: torch.Tensor) -> None:
            out[i] = total / samples

        modified = accumulate(model, rows(), targets.__getitem__, done, rule=_RULES[base], chunk=chunk,
                              resolver=resolver)
        return out, modified

    # Integrated gradients per noisy copy: (copy - b) * integral, averaged. The baseline stays that of
    # the clean image (a blurred baseline is not re-blurred per copy), as Captum's NoiseTunnel does.
    assert baselines is not None
    pending: dict[tuple[int, int], torch.Tensor] = {}

    def ig_rows() -> Iterator[tuple[tuple[int, int], torch.Tensor, float]]:
        for i in range(batch):
            for j, copy in enumerate(noisy_copies(inputs[i], samples, noise, std, seed)):
                pending[(i, j)] = copy
                yield from path_rows((i, j), copy, baselines[i], steps)

    def ig_done(key: tuple[int, int], integral: torch.Tensor) -> None:
        i = key[0]
        out[i] += (pending.pop(key) - baselines[i]) * integral / samples

    accumulate(model, ig_rows(), lambda key: targets[key[0]], ig_done, chunk=chunk, resolver=resolver)
    return out, 0

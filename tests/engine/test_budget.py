"""Per-request budget (issue #15): work refused up front, chunks that shrink for large inputs without changing
results, compute that stops between chunks, the blurred baseline in bounded memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.server.engine import interrupt
from convlens.server.engine.budget import Budget, check_job, check_saliency, rows_per_chunk, saliency_work
from convlens.server.engine.integrated_gradients import blur_matrix, gaussian_blur, integrated_gradients
from convlens.server.engine.pixel_space import PixelSpace
from convlens.server.engine.saliency import SaliencyOptions, saliency
from convlens.server.engine.targets import ClassTarget
from convlens.server.errors import DeadlineExceeded, ResourceExhausted


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


SPACE = PixelSpace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_rows_per_chunk_bounds_pixels_per_chunk() -> None:
    assert rows_per_chunk(224 * 224, Budget().chunk_pixels) == 32
    assert rows_per_chunk(512 * 512, Budget().chunk_pixels) == 6  # 6 x 262,144 <= 1,605,632 < 7 x
    assert rows_per_chunk(4096 * 4096, Budget().chunk_pixels) == 1  # never 0
    assert rows_per_chunk(32 * 32, Budget().chunk_pixels) == 32  # never above CHUNK


@pytest.mark.parametrize(("method", "base", "rows", "fields"), [
    ("gradient", "gradient", 1, ("method",)),
    ("guided_grad_cam", "gradient", 2, ("method",)),
    ("integrated_gradients", "gradient", 64 + 2, ("integrated_gradients.steps",)),
    ("smoothgrad", "guided_backprop", 16 + 1, ("smoothgrad.samples",)),
    ("smoothgrad", "integrated_gradients", 16 * 64 + 1, ("smoothgrad.samples", "integrated_gradients.steps")),
])
def test_saliency_work_counts_rows(method: str, base: str, rows: int, fields: tuple[str, ...]) -> None:
    work = saliency_work(method, samples=16, steps=64, base=base, height=10, width=20)
    assert (work.rows, work.pixels, work.pixel_rows, work.fields) == (rows, 200, rows * 200, fields)


def test_over_budget_saliency_is_refused_naming_what_to_lower() -> None:
    budget = Budget(saliency_pixel_rows=224 * 224 * 1000)
    ok = saliency_work("integrated_gradients", samples=1, steps=998, base="gradient", height=224, width=224)
    check_saliency(ok, budget, height=224, width=224)  # 1,000 rows: exactly the limit
    over = saliency_work("smoothgrad", samples=256, steps=1024, base="integrated_gradients", height=224, width=224)
    with pytest.raises(ResourceExhausted) as info:
        check_saliency(over, budget, height=224, width=224)
    err = info.value
    assert err.reason == "OVER_BUDGET"
    assert [v.field for v in err.violations] == ["smoothgrad.samples", "integrated_gradients.steps"]
    assert "262,145 forward/backward rows" in err.message and "224x224" in err.message
    assert "about 1,000 rows" in err.message and "--max-saliency-mpx-rows" in err.message


def test_over_budget_job_is_refused() -> None:
    budget = Budget(job_pixels=512 * 512)
    check_job(512 * 512, budget, rpc="MaximizeUnit", what="size^2 x images = 512^2 x 1", fields=("size", "images"))
    with pytest.raises(ResourceExhausted) as info:
        check_job(512 * 512 * 2, budget, rpc="MaximizeUnit", what="size^2 x images = 512^2 x 2",
                  fields=("size", "images"))
    assert info.value.reason == "OVER_BUDGET" and "524,288 pixels per step" in info.value.message
    assert [v.field for v in info.value.violations] == ["size", "images"]


@pytest.mark.parametrize("options", [
    SaliencyOptions(method="gradient"),
    SaliencyOptions(method="guided_grad_cam", cam_layer="2"),
    SaliencyOptions(method="integrated_gradients", ig_steps=20, ig_baseline="blurred", ig_blur_sigma=3.0),
    SaliencyOptions(method="smoothgrad", smooth_samples=5, smooth_base="guided_backprop"),
    SaliencyOptions(method="smoothgrad", smooth_samples=3, smooth_base="integrated_gradients", ig_steps=7),
], ids=lambda o: f"{o.method}-{o.smooth_base}")
def test_results_do_not_depend_on_rows_per_chunk(options: SaliencyOptions) -> None:
    """A large input computes a row or a few at a time: the same attributions as 32 rows per chunk."""
    net = tiny_net()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    targets = [ClassTarget(0), ClassTarget(2), None]
    whole = saliency(net, x, targets, options, SPACE)
    for chunk in (1, 5):
        part = saliency(net, x, targets, options, SPACE, chunk=chunk)
        for a, b in zip(part, whole, strict=True):
            torch.testing.assert_close(a.attribution, b.attribution, rtol=1e-5, atol=1e-6)
            assert a.target == b.target and a.target_value == pytest.approx(b.target_value, rel=1e-6)


def test_the_blurred_baseline_at_the_largest_sigma_matches_scipy_in_bounded_memory() -> None:
    """sigma 1000 (allowed) used to pad the batch by 4,000 pixels on every side (6 GB for 8 images at 32 px);
    the per-axis matrix is [n, n] whatever sigma, and gives scipy's answer."""
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for sigma in (0.3, 1.0, 1000.0):  # the convolution (kernel within the image), then the matrices
        expected = ndimage.gaussian_filter(x.numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(expected))
    assert blur_matrix(1, 5.0).tolist() == [[1.0]]
    assert blur_matrix(9, 1000.0).shape == (9, 9)
    torch.testing.assert_close(blur_matrix(9, 1000.0).sum(1), torch.ones(9, dtype=torch.float64))


def test_compute_stops_between_chunks_once_the_condition_holds() -> None:
    net = tiny_net()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    checks = []

    def after_three() -> bool:
        checks.append(1)
        return len(checks) > 3

    with interrupt.stop_when(after_three), pytest.raises(DeadlineExceeded) as info:
        integrated_gradients(net, x, [ClassTarget(0)], torch.zeros_like(x), steps=64, chunk=4)  # 16 chunks
    assert interrupt.stopped(info.value) and info.value.reason == "COMPUTE_STOPPED"
    assert len(checks) == 4  # stopped at the 4th chunk, not after all 16
    interrupt.check()  # outside the block: no condition, nothing raised
    full = integrated_gradients(net, x, [ClassTarget(0)], torch.zeros_like(x), steps=64, chunk=4)
    assert torch.isfinite(full).all()

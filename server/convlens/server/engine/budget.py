"""Per-request work and memory budgets (issue #15), computed from the request alone, before it is queued.

Saliency: every method is forward/backward passes over rows of the model's input, so its work is
rows x input pixels (rows: 1 for the gradient methods and Grad-CAM, 2 for guided Grad-CAM, `samples` for
SmoothGrad, `steps` for integrated gradients, samples x steps for SmoothGrad over integrated gradients, plus
the unperturbed passes). Its memory is bounded separately: rows go through the model in chunks of at most
`chunk_pixels` input pixels (`rows_per_chunk`), so a large input is computed a few rows at a time.

Optimisation jobs (MaximizeUnit, Dream, StyleTransfer): the memory of one step grows with the pixels it
optimises: size^2 x images for MaximizeUnit, the largest octave for Dream, the output for StyleTransfer.

A request over budget is refused with ResourceExhausted (reason OVER_BUDGET) naming the field(s) to lower:
the request is well formed, this server will not spend that much on it (another instance with a larger
budget may), so it is not retryable as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from convlens.server.errors import FieldViolation, ResourceExhausted

# Rows per forward/backward at most. Measured: EfficientNet-Lite0 at 224 px peaks at about 2.2 GiB for 32 rows
# (guided backprop, CPU).
CHUNK = 32
REASON = "OVER_BUDGET"
MPX = 1 << 20  # the unit of the flags: 2^20 pixels


@dataclass(frozen=True)
class Budget:
    """The limits (`convlens serve` flags --max-saliency-mpx-rows, --chunk-mpx, --max-job-mpx)."""

    # Saliency work: input pixels x rows. 2^30 ~ 1.07 G: at Lite0's 224 x 224, 21,400 rows (integrated gradients
    # at 1,024 steps, SmoothGrad at 256 samples, both together at 256 x 83); at 32 x 32, a million.
    saliency_pixel_rows: int = 1 << 30
    # Input pixels per forward/backward chunk: 32 rows at 224 x 224 (the measured 2.2 GiB on Lite0).
    chunk_pixels: int = CHUNK * 224 * 224
    # Pixels one optimisation job's step works on: 1024 x 1024 (a size-1024 MaximizeUnit peaked at 4.3 GB).
    job_pixels: int = 1 << 20

    @property
    def batch_pixels(self) -> int:
        """Pixels of the optimisation steps batched together at most: two jobs at the budget's limit (one per
        CPU shard), or many small ones (Lite0's default 224 x 224 MaximizeUnit: 41 of them)."""
        return 2 * self.job_pixels

    @classmethod
    def from_config(cls, config: object) -> Budget:
        """The server's budget (a ServerConfig, or anything with those attributes); defaults where absent."""
        found = getattr(config, "budget", None)
        return found if isinstance(found, Budget) else cls()


def rows_per_chunk(pixels: int, chunk_pixels: int, cap: int = CHUNK) -> int:
    """Rows of `pixels` input pixels each that fit `chunk_pixels` (at least 1, at most `cap`)."""
    return max(1, min(cap, chunk_pixels // max(1, pixels)))


@dataclass(frozen=True)
class SaliencyWork:
    rows: int  # forward/backward rows per image
    pixels: int  # model input pixels per row
    what: str  # how the rows come about, for the message
    fields: tuple[str, ...]  # the request fields that set them (what to lower)

    @property
    def pixel_rows(self) -> int:
        return self.rows * self.pixels


def saliency_work(method: str, *, samples: int, steps: int, base: str, height: int, width: int) -> SaliencyWork:
    """The rows one image of a Saliency request costs (validated options assumed)."""
    pixels = height * width
    if method == "integrated_gradients":
        return SaliencyWork(steps + 2, pixels, f"integrated_gradients.steps = {steps}",
                            ("integrated_gradients.steps",))
    if method == "smoothgrad" and base == "integrated_gradients":
        return SaliencyWork(samples * steps + 1, pixels,
                            f"smoothgrad.samples x integrated_gradients.steps = {samples} x {steps}",
                            ("smoothgrad.samples", "integrated_gradients.steps"))
    if method == "smoothgrad":
        return SaliencyWork(samples + 1, pixels, f"smoothgrad.samples = {samples}", ("smoothgrad.samples",))
    return SaliencyWork(2 if method == "guided_grad_cam" else 1, pixels, f"method {method}", ("method",))


def check_saliency(work: SaliencyWork, budget: Budget, *, height: int, width: int) -> None:
    """ResourceExhausted (OVER_BUDGET, naming the fields to lower) when `work` exceeds the budget."""
    if work.pixel_rows <= budget.saliency_pixel_rows:
        return
    allowed = max(1, budget.saliency_pixel_rows // max(1, work.pixels))
    message = (f"Saliency work over this server's budget: {work.what} is {work.rows:,} forward/backward rows "
               f"of the model's {height}x{width} input, {work.pixel_rows / MPX:,.1f} Mpx-rows; the limit is "
               f"{budget.saliency_pixel_rows / MPX:,.1f} (--max-saliency-mpx-rows), about {allowed:,} rows at "
               f"this input size: lower {' or '.join(work.fields)}")
    raise ResourceExhausted(message, violations=[FieldViolation(f, message) for f in work.fields], reason=REASON)


def check_job(pixels: int, budget: Budget, *, rpc: str, what: str, fields: tuple[str, ...]) -> None:
    """ResourceExhausted (OVER_BUDGET) when one step of an optimisation job works on more than the budget's
    pixels. `what` says how `pixels` come about (e.g. "size^2 x images = 1024^2 x 4")."""
    if pixels <= budget.job_pixels:
        return
    message = (f"{rpc} job over this server's memory budget: {what} = {pixels:,} pixels per step; the limit is "
               f"{budget.job_pixels:,} (--max-job-mpx {budget.job_pixels / MPX:g}): lower {' or '.join(fields)}")
    raise ResourceExhausted(message, violations=[FieldViolation(f, message) for f in fields], reason=REASON)

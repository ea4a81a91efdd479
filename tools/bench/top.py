"""TopActivations benchmark: scan throughput (decode vs model), torch vs onnxruntime, query latency through
the SDK from a built index, and a Ray build against the single-process build. Prints a markdown section.

    python -m tools.bench.top [--rounds 3] [--queries 60]

Numbers within one run are comparable (ratios); runs on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from convlens.server.datasets.dataset import SamplesDataset
from convlens.server.engine.topk import file_format
from convlens.server.engine.topk.index import ImageId
from convlens.server.engine.topk.scan import empty_index, layer_output, scan_batch
from convlens.server.indexing.build import Timings, build_index, index_key, prepare_one
from convlens.server.indexing.sources import DatasetSource, ModelSource
from convlens.server.models.embedded import load_lite
from convlens.server.models.model import ServedModel
from tools.common import MODEL

LAYERS = ("_blocks.2", "_blocks.10", "_conv_head", "_fc")


def _paired(model: ServedModel, inputs: torch.Tensor, rounds: int) -> dict[str, float]:
    """Images/s, median of interleaved rounds on one batch: raw full forward (contiguous, channels_last
    weights + input) and the scan's model part for the logits layer (full forward + candidates + merge)."""
    cl = model.replica(model.device, torch.channels_last)
    like = empty_index("_fc", model.layer("_fc").output_shape, k_max=64, per_image=4)
    ids = [ImageId(f"img{i}", "d") for i in range(len(inputs))]
    runs = {
        "raw contiguous": lambda: model.module(inputs),
        "raw channels_last": lambda: cl.module(inputs.contiguous(memory_format=torch.channels_last)),
        "scan channels_last": lambda: scan_batch(cl.module, "_fc", inputs, ids, like, channels_last=True),
        "scan input-only channels_last": lambda: scan_batch(model.module, "_fc", inputs, ids, like,
                                                            channels_last=True),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for run in runs.values():
            run()  # warm-up at this batch shape (oneDNN primitives)
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    return {k: len(inputs) / statistics.median(v) for k, v in times.items()}


def _scan_rate(model: ServedModel, dataset: SamplesDataset, layer: str, rounds: int, *,
               channels_last: bool = True) -> tuple[float, float]:
    """(model images/s, decode images/s) of build_index, best of rounds."""
    best_model, best_decode = 0.0, 0.0
    for _ in range(rounds):
        t = Timings()
        build_index(model, dataset, layer, batch_size=8, timings=t, decode_threads=1, channels_last=channels_last)
        best_model = max(best_model, t.images / t.forward_seconds)
        best_decode = max(best_decode, t.images / t.decode_seconds)
    return best_model, best_decode


def _onnx(model: ServedModel, folder: Path) -> ServedModel:
    from dataclasses import replace

    from convlens.server.models.onnx_module import OnnxModule

    path = folder / "lite0.onnx"
    torch.onnx.export(model.module, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    return replace(model, format="onnx", module=OnnxModule(path), supports_gradients=False)


def _queries(index_dir: Path, n: int) -> tuple[float, float]:
    from convlens.client import Client
    from convlens.server.launcher import ServerProcess

    with ServerProcess(["--device", "cpu", "--index-dir", str(index_dir)]) as srv, \
            Client(srv.address, timeout=300) as c:
        c.top_activations(MODEL, "_blocks.10", 0, k=9)  # loads the index from disk (no scan)
        plain, crops = [], []
        for i in range(n):
            started = time.perf_counter()
            c.top_activations(MODEL, "_blocks.10", i % 112, k=9)
            plain.append(time.perf_counter() - started)
        for i in range(max(5, n // 4)):
            started = time.perf_counter()
            c.top_activations(MODEL, "_blocks.10", i % 112, k=9, crops=True)
            crops.append(time.perf_counter() - started)
    return statistics.median(plain) * 1000, statistics.median(crops) * 1000


def _ray(layer: str) -> tuple[float, float, bool]:
    import ray

    from convlens.server.indexing.ray_build import build_index_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        started = time.perf_counter()
        on_ray = build_index_ray(ModelSource(MODEL), DatasetSource("samples"), layer)
        ray_wall = time.perf_counter() - started
    finally:
        ray.shutdown()
    started = time.perf_counter()
    single = build_index(ModelSource(MODEL).load(), SamplesDataset(), layer)
    single_wall = time.perf_counter() - started
    return ray_wall, single_wall, on_ray.matches(single)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_top")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--queries", type=int, default=60)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args(argv)
    model, dataset = load_lite(MODEL), SamplesDataset()
    images = dataset.listing().images
    inputs = torch.stack([prepare_one(dataset, model, i) for i in images[:8]])
    paired = _paired(model, inputs, max(5, args.rounds * 2))
    raw_best = max(paired["raw contiguous"], paired["raw channels_last"])
    print(f"## TopActivations scan and query (CPU, {torch.get_num_threads()} threads, {MODEL}, "
          f"`samples` = {len(images)} photos)\n")
    print("Written by `python -m tools.bench.top`.\n")
    print("Model part against a raw batched forward (batch 8, no_grad, median of interleaved rounds, logits "
          "layer = the whole network): " + ", ".join(f"{k} {v:.1f} img/s" for k, v in paired.items())
          + f"; scan / best raw = {paired['scan channels_last'] / raw_best:.2f}.\n")
    print("`convlens index build` per layer (the forward stops at the layer), channels_last weights and input, "
          "batch 8, best of rounds; decode + preprocess on one thread:\n")
    print("| layer | model part (img/s) | x raw full forward | decode + preprocess (img/s) |")
    print("| --- | ---: | ---: | ---: |")
    cl_model = model.replica(model.device, torch.channels_last)
    for layer in LAYERS:
        rate, decode = _scan_rate(cl_model, dataset, layer, args.rounds)
        print(f"| {layer} | {rate:.1f} | {rate / raw_best:.2f} | {decode:.1f} |")
    print()
    with tempfile.TemporaryDirectory() as tmp:
        onnx_model = _onnx(model, Path(tmp))
        with torch.no_grad():
            started = time.perf_counter()
            layer_output(onnx_model.module, "_conv_head", inputs)
            ort_full = len(inputs) / (time.perf_counter() - started)
        ort_rate, _ = _scan_rate(onnx_model, dataset, "_conv_head", args.rounds, channels_last=False)
        torch_rate, _ = _scan_rate(cl_model, dataset, "_conv_head", args.rounds)
        print(f"onnxruntime vs torch, scan of `_conv_head` (model part): onnxruntime {ort_rate:.1f} img/s, torch "
              f"{torch_rate:.1f} img/s ({ort_rate / torch_rate:.2f}x; one ORT batch of 8: {ort_full:.1f} img/s).\n")
        index_dir = Path(tmp) / "index"
        file_format.save(build_index(model, dataset, "_blocks.10"),
                         index_key(model, dataset, "_blocks.10").path(index_dir))
        p50, p50_crops = _queries(index_dir, args.queries)
        print(f"Query from a built index through the SDK (`_blocks.10`, k = 9, {args.queries} calls): "
              f"p50 {p50:.1f} ms without crops, {p50_crops:.1f} ms with crops (cut from the originals, PNG).\n")
    if not args.no_ray:
        ray_wall, single_wall, same = _ray("_blocks.10")
        print(f"Ray Data on a local 2-CPU cluster vs one process (`_blocks.10`, {len(images)} photos): "
              f"{ray_wall:.1f} s vs {single_wall:.1f} s (ratio {ray_wall / single_wall:.1f}; same index: {same}).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench-peers`: ConvLens against the servers a user would otherwise deploy, side by side.

Three servers run at once on this machine: ConvLens with its defaults (`convlens serve`), a plain grpc.aio +
torch server (tools/peers/plain_server.py) and a Ray Serve deployment with `@serve.batch`
(tools/peers/ray_server.py, HTTP ingress). One driver (tools/peers/driver.py) calls them all with the same
request bytes: Saliency (gradient, top-1 class, outputs heatmap + predictions) on the same photos.

1. Answers first: each photo's answer from the three must agree (heatmap to float tolerance, the top-5
   classes, the target) before any timing counts.
2. Ray's batching is tuned: a sweep of replicas x max_batch_size x batch_wait_timeout_s at c8 and c32, the
   best kept.
3. Interleaved rounds: per round, each concurrency level on each server (order rotated per round):
   req/s, p50, p99 and the server's CPU-ms per answer (its process tree's rusage over the window); ratios
   ConvLens / peer per round, medians reported.
4. 8 MaximizeUnit jobs at once on each server (a job per request on the peers): wall time, per round.
5. Raw torch's CPU per image in process (tools/peers/raw.py), per round; ConvLens's CPU split by thread
   (py-spy names the threads, /proc gives each one's CPU) at the highest level of the last round.

Writes out/bench/peers.json and prints markdown tables.

    python -m tools.peers.bench [--rounds 3] [--duration 12] [--levels 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from convlens.server.launcher import ServerProcess, free_port
from convlens.v1 import convlens_pb2 as pb
from convlens.wire.tensors import to_numpy
from tools import common
from tools.common import MODEL, photo, png, utc_now
from tools.peers import raw, work
from tools.peers.driver import Caller, GrpcCaller, HttpCaller, level, tree_cpu_seconds

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
CLASSES = (130, 144, 351, 736, 302, 63, 436, 100)


# ---------------------------------------------------------------- the servers


class Peer:
    """A peer server in a child process that prints READY when it serves."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, startup: float = 600.0) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + startup
        while b"READY" not in log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.5)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def photos(side: int | None = None) -> list[bytes]:
    """The bench's photos as PNG request bytes (tools/common.py's loader), resized to side x side when given."""
    return [png(photo(name, side or None)) for name in PHOTOS]


def saliency_bodies(model: str, images: Sequence[bytes], full: bool = False) -> list[bytes]:
    """Requests for the heatmap + predictions (or, `full`, the default answer: + the 600 kB attribution)."""
    outputs = [] if full else [pb.SALIENCY_OUTPUT_HEATMAP, pb.SALIENCY_OUTPUT_PREDICTIONS]
    return [pb.SaliencyRequest(model=model, image=pb.Image(encoded=img), outputs=outputs).SerializeToString()
            for img in images]


FULL = "convlens, default answer"  # the same ConvLens server asked for its default (full) answer


# ---------------------------------------------------------------- 1. equal answers


FOLDED = "--fold-batchnorm"  # a ConvLens variant whose gradients differ at rounding-flipped ReLU6 kinks


def compare(a: pb.SaliencyResponse, b: pb.SaliencyResponse, who: str, rtol: float = 1e-3) -> str | None:
    """None when the answers agree, else what differs. A `--fold-batchnorm` server is held to what
    models/fold.py documents instead: heatmaps equal on average (mean |difference| under 1e-4 of the max)
    with single pixels up to 10% apart."""
    ha, hb = to_numpy(a.heatmap), to_numpy(b.heatmap)
    if ha.shape != hb.shape:
        return f"{who}: heatmap shapes {ha.shape} vs {hb.shape}"
    scale = max(float(np.abs(hb).max()), 1e-12)
    err, mean_err = float(np.abs(ha - hb).max()) / scale, float(np.abs(ha - hb).mean()) / scale
    if FOLDED in who:
        if mean_err > 1e-4 or err > 0.1:
            return f"{who}: heatmaps differ by {mean_err:.2e} of their max on average, {err:.2e} at most"
    elif err > rtol:
        return f"{who}: heatmaps differ by {err:.2e} of their max"
    if [p.class_index for p in a.predictions] != [p.class_index for p in b.predictions]:
        return f"{who}: top-5 {[p.class_index for p in a.predictions]} vs {[p.class_index for p in b.predictions]}"
    if a.target.class_index != b.target.class_index or abs(a.target_value - b.target_value) > rtol * max(
            1.0, abs(b.target_value)):
        return f"{who}: target {a.target.class_index}={a.target_value} vs {b.target.class_index}={b.target_value}"
    return None


async def check_answers(callers: dict[str, Caller], bodies: Sequence[bytes],
                        bodies_of: dict[str, Sequence[bytes]] | None = None) -> list[str]:
    """Every server's answer to every body against ConvLens's; raises on a disagreement. `bodies_of`: other
    request bytes for some callers (the same photos)."""
    checked = []
    for i in range(len(bodies)):
        answers = {name: pb.SaliencyResponse.FromString(await c.saliency((bodies_of or {}).get(name, bodies)[i]))
                   for name, c in callers.items()}
        ref = answers["convlens"]
        for name, answer in answers.items():
            if name == "convlens":
                continue
            problem = compare(answer, ref, f"{name} photo {i}")
            if problem:
                raise SystemExit(f"answers differ, no timing counts: {problem}")
            checked.append(f"photo {i}: {name} == convlens (top-1 {ref.target.class_index})")
    return checked


# ---------------------------------------------------------------- 2. Ray's sweep


def ray_deploy(control_port: int, replicas: int, batch: int, wait: float) -> None:
    url = f"http://127.0.0.1:{control_port}/deploy?replicas={replicas}&batch={batch}&wait={wait}"
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=600) as r:
        r.read()


async def ray_sweep(args: argparse.Namespace, ray: Peer, control_port: int, caller: Caller,
                    bodies: Sequence[bytes]) -> tuple[tuple[int, int, float], list[dict[str, Any]]]:
    rows = []
    for spec in args.ray_sweep.split(","):
        replicas, batch, wait = spec.split(":")
        config = (int(replicas), int(batch), float(wait))
        ray_deploy(control_port, *config)
        rates = []
        for n in (8, 32):
            lv = await level(caller.saliency, bodies, n, args.warmup, args.duration / 2, ray.pid)
            rates.append(lv.throughput)
        rows.append({"replicas": config[0], "max_batch_size": config[1], "batch_wait_timeout_s": config[2],
                     "c8_rps": rates[0], "c32_rps": rates[1]})
        print(f"  ray {config}: c8 {rates[0]:.2f} req/s, c32 {rates[1]:.2f}", flush=True)
    best = max(rows, key=lambda r: r["c8_rps"] + r["c32_rps"])
    config = (best["replicas"], best["max_batch_size"], best["batch_wait_timeout_s"])
    ray_deploy(control_port, *config)
    return config, rows


# ---------------------------------------------------------------- 4. MaximizeUnit jobs


async def jobs_at_once(caller: Caller, args: argparse.Namespace) -> tuple[float, list[pb.MaximizeUnitResult]]:
    bodies = [pb.MaximizeUnitRequest(model=args.model, target=pb.Target(class_index=CLASSES[i % len(CLASSES)]),
                                     steps=args.steps, size=args.size, seed=i).SerializeToString()
              for i in range(args.jobs)]
    start = time.perf_counter()
    answers = await asyncio.gather(*(caller.maximize(b) for b in bodies))
    wall = time.perf_counter() - start
    return wall, [pb.MaximizeUnitResponse.FromString(a).result for a in answers]


def compare_images(a: pb.MaximizeUnitResult, b: pb.MaximizeUnitResult, who: str) -> tuple[str | None, dict[str, float]]:
    """(None or what differs, the figures): the same seed and class must give the same picture whether the
    job ran alone (the peers: a job per request) or batched with companions (ConvLens). Float sums differ in
    order between a batch of 8 and a batch of 1, and 32 Adam steps carry that on, so the bar is a picture
    nobody could tell apart: mean |difference| under 1 grey level of 255 and the objective within 1%."""
    pa = np.asarray(Image.open(io.BytesIO(a.image_png)).convert("RGB"), dtype=np.float32)
    pb_ = np.asarray(Image.open(io.BytesIO(b.image_png)).convert("RGB"), dtype=np.float32)
    if pa.shape != pb_.shape:
        return f"{who}: image shape {pa.shape} != {pb_.shape}", {}
    diff = np.abs(pa - pb_)
    figures = {"mean_abs_levels": float(diff.mean()), "max_abs_levels": float(diff.max()),
               "objective_rel": abs(a.objective - b.objective) / max(abs(b.objective), 1e-6)}
    if figures["mean_abs_levels"] >= 1.0 or figures["objective_rel"] > 0.01:
        return f"{who}: {figures}", figures
    return None, figures


async def check_maximize(callers: dict[str, Caller], args: argparse.Namespace) -> list[dict[str, Any]]:
    """8 jobs on every server, each job's picture and objective against ConvLens's; raises on a difference."""
    answers = {name: (await jobs_at_once(c, args))[1] for name, c in callers.items() if name != FULL}
    rows = []
    for name, results in answers.items():
        if name == "convlens":
            continue
        for i, (got, ref) in enumerate(zip(results, answers["convlens"], strict=True)):
            problem, figures = compare_images(got, ref, f"{name} job {i}")
            if problem and FOLDED not in name:  # folded: another float path, another picture (reported)
                raise SystemExit(f"MaximizeUnit answers differ, no timing counts: {problem}")
            rows.append({"server": name, "job": i, **figures})
        worst = max((r for r in rows if r["server"] == name), key=lambda r: r["mean_abs_levels"])
        print(f"  MaximizeUnit: {name} vs convlens on {len(results)} jobs (worst mean |diff| "
              f"{worst['mean_abs_levels']:.3f} levels, max {worst['max_abs_levels']:.0f}, objective "
              f"{worst['objective_rel']:.2e} rel)", flush=True)
    return rows


# ---------------------------------------------------------------- 5. ConvLens's CPU by thread


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id (py-spy dump); threads py-spy does not list are native."""
    try:
        text = subprocess.run([str(Path(sys.executable).parent / "py-spy"), "dump", "--pid", str(pid)],
                              capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(m.group(1), 0): m.group(2) for m in re.finditer(r'Thread (\S+) \([^)]*\): "([^"]*)"', text)}


def group(name: str | None) -> str:
    if name is None:
        return "native threads (gRPC core, OpenMP helpers)"
    if name.startswith("convlens-shard") or name.startswith("convlens-device") or name.startswith("convlens-"):
        return "compute lanes"
    if name.startswith("asyncio_"):
        return "decode + prepare (to_thread pool)"
    if name == "MainThread":
        return "event loop (gRPC servicer, protobuf, encode, scheduler)"
    return f"other Python threads ({name.split('-')[0]})"


async def convlens_split(caller: Caller, bodies: Sequence[bytes], n: int, args: argparse.Namespace,
                         pid: int) -> dict[str, Any]:
    names = thread_names(pid)
    before = thread_cpu(pid)
    lv = await level(caller.saliency, bodies, n, 0.0, args.duration, pid)
    after = thread_cpu(pid)
    split: dict[str, float] = defaultdict(float)
    for tid, cpu in after.items():
        split[group(names.get(tid))] += cpu - before.get(tid, 0.0)
    per = {k: 1e3 * v / max(lv.ok, 1) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}
    return {"concurrency": n, "answers": lv.ok, "cpu_ms_per_answer_by_thread_group": per,
            "cpu_ms_per_answer": sum(per.values())}


def encode_decode_costs(model: str, images: Sequence[bytes]) -> dict[str, float]:
    """CPU-ms, in process, of the per-image serving steps around compute: PNG decode + prepare, and
    building + serialising the answer (heatmap + predictions) vs the full default answer."""
    served = work.load(model)
    t0 = time.process_time()
    tensors = [work.decode(pb.SaliencyRequest(image=pb.Image(encoded=b)), served) for b in images * 5]
    decode = (time.process_time() - t0) / len(tensors)
    heat = np.random.default_rng(0).random((3, 224, 224), dtype=np.float32)
    from convlens.wire.tensors import to_tensor

    t0 = time.process_time()
    for _ in range(40):
        pb.SaliencyResponse(heatmap=to_tensor(heat[0]), predictions=[pb.Prediction(label="x")] * 5
                            ).SerializeToString()
    small = (time.process_time() - t0) / 40
    t0 = time.process_time()
    for _ in range(40):
        pb.SaliencyResponse(attribution=to_tensor(heat), heatmap=to_tensor(heat[0]),
                            predictions=[pb.Prediction(label="x")] * 5).SerializeToString()
    full = (time.process_time() - t0) / 40
    del tensors
    return {"decode_prepare_ms": 1e3 * decode, "encode_heatmap_predictions_ms": 1e3 * small,
            "encode_default_answer_ms": 1e3 * full}


# ---------------------------------------------------------------- the run


def med(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # this process's own torch (raw) runs on fresh threads, as a server's lanes
    out_dir = ROOT / "out" / "bench"
    logs = out_dir / "logs"
    images = photos(args.photo_side)
    bodies = saliency_bodies(args.model, images)
    load = {"start": os.getloadavg()}
    servers: dict[str, Any] = {}
    callers: dict[str, Caller] = {}
    pids: dict[str, int] = {}
    result: dict[str, Any] = {"date": utc_now(), "model": args.model,
                              "cores": os.cpu_count(), "torch": torch.__version__, "args": vars(args)}
    try:
        convlens = ServerProcess(["--device", "cpu", *args.convlens_args.split()], log_path=logs / "convlens.log",
                                 startup_timeout=600)
        convlens.start()
        servers["convlens"] = convlens
        assert convlens.proc is not None
        pids["convlens"] = convlens.proc.pid
        callers["convlens"] = GrpcCaller(convlens.address)
        bodies_of = {FULL: saliency_bodies(args.model, images, full=True)}
        if not args.skip_full:
            callers[FULL], pids[FULL] = GrpcCaller(convlens.address), convlens.proc.pid
        if args.variant:
            variant = ServerProcess(["--device", "cpu", *args.variant.split()], log_path=logs / "variant.log",
                                    startup_timeout=600)
            variant.start()
            name = f"convlens {args.variant}"
            servers[name] = variant
            assert variant.proc is not None
            pids[name] = variant.proc.pid
            callers[name] = GrpcCaller(variant.address)
        plain_port = free_port()
        plain = Peer("plain", ["tools.peers.plain_server", "--port", str(plain_port), "--model", args.model],
                     logs / "plain.log")
        servers["plain"], pids["plain"] = plain, plain.pid
        callers["plain"] = GrpcCaller(f"127.0.0.1:{plain_port}")
        if not args.skip_ray:
            ray_port, control_port = free_port(), free_port()
            ray = Peer("ray", ["tools.peers.ray_server", "--port", str(ray_port), "--control-port",
                               str(control_port), "--model", args.model], logs / "ray.log")
            servers["ray"], pids["ray"] = ray, ray.pid
            callers["ray"] = HttpCaller(f"http://127.0.0.1:{ray_port}")

        print("answers:", flush=True)
        result["answers_checked"] = await check_answers(callers, bodies, bodies_of)
        print("  " + "\n  ".join(result["answers_checked"]), flush=True)
        result["answer_bytes"] = {name: len(await c.saliency(bodies_of.get(name, bodies)[0]))
                                  for name, c in callers.items()}
        print(f"  bytes per answer: {result['answer_bytes']}", flush=True)

        if not args.skip_maximize:
            result["maximize_checked"] = await check_maximize(callers, args)

        if not args.skip_ray:
            print("ray sweep (replicas, max_batch_size, batch_wait_timeout_s):", flush=True)
            best, sweep = await ray_sweep(args, servers["ray"], control_port, callers["ray"], bodies)
            result["ray_sweep"], result["ray_best"] = sweep, best
            await check_answers(callers, bodies[:1], bodies_of)

        levels = [int(x) for x in args.levels.split(",")]
        names = list(callers)
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            row: dict[str, Any] = {"saliency": {}, "maximize": {}, "raw": []}
            order = names[r % len(names):] + names[:r % len(names)]
            for n in levels:
                row["saliency"][n] = {}
                for name in order:
                    lv = await level(callers[name].saliency, bodies_of.get(name, bodies), n, args.warmup,
                                     args.duration, pids[name])
                    row["saliency"][n][name] = {
                        "rps": lv.throughput, "p50_ms": lv.p50_ms, "p99_ms": lv.p99_ms, "errors": lv.errors,
                        "server_cpu_ms_per_answer": lv.cpu_ms_per_answer}
                    print(f"round {r} c{n} {name}: {lv.throughput:.2f} req/s p50 {lv.p50_ms:.0f} p99 "
                          f"{lv.p99_ms:.0f} ms, server {lv.cpu_ms_per_answer:.1f} CPU-ms/answer"
                          f"{f', {lv.errors} errors' if lv.errors else ''}", flush=True)
            if not args.skip_maximize:
                for name in [n for n in order if n != FULL]:
                    cpu0 = tree_cpu_seconds(pids[name])
                    wall, results = await jobs_at_once(callers[name], args)
                    cpu = tree_cpu_seconds(pids[name]) - cpu0
                    row["maximize"][name] = {"wall_s": wall, "objectives": [a.objective for a in results],
                                             "server_cpu_s": cpu}
                    print(f"round {r} {args.jobs} MaximizeUnit at once {name}: {wall:.1f} s "
                          f"(server {cpu:.1f} CPU-s)", flush=True)
            row["raw"] = [p.__dict__ for p in await asyncio.to_thread(raw.measure, work.load(args.model),
                                                                          args.raw_seconds)]
            print(f"round {r} raw: " + "; ".join(f"{p['config']} {p['images_per_second']:.1f} img/s "
                                                  f"{p['cpu_ms_per_image']:.1f} CPU-ms/img" for p in row["raw"]),
                  flush=True)
            rounds.append(row)
            # Every finished round on disk at once: a run stopped later keeps what it measured.
            partial = Path(args.out).with_suffix(".partial.json")
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({**result, "rounds": rounds}, indent=1, default=str))
        result["rounds"] = rounds
        result["convlens_split"] = await convlens_split(callers["convlens"], bodies, max(levels), args,
                                                        pids["convlens"])
        result["in_process_costs"] = encode_decode_costs(args.model, images)
    finally:
        for c in callers.values():
            await c.close()
        for s in servers.values():
            s.stop()
        load["end"] = os.getloadavg()
        result["load_average"] = load
    result["summary"] = summarise(result, [int(x) for x in args.levels.split(",")])
    return result


def summarise(result: dict[str, Any], levels: Sequence[int]) -> dict[str, Any]:
    rounds = result["rounds"]
    names = list(rounds[0]["saliency"][levels[0]])
    summary: dict[str, Any] = {"saliency": {}, "maximize": {}}
    for n in levels:
        per = {}
        for name in names:
            rows = [r["saliency"][n][name] for r in rounds]
            per[name] = {k: med([row[k] for row in rows]) for k in ("rps", "p50_ms", "p99_ms",
                                                                    "server_cpu_ms_per_answer")}
            if name != "convlens":
                per[name]["convlens_ratio"] = med([r["saliency"][n]["convlens"]["rps"] / r["saliency"][n][name]["rps"]
                                                   for r in rounds if r["saliency"][n][name]["rps"] > 0])
        summary["saliency"][n] = per
    if rounds[0]["maximize"]:
        for name in rounds[0]["maximize"]:
            walls = [r["maximize"][name]["wall_s"] for r in rounds]
            summary["maximize"][name] = {"wall_s": med(walls)}
            if name != "convlens":
                summary["maximize"][name]["convlens_speedup"] = med(
                    [r["maximize"][name]["wall_s"] / r["maximize"]["convlens"]["wall_s"] for r in rounds])
    raw_cpu = {p["config"]: med([next(q["cpu_ms_per_image"] for q in r["raw"] if q["config"] == p["config"])
                                 for r in rounds]) for p in rounds[0]["raw"]}
    raw_rate = {p["config"]: med([next(q["images_per_second"] for q in r["raw"] if q["config"] == p["config"])
                                  for r in rounds]) for p in rounds[0]["raw"]}
    best = max(raw_rate, key=lambda k: raw_rate[k])
    summary["raw"] = {"cpu_ms_per_image": raw_cpu, "images_per_second": raw_rate, "best": best}
    # service / raw (the raw best of the same round), per level, for the answer sizes asked.
    summary["service_over_raw"] = {
        n: {name: med([r["saliency"][n][name]["rps"] / max(q["images_per_second"] for q in r["raw"])
                       for r in rounds]) for name in names if name.startswith("convlens")} for n in levels}
    top = max(levels)
    conv = summary["saliency"][top]["convlens"]["server_cpu_ms_per_answer"]
    summary["efficiency"] = {"concurrency": top, "convlens_cpu_ms_per_image": conv,
                             "raw_best_cpu_ms_per_image": raw_cpu[best], "ratio_to_raw_best": conv / raw_cpu[best],
                             "ratio_to_raw_cheapest": conv / min(raw_cpu.values())}
    return summary


def table(result: dict[str, Any]) -> str:
    s = result["summary"]
    right = "---:"
    lines = common.table(
        ["concurrency", "server", "req/s", "p50 ms", "p99 ms", "server CPU-ms / answer", "ConvLens / this"],
        [(n, name, f"{v['rps']:.2f}", f"{v['p50_ms']:.0f}", f"{v['p99_ms']:.0f}",
          f"{v['server_cpu_ms_per_answer']:.1f}", f"{v['convlens_ratio']:.2f}" if "convlens_ratio" in v else "—")
         for n, per in s["saliency"].items() for name, v in per.items()],
        [right, "---", right, right, right, right, right])
    if s["maximize"]:
        lines += ["", *common.table(
            ["8 MaximizeUnit jobs at once", "wall s", "ConvLens speed-up"],
            [(name, f"{v['wall_s']:.1f}", f"{v['convlens_speedup']:.2f}x" if "convlens_speedup" in v else "—")
             for name, v in s["maximize"].items()],
            ["---", right, right])]
    columns = list(next(iter(s["service_over_raw"].values())))
    lines += ["", *common.table(["concurrency", *(f"{k} / raw best" for k in columns)],
                                [(n, *(f"{v:.2f}" for v in per.values())) for n, per in s["service_over_raw"].items()],
                                [right] * (1 + len(columns)))]
    e = s["efficiency"]
    lines += ["", f"Server CPU per image at c{e['concurrency']}: ConvLens {e['convlens_cpu_ms_per_image']:.1f} "
              f"CPU-ms; raw torch's best configuration ({s['raw']['best']}) "
              f"{e['raw_best_cpu_ms_per_image']:.1f}: **{e['ratio_to_raw_best']:.2f}x** "
              f"({e['ratio_to_raw_cheapest']:.2f}x the cheapest raw configuration)."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="efficientnet_lite0 or a model folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--photo-side", type=int, default=None, help="resize the photos to this square first")
    p.add_argument("--ray-sweep", default="1:1:0,1:4:0.005,1:8:0.005,1:8:0.02,2:4:0.005",
                   help="replicas:max_batch_size:batch_wait_timeout_s,...")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-maximize", action="store_true")
    p.add_argument("--skip-full", action="store_true", help="skip ConvLens asked for its default (full) answer")
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--raw-seconds", type=float, default=6.0)
    p.add_argument("--convlens-args", default="", help="extra `convlens serve` arguments (default: none)")
    p.add_argument("--variant", default="",
                   help="also run ConvLens with these `convlens serve` arguments, e.g. '--threads 1'")
    p.add_argument("--out", default=str(ROOT / "out" / "bench" / "peers.json"))
    args = p.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print()
    print(table(result))
    print(f"\nload average start {result['load_average']['start']}, end {result['load_average']['end']}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()

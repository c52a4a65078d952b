"""Flow-map distillation cost: time per optimiser step and peak memory of fmtt_core's FlowMapTrainer, per objective
and batch, on the digits demo's networks (or wider copies of them, to scale the work up on a GPU).

    python bench/bench_distill.py                       # CPU, one thread: writes bench/results/distill.md/.json
    python bench/bench_distill.py --device cuda --width 1024 --batches 256 1024   # ready for a GPU when one is lent
    python bench/bench_distill.py --quick               # smoke run, prints only
    python bench/bench_distill.py --fmtt-with runs/my_map   # FMTT with a distilled map against the bundled map:
                                                        # bench/results/distill_fmtt.md/.json

Each configuration runs in a fresh process: a few warm-up steps, then `--steps` timed steps (median per step).
Peak memory: on CUDA, torch.cuda.max_memory_allocated from the first step on (the models' own weights included);
on the CPU, the growth of the process's resident set over its size before the first step (sampled every ms): the
optimiser state, the activations and the allocator's caches, over the loaded models.
Objectives: LSD as FMRG trains it (4 forwards, 1 with gradients), LSD with gradients through the finite
difference (3 forwards kept for the backward), PSD + the diagonal term (4 forwards, 2 with gradients).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTIVES = {"lsd": dict(objective="lsd"), "lsd_grad": dict(objective="lsd", derivative_grad=True),
              "psd": dict(objective="psd")}


def _rss_bytes() -> int:
    from bench_digits import _rss_bytes as rss  # one definition of the measurement for every bench

    return rss()


def worker(objective: str, batch: int, width: int, steps: int, device: str) -> dict:
    from fmtt_core.flow_maps import DistillSettings, FlowMapTrainer
    from fmtt_demo.distill import digits_data
    from fmtt_demo.models import FlowMapNet, VelocityNet, load_model

    torch.set_num_threads(1)
    dev = torch.device(device)
    teacher = load_model("velocity") if width == 256 else VelocityNet(width=width).requires_grad_(False)
    teacher = teacher.to(dev)
    student = FlowMapNet(**teacher.config).to(dev)
    student.init_from_velocity(teacher)
    draw = digits_data()
    settings = DistillSettings(**OBJECTIVES[objective], steps=10**9, batch=batch, lr=1e-4, ema_decay=0.999)
    trainer = FlowMapTrainer(student, teacher, lambda n, g: draw(n, g).to(dev), settings,
                             student=student.average_velocity)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Peak from before the first step: optimiser state, activations and the allocator's caches all count.
    baseline, peak, running = _rss_bytes(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for _ in range(3):  # warm-up steps, not timed
        trainer.train_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    running[0] = False
    watcher.join()
    peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else (max(peak[0], _rss_bytes()) - baseline) / 2**20
    load = os.getloadavg()[0]
    return {"objective": objective, "batch": batch, "width": width, "device": device,
            "params": sum(p.numel() for p in student.parameters()), "ms_per_step": 1000 * statistics.median(times),
            "peak_mb": peak_mb, "memory": "cuda max allocated" if cuda else "RSS growth", "load_1min": load}


def run(objectives, batches, width, steps, device, log=print) -> list[dict]:
    rows = []
    for objective in objectives:
        for batch in batches:
            cmd = [sys.executable, __file__, "--worker", objective, str(batch), str(width), str(steps), device]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            log(f"  {objective} batch {batch}: {rows[-1]['ms_per_step']:.1f} ms/step, {rows[-1]['peak_mb']:.0f} MB")
    return rows


def markdown(rows, environment: str) -> str:
    lines = ["# Flow-map distillation: time per step and peak memory", "",
             f"FlowMapTrainer on the digits networks ({rows[0]['params']:,} student parameters, width "
             f"{rows[0]['width']}), {environment}. Median over the timed steps; memory: {rows[0]['memory']}.", "",
             "Machine load (1-minute average) is recorded per row: on a shared machine it inflates the times.", "",
             "| objective | batch | ms / step | peak MB | load |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['objective']} | {r['batch']} | {r['ms_per_step']:.1f} | {r['peak_mb']:.0f} | "
                     f"{r['load_1min']:.1f} |")
    return "\n".join(lines) + "\n"


FMTT_METHODS = "fmtt_exact,fmtt_search,fmtt_zero_order"


def fmtt_with(weights: Path, seeds: int, classes=(3, 5, 8), log=print) -> dict:
    """`fmtt demo`'s flow-map methods at its default budget (64 particles, 40 steps), with the bundled map and with
    the map in `weights`: judge accuracy per seed (averaged over the target classes), resamplings, final ESS."""
    from fmtt_demo.cli import run_demo

    torch.set_num_threads(1)
    out = {}
    for name, folder in (("bundled", None), ("distilled", weights)):
        per_seed = {}
        for seed in range(seeds):
            for c in classes:
                runs, _ = run_demo(target_class=c, seed=seed, methods=FMTT_METHODS, weights=folder, progress=False)
                for r in runs:
                    cell = per_seed.setdefault(r.method.label, {}).setdefault(seed, [])
                    cell.append((r.metrics["judge_accuracy"], r.metrics["resamples"], r.metrics["final_ess"]))
        out[name] = {label: [[sum(v[i] for v in cells) / len(cells) if cells[0][i] is not None else None
                              for i in range(3)] for cells in seeds_.values()] for label, seeds_ in per_seed.items()}
        log(f"  {name}: done")
    return out


def fmtt_markdown(result: dict, weights: Path, seeds: int) -> str:
    def stat(rows, i):
        vals = [r[i] for r in rows if r[i] is not None]
        if not vals:
            return "-", 0.0, 0.0
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{mean:.3f} ± {sd:.3f}", mean, sd

    lines = ["# FMTT with a distilled flow map against the bundled map", "",
             f"`fmtt demo` flow-map methods at the demo's default budget (64 particles, 40 steps, beta 4), target "
             f"classes 3, 5, 8, seeds 0-{seeds - 1}; distilled map: `{weights}`. Judge accuracy and final ESS / N: "
             "mean ± std over seeds of the class average; the difference is in units of its standard error.", "",
             "| method | judge acc, bundled | judge acc, distilled | difference / s.e. | resamplings, bundled | "
             "resamplings, distilled | final ESS, bundled | final ESS, distilled |",
             "|---|---|---|---|---|---|---|---|"]
    for label in result["bundled"]:
        a, b = result["bundled"][label], result["distilled"][label]
        (acc_a, ma, sa), (acc_b, mb, sb) = stat(a, 0), stat(b, 0)
        se = ((sa ** 2 + sb ** 2) / seeds) ** 0.5
        z = f"{(mb - ma) / se:+.1f}" if se > 0 else f"{mb - ma:+.3f} (no spread)"
        lines.append(f"| {label} | {acc_a} | {acc_b} | {z} | {stat(a, 1)[0]} | {stat(b, 1)[0]} | {stat(a, 2)[0]} | "
                     f"{stat(b, 2)[0]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=5, metavar=("OBJECTIVE", "BATCH", "WIDTH", "STEPS", "DEVICE"))
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256])
    parser.add_argument("--width", type=int, default=256, help="network width (256: the shipped digits networks)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fmtt-with", type=Path, default=None,
                        help="a folder `fmtt distill` wrote: compare FMTT with its map against the bundled map")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for --fmtt-with (default 5)")
    args = parser.parse_args(argv)
    if args.fmtt_with is not None:
        result = fmtt_with(args.fmtt_with, args.seeds)
        text = fmtt_markdown(result, args.fmtt_with, args.seeds)
        print(text)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "distill_fmtt.md").write_text(text)
        (RESULTS / "distill_fmtt.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.worker:
        objective, batch, width, steps, device = args.worker
        print(json.dumps(worker(objective, int(batch), int(width), int(steps), device)))
        return 0
    if args.quick:
        args.batches, args.steps = [16], 3
    rows = run(args.objectives, args.batches, args.width, args.steps, args.device)
    import platform

    where = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}), 1 thread")
    env = f"{where}, torch {torch.__version__}"
    text = markdown(rows, env)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
        (RESULTS / f"distill{suffix}.md").write_text(text)
        (RESULTS / f"distill{suffix}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

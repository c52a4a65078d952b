"""Digits benchmark on the shipped demo models (CPU, offline).

1. accuracy: judge accuracy against the network-pass budget for every method, on three target
   classes, mean and spread over seeds -> bench/results/digits_accuracy.{json,md,png}
2. memory: peak memory and wall time per particle-step of FMTT exact against the particle count,
   with and without chunking -> bench/results/digits_memory.{json,md,png}

    .venv/bin/python bench/bench_digits.py            # both parts
    .venv/bin/python bench/bench_digits.py --part accuracy --seeds 3
    .venv/bin/python bench/bench_digits.py --quick    # a small smoke run -> bench/results/quick/ (not committed)

Budget rule (fmtt_demo.methods): a network pass is one denoiser or flow-map forward for one particle
(backward = 2). At each budget level FMTT exact with the flow map has N particles; every other method
gets the particle count that spends the same. Each run hands on N_OUT samples; accuracy is the judge's
target-class rate over them (draws from the final weights for weighted samplers, the top N_OUT by
reward for best-of-N and search, i.i.d. particles for base and guidance). The x axis is network passes
per handed-on sample.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fmtt_core import time_grid
from fmtt_demo.methods import METHODS, Setup, evaluate, make_x_init, matched_particles, network_passes
from fmtt_demo.models import load_digit_models
from fmtt_demo.rewards import ClassifierReward

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"  # git-ignored: a smoke run never replaces the committed full results
CLASSES = (3, 5, 8)
BENCH_METHODS = ("base", "best_of_n", "guidance", "fk", "fk_max", "fmtt_exact", "fmtt_search", "fmtt_denoiser",
                 "fmtt_zero_order")
REWARD_SCALE = 4.0
STEPS = 40
N_OUT = 16


# ------------------------------------------------------------------------------------------ accuracy

def run_accuracy(budgets, seeds, classes, steps=STEPS, methods=BENCH_METHODS, log=print) -> list[dict]:
    models = load_digit_models()
    times = time_grid(steps)
    rows = []
    total = len(classes) * len(budgets) * len(seeds) * len(methods)
    done, start = 0, time.perf_counter()
    for cls in classes:
        setup = Setup(models, ClassifierReward(models.classifier, cls), reward_scale=REWARD_SCALE)
        for n_ref in budgets:
            for seed in seeds:
                for key in methods:
                    method = METHODS[key]
                    n = matched_particles(method, setup, n_ref)
                    t0 = time.perf_counter()
                    result = method.run(setup, make_x_init(n, seed), times, seed)
                    seconds = time.perf_counter() - t0
                    m = evaluate(method, result, models, N_OUT, cls)
                    passes = network_passes(result)
                    rows.append({"class": cls, "budget_particles": n_ref, "seed": seed, "method": key,
                                 "particles": n, "passes": passes, "passes_per_sample": passes / N_OUT,
                                 "judge_accuracy": m["judge_accuracy"],
                                 "reward_classifier_accuracy": m["reward_classifier_accuracy"],
                                 "mean_reward": m["mean_reward"], "judge_confidence": m["judge_confidence"],
                                 "final_ess": m["final_ess"], "resamples": m["resamples"],
                                 "thermodynamic_length": result.thermodynamic_length, "seconds": seconds})
                    done += 1
            log(f"  class {cls}, budget N={n_ref}: {done}/{total} runs, {time.perf_counter() - start:.0f} s")
    return rows


def summarise(rows, key="judge_accuracy"):
    """{method: {budget: (mean, std over seeds of the class-averaged value, passes per sample)}}."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        out[method] = {}
        for budget in sorted({r["budget_particles"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["budget_particles"] == budget]
            seeds = sorted({r["seed"] for r in sel})
            per_seed = [np.mean([r[key] for r in sel if r["seed"] == s]) for s in seeds]
            out[method][budget] = (float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else 0.0,
                                   float(np.mean([r["passes_per_sample"] for r in sel])))
    return out


def _accuracy_row(method: str, cells: dict, budgets) -> str:
    """One markdown row: mean ± std over seeds at each budget."""
    cells_md = " | ".join(f"{cells[b][0]:.1%} ± {cells[b][1]:.1%}" for b in budgets)
    return f"| {METHODS[method].label} | {cells_md} |"


def accuracy_markdown(rows, classes) -> str:
    budgets = sorted({r["budget_particles"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    summary = summarise(rows)
    ref = summary["fmtt_exact"]
    head = "| method | " + " | ".join(f"{ref[b][2]:.0f}" for b in budgets) + " |"
    lines = [f"Judge accuracy (mean ± std over {len(seeds)} seeds of the average over target classes "
             f"{', '.join(map(str, classes))}); columns: network passes per handed-on sample "
             f"(FMTT exact with {', '.join(map(str, budgets))} particles, {STEPS} steps, beta {REWARD_SCALE:g}, "
             f"{N_OUT} samples handed on per run).", "", head, "|---|" + "---:|" * len(budgets)]
    for method, cells in summary.items():
        lines.append(_accuracy_row(method, cells, budgets))
    lines += ["", "At the largest budget: judge and reward-classifier accuracy (a gap means adversarial pixels), "
              "resamplings (selections for search) per run, final ESS / N, thermodynamic length, wall time:", "",
              "| method | judge acc | reward clf acc | resampled | final ESS | thermodynamic length | wall s per run |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    top = budgets[-1]
    for method in summary:
        sel = [r for r in rows if r["method"] == method and r["budget_particles"] == top]
        ess = [r["final_ess"] for r in sel if r["final_ess"] is not None]
        ess_cell = f"{np.mean(ess):.2f}" if ess else "-"
        # fmtt_core reports the thermodynamic length for FMTT runs only.
        thermo = f"{np.mean([r['thermodynamic_length'] for r in sel]):.2f}" if method.startswith("fmtt") else "-"
        lines.append(f"| {METHODS[method].label} | {np.mean([r['judge_accuracy'] for r in sel]):.1%} | "
                     f"{np.mean([r['reward_classifier_accuracy'] for r in sel]):.1%} | "
                     f"{np.mean([r['resamples'] for r in sel]):.1f} | {ess_cell} | "
                     f"{thermo} | {np.mean([r['seconds'] for r in sel]):.2f} |")
    for cls in classes:
        cls_rows = [r for r in rows if r["class"] == cls]
        s = summarise(cls_rows)
        lines += ["", f"Target class {cls}:", "", head, "|---|" + "---:|" * len(budgets)]
        for method, cells in s.items():
            lines.append(_accuracy_row(method, cells, budgets))
    return "\n".join(lines) + "\n"


def accuracy_plot(rows, classes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all", rows)] + [(c, [r for r in rows if r["class"] == c]) for c in classes]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), sharey=True)
    for ax, (cls, sel) in zip(axes, panels):
        summary = summarise(sel)
        for method, cells in summary.items():
            budgets = sorted(cells)
            x = [cells[b][2] for b in budgets]
            y = np.array([cells[b][0] for b in budgets])
            e = np.array([cells[b][1] for b in budgets])
            style = "-" if method.startswith("fmtt") else "--"
            (line,) = ax.plot(x, y, style, marker="o", markersize=3, label=METHODS[method].label)
            # mean ± std over seeds, clipped to the accuracies that exist
            ax.fill_between(x, np.clip(y - e, 0, 1), np.clip(y + e, 0, 1), color=line.get_color(), alpha=0.12)
        ticks = [cells[2] for _, cells in sorted(summary["fmtt_exact"].items())]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set(xlabel="network passes per handed-on sample", ylim=(0, 1.02),
               title="mean over classes" if cls == "all" else f"target class {cls}")
    axes[0].set_ylabel("judge accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ memory

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def memory_worker(particles: int, chunk: int | None, steps: int) -> dict:
    """One configuration in a fresh process: peak RSS growth (sampled every ms) and wall time."""
    from fmtt_demo.methods import METHODS as M

    torch.set_num_threads(1)
    models = load_digit_models()
    setup = Setup(models, ClassifierReward(models.classifier, 3), reward_scale=REWARD_SCALE, chunk_size=chunk)
    method = M["fmtt_exact"]
    method.run(setup, make_x_init(4, 0), time_grid(2), 0)  # warm up kernels and allocator
    x_init = make_x_init(particles, 0)
    baseline, peak, running = _rss_bytes(), [0], [True]

    def watch():
        while running[0]:
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    method.run(setup, x_init, time_grid(steps), 0)
    seconds = time.perf_counter() - t0
    running[0] = False
    watcher.join()
    peak[0] = max(peak[0], _rss_bytes())
    return {"particles": particles, "chunk_size": chunk, "steps": steps, "peak_mb": (peak[0] - baseline) / 2**20,
            "seconds": seconds, "us_per_particle_step": 1e6 * seconds / (particles * steps)}


def run_memory(particle_counts, chunks, steps, log=print) -> list[dict]:
    rows = []
    for chunk in chunks:
        for n in particle_counts:
            cmd = [sys.executable, __file__, "--memory-worker", str(n), str(chunk or 0), str(steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            log(f"  N={n} chunk={chunk}: {rows[-1]['peak_mb']:.0f} MB, "
                f"{rows[-1]['us_per_particle_step']:.0f} us/particle-step")
    return rows


def memory_markdown(rows) -> str:
    counts = sorted({r["particles"] for r in rows})
    chunks = list(dict.fromkeys(r["chunk_size"] for r in rows))
    lines = [f"FMTT exact (flow map, 1 jump, with backward), {rows[0]['steps']} steps, 1 CPU thread: "
             "peak memory growth during sampling (MB, RSS sampled every ms) and wall time per particle-step (µs).", "",
             "| chunk size | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    for chunk in chunks:
        cells = {r["particles"]: r for r in rows if r["chunk_size"] == chunk}
        name = "all at once" if chunk is None else str(chunk)
        lines.append(f"| {name} (MB) | " + " | ".join(f"{cells[n]['peak_mb']:.0f}" for n in counts) + " |")
        lines.append(f"| {name} (µs) | " + " | ".join(f"{cells[n]['us_per_particle_step']:.0f}" for n in counts) + " |")
    return "\n".join(lines) + "\n"


def memory_plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(9, 3.6))
    for chunk in dict.fromkeys(r["chunk_size"] for r in rows):
        sel = sorted((r for r in rows if r["chunk_size"] == chunk), key=lambda r: r["particles"])
        label = "no chunking" if chunk is None else f"chunk_size={chunk}"
        ax_m.plot([r["particles"] for r in sel], [max(r["peak_mb"], 0.1) for r in sel], marker="o", label=label)
        ax_t.plot([r["particles"] for r in sel], [r["us_per_particle_step"] for r in sel], marker="o", label=label)
    counts = sorted({r["particles"] for r in rows})
    for ax in (ax_m, ax_t):
        ax.set_xscale("log")
        ax.set_xticks(counts, [str(n) for n in counts])  # the measured counts only: no crowded log labels
        ax.minorticks_off()
    ax_m.set(yscale="log", xlabel="particles", ylabel="peak memory growth (MB)")
    ax_t.set(xlabel="particles", ylabel="µs per particle-step", ylim=(0, None))
    ax_m.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

def rows_json(rows) -> str:
    """One run per line, floats to 5 significant digits: small and diff-friendly."""
    short = lambda v: float(f"{v:.5g}") if isinstance(v, float) else v  # noqa: E731
    return "[\n" + ",\n".join(json.dumps({k: short(v) for k, v in r.items()}, sort_keys=True) for r in rows) + "\n]\n"


def replot(out: Path) -> None:
    """The plots again from recorded results (after a change to the plots, without re-running the bench)."""
    accuracy = out / "digits_accuracy.json"
    if accuracy.is_file():
        rows = json.loads(accuracy.read_text())
        accuracy_plot(rows, sorted({r["class"] for r in rows}), out / "digits_accuracy.png")
    memory = out / "digits_memory.json"
    if memory.is_file():
        memory_plot(json.loads(memory.read_text()), out / "digits_memory.png")


def output_folder(out: Path | None, quick: bool) -> Path:
    """Where the tables go: the committed bench/results for a full run, bench/results/quick for --quick."""
    if out is None:
        return QUICK_RESULTS if quick else RESULTS
    if quick and out.resolve() == RESULTS.resolve():
        raise ValueError(f"--quick would overwrite the committed full results in {RESULTS}; "
                         f"leave --out out (default {QUICK_RESULTS}) or give another folder.")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "accuracy", "memory"), default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two budgets, two seeds, one class, small memory sweep")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {RESULTS}, with --quick {QUICK_RESULTS})")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the plots from the JSON already recorded in --out; runs nothing")
    parser.add_argument("--memory-worker", nargs=3, type=int, metavar=("N", "CHUNK", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.out = output_folder(args.out, args.quick)
    except ValueError as e:
        parser.error(str(e))
    if args.memory_worker:
        n, chunk, steps = args.memory_worker
        print(json.dumps(memory_worker(n, chunk or None, steps)))
        return 0

    if args.replot:
        replot(args.out)
        return 0
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part in ("all", "accuracy"):
        if args.quick:
            budgets, seeds, classes = (16, 64), range(2), (3,)
        else:
            budgets, seeds, classes = (4, 8, 16, 32, 64, 128, 256), range(args.seeds), CLASSES
        print(f"accuracy: classes {classes}, FMTT particles {budgets}, seeds {list(seeds)}")
        rows = run_accuracy(budgets, seeds, classes)
        (args.out / "digits_accuracy.json").write_text(rows_json(rows))
        md = accuracy_markdown(rows, classes)
        (args.out / "digits_accuracy.md").write_text(md)
        accuracy_plot(rows, classes, args.out / "digits_accuracy.png")
        print(md)
    if args.part in ("all", "memory"):
        counts = (64, 512) if args.quick else (64, 256, 1024, 4096)
        print(f"memory: particles {counts}")
        rows = run_memory(counts, (None, 256), steps=10)
        (args.out / "digits_memory.json").write_text(rows_json(rows))
        md = memory_markdown(rows)
        (args.out / "digits_memory.md").write_text(md)
        memory_plot(rows, args.out / "digits_memory.png")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

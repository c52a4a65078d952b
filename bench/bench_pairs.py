"""Pair benchmark: where the look-ahead decides (CPU, offline, the shipped pair models).

1. accuracy: judge success (the judge reads a pair that satisfies the constraint) against network passes
   per handed-on sample, for every method of fmtt_demo.pairs.task, on three constraints, mean ± std over
   seeds; with final ESS, resamplings and thermodynamic length -> bench/results/pairs_accuracy.{json,md,png}
2. lookahead: how well each look-ahead's reward at time t predicts the final reward of the same
   probability-flow trajectory (Pearson correlation) and how often the judge reads the same pair on the
   look-ahead as on the end point, against t, for the denoiser, ODE(1, 2, 4) and the flow map
   -> bench/results/pairs_lookahead.{json,md,png}
3. gated: a 2-D Gaussian mixture whose reward is flat except in thin cells between which the denoiser's
   prediction falls, where the exact flow map is known (fmtt_core.analytic): success probability and energy
   distance to the closed-form tilted law per network pass, for the same methods
   -> bench/results/pairs_gated.{json,md,png}

    .venv/bin/python bench/bench_pairs.py                 # both parts, ~15 min on one thread
    .venv/bin/python bench/bench_pairs.py --part lookahead
    .venv/bin/python bench/bench_pairs.py --quick         # a smoke run -> bench/results/quick/ (not committed)

Budget rule (fmtt_demo.methods): at each level FMTT exact with the flow map has N particles and is charged
an upper bound of its passes; every other method gets the particle count that spends the same. The x axis
is the passes each run actually made (fmtt_core's counter) per handed-on sample (N_OUT per run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the digits bench's summaries, also when imported by a test
from bench_digits import RESULTS, output_folder, rows_json, summarise  # noqa: E402

from fmtt_core import (  # noqa: E402
    DenoiserLookahead,
    FlowMapLookahead,
    FMTTConfig,
    ODELookahead,
    base_sample,
    time_grid,
)
from fmtt_demo.methods import METHODS  # noqa: E402
from fmtt_demo.ode import heun_trajectory  # noqa: E402
from fmtt_demo.pairs.constraints import PairConstraintReward, judge_calls  # noqa: E402
from fmtt_demo.pairs.data import CANVAS_SHAPE  # noqa: E402
from fmtt_demo.pairs.models import load_pair_models  # noqa: E402
from fmtt_demo.pairs.task import PAIR_METHODS, REWARD_SCALE, pair_setup, run_method  # noqa: E402

CONSTRAINTS = ("sum10", "same", "pair38")
STEPS = 40
N_OUT = 16
BUDGETS = (4, 8, 16, 32, 64)
QUICK = {"budgets": (8,), "seeds": range(2), "constraints": ("sum10", "same"), "steps": 20,
         "trajectories": 64, "times": (0.0, 0.5, 0.9)}
LOOKAHEAD_TIMES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# ------------------------------------------------------------------------------------------ accuracy

def run_accuracy(budgets, seeds, constraints, steps=STEPS, methods=PAIR_METHODS, models=None, log=print,
                 eta=1.0, reward_scale=REWARD_SCALE):
    models = models or load_pair_models()
    rows, start = [], time.perf_counter()
    for constraint in constraints:
        setup = pair_setup(models, constraint, reward_scale=reward_scale, eta=eta)
        for n_ref in budgets:
            for seed in seeds:
                for key in methods:
                    run = run_method(setup, key, n_ref, steps, seed, N_OUT)
                    m = run.metrics
                    rows.append({"constraint": constraint, "budget_particles": n_ref, "seed": seed, "method": key,
                                 "particles": run.particles, "passes": run.passes,
                                 "passes_per_sample": run.passes / N_OUT, "judge_accuracy": m["judge_accuracy"],
                                 "reward_classifier_accuracy": m["reward_classifier_accuracy"],
                                 "mean_reward": m["mean_reward"], "final_ess": m["final_ess"],
                                 "resamples": m["resamples"],
                                 "thermodynamic_length": run.result.thermodynamic_length, "seconds": run.seconds})
            log(f"  {constraint}, budget N={n_ref}: {len(rows)} runs, {time.perf_counter() - start:.0f} s")
    return rows


def _cell(cells, budget):
    mean, std, _ = cells[budget]
    return f"{mean:.1%} ± {std:.1%}"


def gap_fk(rows) -> dict:
    """FMTT exact (flow map) minus FK steering (diff), judge success in points, per budget: mean over seeds of the
    constraint-averaged difference, and its standard error."""
    out = {}
    for budget in sorted({r["budget_particles"] for r in rows}):
        seeds = sorted({r["seed"] for r in rows})
        def success(method, seed, budget=budget):
            return np.mean([r["judge_accuracy"] for r in rows
                            if r["method"] == method and r["budget_particles"] == budget and r["seed"] == seed])
        diffs = [success("fmtt_exact", seed) - success("fk", seed) for seed in seeds]
        se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
        out[budget] = (100 * float(np.mean(diffs)), 100 * se)
    return out


def accuracy_markdown(rows, constraints, steps, eta=1.0, reward_scale=REWARD_SCALE) -> str:
    budgets = sorted({r["budget_particles"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    summary = summarise(rows)
    ref = summary["fmtt_exact"]
    head = "| method | " + " | ".join(f"{ref[b][2]:.0f} (N={b})" for b in budgets) + " |"
    lines = [f"Judge success (mean ± std over {len(seeds)} seeds of the average over constraints "
             f"{', '.join(constraints)}); columns: network passes per handed-on sample of FMTT exact (flow map) "
             f"with N particles; every other method spends the same budget ({steps} steps, eta {eta:g}, "
             f"beta {reward_scale:g}, {N_OUT} samples handed on per run).", "", head, "|---|" + "---:|" * len(budgets)]
    lines += [f"| {METHODS[m].label} | " + " | ".join(_cell(c, b) for b in budgets) + " |" for m, c in summary.items()]
    gap = gap_fk(rows)
    lines += ["", "FMTT exact (flow map) minus FK steering (diff), points of judge success (± standard error over "
              "seeds): " + ", ".join(f"N={b}: {g:+.1f} ± {se:.1f}" for b, (g, se) in gap.items()), "",
              "At the largest budget: judge and reward-classifier success (a gap means adversarial pixels), "
              "resamplings (selections for search) per run, final ESS / N, thermodynamic length, wall time:", "",
              "| method | particles | judge | reward clf | resampled | final ESS | thermodynamic length | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    top = budgets[-1]
    for method in summary:
        sel = [r for r in rows if r["method"] == method and r["budget_particles"] == top]
        ess = [r["final_ess"] for r in sel if r["final_ess"] is not None]
        thermo = f"{np.mean([r['thermodynamic_length'] for r in sel]):.2f}" if method.startswith("fmtt") else "-"
        lines.append(f"| {METHODS[method].label} | {sel[0]['particles']} | "
                     f"{np.mean([r['judge_accuracy'] for r in sel]):.1%} | "
                     f"{np.mean([r['reward_classifier_accuracy'] for r in sel]):.1%} | "
                     f"{np.mean([r['resamples'] for r in sel]):.1f} | {f'{np.mean(ess):.2f}' if ess else '-'} | "
                     f"{thermo} | {np.mean([r['seconds'] for r in sel]):.2f} |")
    for constraint in constraints:
        s = summarise([r for r in rows if r["constraint"] == constraint])
        lines += ["", f"Constraint {constraint}:", "", head, "|---|" + "---:|" * len(budgets)]
        lines += [f"| {METHODS[m].label} | " + " | ".join(_cell(c, b) for b in budgets) + " |" for m, c in s.items()]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    # 20 distinct colours (the default cycle repeats after 10 and there are 11-12 methods).
    plt.rcParams["axes.prop_cycle"] = plt.cycler(color=plt.cm.tab20.colors[::2] + plt.cm.tab20.colors[1::2])
    return plt


def accuracy_plot(rows, constraints, path: Path) -> None:
    plt = _plt()
    panels = [("mean over constraints", rows)] + [(c, [r for r in rows if r["constraint"] == c]) for c in constraints]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.6), sharey=True)
    for ax, (title, sel) in zip(axes, panels):
        summary = summarise(sel)
        for method, cells in summary.items():
            budgets = sorted(cells)
            x = [cells[b][2] for b in budgets]
            y, e = np.array([cells[b][0] for b in budgets]), np.array([cells[b][1] for b in budgets])
            style = "-" if method.startswith("fmtt") else "--"
            focus = method in ("fmtt_exact", "fk")  # the comparison the issue asks about: drawn bold, with its spread
            (line,) = ax.plot(x, y, style, marker="o", markersize=3, label=METHODS[method].label,
                              linewidth=2.4 if focus else 1.1)
            if focus:
                ax.fill_between(x, y - e, y + e, color=line.get_color(), alpha=0.15)
        ticks = [cells[2] for _, cells in sorted(summary["fmtt_exact"].items())]
        ax.set_xscale("log")
        ax.set_xticks(ticks, [f"{t:.0f}" for t in ticks], fontsize=8)
        ax.minorticks_off()
        ax.set(xlabel="network passes per handed-on sample", title=title, ylim=(0, 1.02))
    axes[0].set_ylabel("judge success")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ look-ahead

def lookaheads(models) -> dict:
    return {"denoiser": DenoiserLookahead(models.denoiser), "ODE(1)": ODELookahead(models.denoiser, steps=1),
            "ODE(2)": ODELookahead(models.denoiser, steps=2), "ODE(4)": ODELookahead(models.denoiser, steps=4),
            "flow map": FlowMapLookahead(models.flow_map, jumps=1)}


def sde_states(models, x0, steps=STEPS, seed=0):
    """The bench's base sampler (SDE, eta 1, `steps` steps): times [steps + 1] and states [steps + 1, N, ...]."""
    seen = []
    result = base_sample(models.denoiser, x0, time_grid(steps), config=FMTTConfig(eta=1.0, seed=seed),
                         callback=lambda info: seen.append(info["x"].detach().clone()))
    return torch.as_tensor(time_grid(steps), dtype=torch.float64), torch.stack(seen + [result.samples])


@torch.no_grad()
def run_lookahead(trajectories, times, constraints, models=None, seed=0, teacher_steps=60) -> list[dict]:
    """Each look-ahead at x_t against the end point x_1 of the same trajectory, along two dynamics:
    "ODE": base probability-flow trajectories (Heun, fine), where an exact flow map scores correlation 1 and
    agreement 1 at every t, so the gap is the look-ahead's error; "SDE": the bench's base sampler (eta 1), whose
    noise after t also moves the end point, so even an exact flow map falls short early.
    (ODE(1) is one Euler step from t to 1, i.e. the denoiser: the two rows coincide by construction.)"""
    models = models or load_pair_models()
    x0 = torch.randn((trajectories, *CANVAS_SHAPE), generator=torch.Generator().manual_seed(seed))
    rows = []
    for dynamics, (grid, states) in (("ODE", heun_trajectory(models.velocity, x0, steps=teacher_steps)),
                                     ("SDE", sde_states(models, x0, seed=seed))):
        rows += _lookahead_rows(models, grid, states, times, constraints, dynamics)
    return rows


def _lookahead_rows(models, grid, states, times, constraints, dynamics):
    end, trajectories, steps = states[-1], states.shape[1], len(grid) - 1
    rewards = {c: PairConstraintReward(models.classifier, c) for c in constraints}
    end_calls = judge_calls(models.judge, end)
    end_r = {c: r(end) for c, r in rewards.items()}
    rows = []
    for t in times:
        k = int(round(t * steps))
        x, tk = states[k], torch.full((trajectories,), float(grid[k]))
        for name, look in lookaheads(models).items():
            y = look(x, tk)
            calls = judge_calls(models.judge, y)
            row = {"dynamics": dynamics, "t": float(grid[k]), "lookahead": name,
                   "pair_agreement": float((calls == end_calls).all(1).float().mean()),
                   "rms_error": float((y - end).flatten(1).pow(2).mean(1).sqrt().mean())}
            for c, r in rewards.items():
                row[f"corr_{c}"] = float(np.corrcoef(r(y).numpy(), end_r[c].numpy())[0, 1])
                table = r.table
                row[f"agree_{c}"] = float((table[calls[:, 0], calls[:, 1]] == table[end_calls[:, 0],
                                                                                      end_calls[:, 1]]).float().mean())
            row["corr_mean"] = float(np.mean([row[f"corr_{c}"] for c in constraints]))
            rows.append(row)
    return rows


DYNAMICS = {"ODE": "base probability-flow trajectories (Heun; an exact flow map scores {exact} at every t)",
            "SDE": f"trajectories of the bench's base sampler (SDE, eta 1, {STEPS} steps; its noise after t moves the "
                   "end point, so even an exact flow map falls short early)"}


def lookahead_markdown(rows, trajectories) -> str:
    names = list(dict.fromkeys(r["lookahead"] for r in rows))
    lines = []
    for dynamics in dict.fromkeys(r["dynamics"] for r in rows):
        sel = [r for r in rows if r["dynamics"] == dynamics]
        times = sorted({r["t"] for r in sel})
        by = {(r["lookahead"], r["t"]): r for r in sel}
        for key, title, exact in (
                ("corr_mean", "Correlation of the look-ahead's reward at t with the end point's reward (Pearson, "
                 "mean over the constraints)", "1"),
                ("pair_agreement", "Judge reads the same pair on the look-ahead as on the end point", "1"),
                ("rms_error", "RMS pixel error of the look-ahead against the end point", "0")):
            lines += [f"**{dynamics}.** {title}; {trajectories} " + DYNAMICS[dynamics].format(exact=exact) + ":", "",
                      "| look-ahead | " + " | ".join(f"t={t:.2f}" for t in times) + " |",
                      "|---|" + "---:|" * len(times)]
            lines += [f"| {n} | " + " | ".join(f"{by[(n, t)][key]:.3f}" for t in times) + " |" for n in names]
            lines.append("")
    return "\n".join(lines)


def lookahead_plot(rows, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [n for n in dict.fromkeys(r["lookahead"] for r in rows) if n != "ODE(1)"]  # ODE(1) = denoiser
    for i, name in enumerate(names):
        for dynamics, linestyle in (("ODE", "-"), ("SDE", "--")):
            sel = sorted((r for r in rows if r["lookahead"] == name and r.get("dynamics", "ODE") == dynamics),
                         key=lambda r: r["t"])
            if not sel:
                continue
            t = [r["t"] for r in sel]
            style = dict(linestyle=linestyle, marker="o", markersize=3, color=colours[i],
                         label=f"{name}, {dynamics}" + (" (= ODE(1))" if name == "denoiser" else ""))
            for ax, key in zip(axes, ("corr_mean", "pair_agreement", "rms_error")):
                ax.plot(t, [r[key] for r in sel], **style)
    axes[0].set(xlabel="t (0 noise, 1 data)", ylabel="corr(r(look-ahead at t), r(x_1))", ylim=(-0.05, 1.02),
                title="reward predicted at t vs final reward")
    axes[1].set(xlabel="t", ylabel="judge reads the same pair", ylim=(0, 1.02), title="judge's call agreement")
    axes[2].set(xlabel="t", ylabel="RMS pixel error", title="look-ahead error")
    axes[0].legend(fontsize=7)
    fig.suptitle("solid: along the base ODE (exact flow map = 1 / 1 / 0); dashed: along the base SDE the "
                 "samplers use", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ gated analytic case

GATED_METHODS = ("FMTT flow map", "FMTT ODE(2)", "FMTT ODE(4)", "FMTT denoiser", "FMTT search flow map",
                 "FMTT zero-order flow map", "FK steering diff", "FK steering max", "guidance (no weights)",
                 "best-of-N", "base + IS weights")


def gated_target(width: float = 0.08, floor: float = 1e-3):
    """Two 2-D modes at (+-2, 0), std 0.5; reward flat (log floor) except in four thin cells at (+-2, +-0.5).
    The denoiser shrinks every particle toward a mode's centre, between its two cells, where the reward is
    flat: a denoiser look-ahead sees nothing until late. The exact flow map sees where each particle lands."""
    from bench_analytic import Target

    from fmtt_core.analytic import GaussianMixture, gated_reward, tilt_gated

    mixture = GaussianMixture(torch.ones(2), torch.tensor([[-2.0, 0.0], [2.0, 0.0]]), torch.full((2, 2), 0.25))
    centres = torch.tensor([[2.0, 0.5], [2.0, -0.5], [-2.0, 0.5], [-2.0, -0.5]], dtype=torch.float64)
    hit = lambda x: (torch.cdist(x.double(), centres).min(1).values < 2 * width)  # noqa: E731
    return Target("gated cells", mixture, gated_reward(centres, width, floor),
                  tilt_gated(mixture, centres, width, floor), 1.0, success=hit)


def run_gated(particles, seeds, steps=30, log=print):
    import bench_analytic as ba

    cfg = ba.Config([gated_target()], particles=tuple(particles), seeds=seeds,
                    setting=ba.Setting(steps=steps), reference_samples=2000,
                    methods=[m for m in ba.METHODS if m.name in GATED_METHODS])
    records, references = ba.run_benchmark(cfg, log=log)
    for r in records:  # network passes per particle: forwards + 2 x backwards (the pair bench's unit)
        r["passes_per_particle"] = r.get("nfe_model", steps) + 2 * r.get("nfe_backward", 0.0)
    return records, references["gated cells"]


def gated_markdown(records, ref, steps) -> str:
    import bench_analytic as ba

    rows = ba.summarise(records, {"gated cells": ref})
    counts = sorted({r["N"] for r in rows})
    names = list(dict.fromkeys(r["method"] for r in rows))
    get = {(r["method"], r["N"]): r for r in rows}
    passes = {m: np.mean([r["passes_per_particle"] for r in records if r["method"] == m]) for m in names}
    cell = lambda m, n, key, f: (f"{get[(m, n)][key][0]:{f}} ± {get[(m, n)][key][1]:{f}}"  # noqa: E731
                                 if key in get[(m, n)] else "-")
    lines = [f"Gated analytic case: exact tilted law's success (in a cell) {ref.success_rate:.1%}; {steps} steps, "
             "eta 1; every method with N particles (passes per particle in the second column: the flow map is the "
             f"exact one, charged 1 pass per jump); mean ± std over {get[(names[0], counts[0])]['seeds']} seeds.", "",
             "Success probability of what each method hands on (weighted for weighted samplers, the best sample for "
             "best-of-N, the population for search):", "",
             "| method | passes/particle | " + " | ".join(f"N={n}" for n in counts) + " |",
             "|---|---:|" + "---:|" * len(counts)]
    lines += [f"| {m} | {passes[m]:.0f} | " + " | ".join(cell(m, n, "success", ".1%") for n in counts) + " |"
              for m in names]
    lines += ["", "Energy distance to the exact tilted law (0 = exact; weighted samplers and the i.i.d. floor):", "",
              "| method | " + " | ".join(f"N={n}" for n in counts) + " |", "|---|" + "---:|" * len(counts)]
    lines += [f"| {m} | " + " | ".join(cell(m, n, "energy", ".3f") for n in counts) + " |"
              for m in names if "energy" in get[(m, counts[0])]]
    return "\n".join(lines) + "\n"


def gated_plot(records, ref, path: Path) -> None:
    import bench_analytic as ba

    plt = _plt()
    rows = ba.summarise(records, {"gated cells": ref})
    fig, (ax_s, ax_e) = plt.subplots(1, 2, figsize=(11, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(dict.fromkeys(r["method"] for r in rows)):
        sel = sorted((r for r in rows if r["method"] == name), key=lambda r: r["N"])
        per = np.mean([r["passes_per_particle"] for r in records if r["method"] == name])
        x = [r["N"] * per for r in sel]
        style = "-" if name.startswith("FMTT") else "--"
        if name.startswith("i.i.d."):
            style = ":"
        look = dict(marker="o", markersize=3, label=name, color=colours[i % len(colours)])
        ax_s.plot(x, [r["success"][0] for r in sel], style, **look)
        if "energy" in sel[0]:  # the same colour in both panels
            ax_e.plot(x, [max(r["energy"][0], 1e-4) for r in sel], style, **look)
    ax_s.axhline(ref.success_rate, color="k", linewidth=0.8)
    ax_s.set(xscale="log", xlabel="network passes per run", ylabel="success (in a cell)",
             title="gated cells: success (line: exact tilted law)")
    ax_e.set(xscale="log", yscale="log", xlabel="network passes per run", ylabel="energy distance",
             title="error to the exact tilted law")
    handles, labels = ax_s.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main

def replot(folder: Path) -> int:
    import json

    if (folder / "pairs_accuracy.json").is_file():
        rows = json.loads((folder / "pairs_accuracy.json").read_text())
        accuracy_plot(rows, list(dict.fromkeys(r["constraint"] for r in rows)), folder / "pairs_accuracy.png")
    if (folder / "pairs_lookahead.json").is_file():
        lookahead_plot(json.loads((folder / "pairs_lookahead.json").read_text()), folder / "pairs_lookahead.png")
    if (folder / "pairs_gated.json").is_file():
        import bench_analytic as ba
        gated_plot(json.loads((folder / "pairs_gated.json").read_text()), ba.Reference.of(gated_target(), 2000),
                   folder / "pairs_gated.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "accuracy", "lookahead", "gated"), default="all")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one budget, two seeds, two constraints, 20 steps")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default bench/results, with --quick "
                                                               "bench/results/quick)")
    parser.add_argument("--replot", action="store_true", help="redraw the plots from the JSON files in --out")
    parser.add_argument("--eta", type=float, default=1.0, help="SDE noise of every sampler (accuracy part)")
    parser.add_argument("--beta", type=float, default=REWARD_SCALE, help="reward scale (accuracy part)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the methods (accuracy part)")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.out or RESULTS)
    try:
        args.out = output_folder(args.out, args.quick)
    except ValueError as e:
        parser.error(str(e))
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    models = load_pair_models()
    if args.part in ("all", "accuracy"):
        if args.quick:
            budgets, seeds, constraints, steps = QUICK["budgets"], QUICK["seeds"], QUICK["constraints"], QUICK["steps"]
        else:
            budgets, seeds, constraints, steps = BUDGETS, range(args.seeds), CONSTRAINTS, STEPS
        print(f"accuracy: constraints {constraints}, FMTT particles {budgets}, seeds {list(seeds)}, {steps} steps")
        methods = args.methods.split(",") if args.methods else PAIR_METHODS
        rows = run_accuracy(budgets, seeds, constraints, steps, methods, models=models, eta=args.eta,
                            reward_scale=args.beta)
        # Non-default knobs get their own files, so the default table stays.
        stem = "pairs_accuracy" + ("" if (args.eta, args.beta) == (1.0, REWARD_SCALE) else
                                   f"_eta{args.eta:g}_beta{args.beta:g}")
        (args.out / f"{stem}.json").write_text(rows_json(rows))
        md = accuracy_markdown(rows, constraints, steps, args.eta, args.beta)
        (args.out / f"{stem}.md").write_text(md)
        accuracy_plot(rows, constraints, args.out / f"{stem}.png")
        print(md)
    if args.part in ("all", "lookahead"):
        trajectories = QUICK["trajectories"] if args.quick else 512
        times = QUICK["times"] if args.quick else LOOKAHEAD_TIMES
        rows = run_lookahead(trajectories, times, CONSTRAINTS, models=models)
        (args.out / "pairs_lookahead.json").write_text(rows_json(rows))
        md = lookahead_markdown(rows, trajectories)
        (args.out / "pairs_lookahead.md").write_text(md)
        lookahead_plot(rows, args.out / "pairs_lookahead.png")
        print(md)
    if args.part in ("all", "gated"):
        particles, seeds, steps = ((16, 64), 2, 12) if args.quick else ((16, 64, 256), args.seeds, 30)
        records, ref = run_gated(particles, seeds, steps)
        (args.out / "pairs_gated.json").write_text(rows_json([{k: v for k, v in r.items() if k != "mean_vec"}
                                                               for r in records]))
        md = gated_markdown(records, ref, steps)
        (args.out / "pairs_gated.md").write_text(md)
        gated_plot(records, ref, args.out / "pairs_gated.png")
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

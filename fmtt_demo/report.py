"""What `fmtt demo` writes: the table on stdout, samples.png, traces.png, results.json and results.md."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .methods import MethodRun, draw_handed_on


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def format_table(runs: list[MethodRun], target_class: int | None, n_out: int) -> str:
    header = ["method", "particles", f"judge acc ({target_class})" if target_class is not None else "judge acc",
              "reward clf acc", "judge conf", "mean reward", "final ESS", "resampled", "NFE den/look/bwd/rew", "passes", "wall s"]  # noqa: E501
    rows = []
    for run in runs:
        m, nfe = run.metrics, run.result.nfe
        rows.append([
            run.method.label, str(run.particles), _fmt(m.get("judge_accuracy"), ".1%"),
            _fmt(m.get("reward_classifier_accuracy"), ".1%"), _fmt(m["judge_confidence"], ".2f"),
            _fmt(m["mean_reward"], ".3f"), _fmt(m["final_ess"], ".2f"), str(m["resamples"]),
            f"{nfe.denoiser}/{nfe.lookahead}/{nfe.backward}/{nfe.reward}", str(run.passes), f"{run.seconds:.1f}"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells):  # method names left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    out.append(f"Metrics are expectations over the {n_out} samples each method hands on; final ESS is a fraction "
               "of the particles (weighted samplers only); passes = network passes (forward 1, backward 2).")
    return "\n".join(out)


def markdown_table(runs: list[MethodRun], target_class: int | None) -> str:
    acc = f"judge acc (class {target_class})" if target_class is not None else "judge acc"
    lines = [(f"| method | particles | {acc} | reward clf acc | judge conf | mean reward | final ESS | resampled | "
             "passes | wall s |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        m = run.metrics
        lines.append(f"| {run.method.label} | {run.particles} | {_fmt(m.get('judge_accuracy'), '.1%')} | "
                     f"{_fmt(m.get('reward_classifier_accuracy'), '.1%')} | "
                     f"{_fmt(m['judge_confidence'], '.2f')} | {_fmt(m['mean_reward'], '.3f')} | "
                     f"{_fmt(m['final_ess'], '.2f')} | {m['resamples']} | {run.passes} | {run.seconds:.1f} |")
    return "\n".join(lines)


def to_image(x: torch.Tensor) -> np.ndarray:
    """[1, H, W] in [-1, 1] -> [H, W] ink in [0, 1] (1 = full ink, drawn dark)."""
    return ((x[0].clamp(-1, 1) + 1) / 2).cpu().numpy()


def asked_for(settings: dict) -> str:
    """What the run asked for, in words: the samples plot's title."""
    goal = (f"steer toward digit {settings['target_class']}" if settings.get("target_class") is not None
            else f"steer toward {settings.get('reward_description', settings.get('reward', 'the reward'))}")
    return (f"{goal} (beta {settings['reward_scale']:g}, {settings['steps']} steps, seed {settings['seed']}); "
            f"FMTT with {settings['particles']} particles, the others at the same network budget")


def save_samples_grid(runs: list[MethodRun], path: Path, per_row: int = 16, seed: int = 0,
                      title: str | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(per_row * 0.55 + 2.6, len(runs) * 0.75 + 0.3 + 0.4 * bool(title)),
                             squeeze=False)
    if title:
        fig.suptitle(title, fontsize=9)
    for ax, run in zip(axes[:, 0], runs):
        shown = draw_handed_on(run.method, run.result, per_row, seed)
        h, w = shown.shape[-2:]  # 8x8 digits, 8x16 pairs
        strip = np.ones((h, per_row * (w + 1) - 1))
        for i, x in enumerate(shown):
            strip[:, i * (w + 1):i * (w + 1) + w] = 1 - to_image(x)
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        acc = run.metrics.get("judge_accuracy")
        label = run.method.label + (f"\njudge {acc:.0%}" if acc is not None else "")
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_traces_plot(runs: list[MethodRun], path: Path) -> dict[str, list[str]]:
    """Weighted mean look-ahead reward r(X_{t,1}(x_t)), ESS / N (markers at resampling) and the Eulerian
    defect r_{t+h}(x + h b) - r_t(x) (how far each look-ahead is from the base flow map) against t.
    Returns the methods drawn in each panel ("reward", "ess", "defect")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The ESS panel only when a run carries weights (search and best-of-N select instead: nothing to draw);
    # the defect panel only when a run measured it.
    weighted = any(run.method.hands_on == "weights" for run in runs)
    measured = any(np.isfinite([s.defect for s in run.result.trace]).any() for run in runs)
    panels = 1 + weighted + measured
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax_r = axes[0, 0]
    ax_e = axes[0, 1] if weighted else None
    ax_d = axes[0, panels - 1] if measured else None
    unmeasured = []
    for run in runs:
        trace = run.result.trace
        t = np.array([s.t for s in trace])
        reward = np.array([s.reward_mean for s in trace])
        if not np.isfinite(reward).any():
            unmeasured.append(run.method.label)  # no look-ahead (base sampling, best-of-N): nothing to draw
            continue
        (line,) = ax_r.plot(t, reward, label=run.method.label)
        if ax_e is not None and run.method.hands_on == "weights":
            ess = np.array([s.ess for s in trace]) / run.particles
            ax_e.plot(t, ess, color=line.get_color(), label=run.method.label)
            hit = np.array([s.resampled for s in trace])
            ax_e.plot(t[hit], ess[hit], "v", color=line.get_color(), markersize=4)
        defect = np.array([s.defect for s in trace])
        if ax_d is not None and np.isfinite(defect).any():
            ax_d.plot(t, defect, color=line.get_color(), label=run.method.label)
    ax_r.set(xlabel="t (0 noise, 1 data)", ylabel="mean look-ahead reward", title="reward of the predicted sample")
    ax_r.legend(fontsize=7)
    if unmeasured:
        ax_r.text(0.01, 0.01, "no look-ahead, not drawn: " + ", ".join(unmeasured), transform=ax_r.transAxes,
                  fontsize=7, color="0.35")
    if ax_e is not None:
        ax_e.set(xlabel="t", ylabel="ESS / N", ylim=(0, 1.05), title="effective sample size (v = resampled)")
        ax_e.legend(fontsize=7)
    if ax_d is not None:
        # An RMS: from 0 up, in plain numbers (matplotlib would read the r_{t+h} label as TeX).
        ax_d.set(xlabel="t", ylabel="RMS change of the look-ahead reward over a step", ylim=(0, None),
                 title="Eulerian defect (0: look-ahead = base flow map)")
        ax_d.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax_d.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {name: [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
            for name, ax in (("reward", ax_r), ("ess", ax_e), ("defect", ax_d)) if ax is not None}


def results_dict(runs: list[MethodRun], settings: dict) -> dict:
    return {"settings": settings, "methods": [{
        "key": run.method.key, "label": run.method.label, "particles": run.particles, "seconds": round(run.seconds, 3),
        "network_passes": run.passes, "nfe": run.result.nfe.as_dict(), **run.metrics,
        "thermodynamic_length": run.result.thermodynamic_length,
        "trace": [{"t": s.t, "ess": s.ess, "resampled": s.resampled, "reward_mean": s.reward_mean,
                   "reward_max": s.reward_max, "defect": s.defect} for s in run.result.trace]} for run in runs]}


def strict_json(value):
    """NaN and infinities become null: JSON has no such numbers (JSON.parse and strict parsers refuse them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_results(runs: list[MethodRun], settings: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"samples": out / "samples.png", "traces": out / "traces.png", "results": out / "results.json",
             "table": out / "results.md"}
    save_samples_grid(runs, paths["samples"], seed=settings.get("seed", 0), title=asked_for(settings))
    save_traces_plot(runs, paths["traces"])
    paths["results"].write_text(json.dumps(strict_json(results_dict(runs, settings)), indent=2, allow_nan=False) + "\n")
    paths["table"].write_text(markdown_table(runs, settings.get("target_class")) + "\n")
    return paths

"""What the steering did, for people: a plot (reward, ESS, resampling events over the steps) and a text summary
with the NFE breakdown, the memory plan and the run's warnings. Drawn with Pillow (a ComfyUI dependency) so the
pack needs no plotting library."""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass
class Diagnostics:
    """Filled by the sampler each time it runs; read by the diagnostics node (FMTT_DIAGNOSTICS)."""

    runs: list = field(default_factory=list)  # one fmtt_core FMTTResult per population
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    sigmas: list = field(default_factory=list)
    memory: str = ""  # the chunk size chosen and why (fmtt_core.memory.MemoryPlan)
    warnings: list = field(default_factory=list)  # what went wrong in this run, in words for the user
    devices: str = ""  # how the particles were spread over MultiGPU devices ("" : one device)

    def reset(self, settings: dict, sigmas, memory: str = "") -> None:
        self.runs, self.settings, self.seconds, self.sigmas = [], settings, 0.0, [float(s) for s in sigmas]
        self.memory, self.warnings, self.devices = memory, [], ""

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

WIDTH, PANEL_H, MARGIN = 640, 200, 48
COLORS = {"mean": (31, 119, 180), "max": (255, 127, 14), "ess": (44, 160, 44), "resample": (214, 39, 40),
          "threshold": (150, 150, 150), "axis": (60, 60, 60)}


def _panel(draw, top, title, series, y_range, steps, events=(), hline=None):
    """One chart: series = [(label, color, values)], drawn over the step axis."""
    font = ImageFont.load_default()
    left, right, bottom = MARGIN + 24, WIDTH - 16, top + PANEL_H - 28
    y0, y1 = y_range
    span = (y1 - y0) or 1.0

    def px(i, v):
        x = left + (right - left) * (i / max(steps - 1, 1))
        y = bottom - (bottom - top - 20) * ((v - y0) / span)
        return x, y

    draw.rectangle([left, top + 20, right, bottom], outline=COLORS["axis"])
    draw.text((left, top + 4), title, fill=COLORS["axis"], font=font)
    draw.text((4, top + 16), f"{y1:.3g}", fill=COLORS["axis"], font=font)
    draw.text((4, bottom - 10), f"{y0:.3g}", fill=COLORS["axis"], font=font)
    for i in events:
        x, _ = px(i, y0)
        draw.line([x, top + 20, x, bottom], fill=COLORS["resample"], width=1)
    if hline is not None:
        draw.line([px(0, hline), px(steps - 1, hline)], fill=COLORS["threshold"], width=1)
    draw.text((left, bottom + 2), "step 1", fill=COLORS["axis"], font=font)
    draw.text((right - 48, bottom + 2), f"step {steps}", fill=COLORS["axis"], font=font)
    legend_x = right - sum(7 * len(label) + 24 for label, _, _ in series)
    for label, color, values in series:
        pts = [px(i, v) for i, v in enumerate(values) if math.isfinite(v)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
        draw.text((legend_x, top + 4), label, fill=color, font=font)
        legend_x += 7 * len(label) + 24


def _range(values):
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 0.05
    return lo - pad, hi + pad


def plot(diag: Diagnostics) -> torch.Tensor:
    """IMAGE [1, H, W, 3] in [0, 1]: reward (weighted mean and max of the look-ahead reward), ESS / N with the
    resampling threshold, and resampling / selection events (red lines), population 0 solid; the run's
    warnings in red below."""
    notes = [line for w in diag.warnings for line in textwrap.wrap("! " + w, width=WIDTH // 7 - 4)]
    height = 2 * PANEL_H + 36 + 14 * len(notes)
    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    if not diag.runs:
        draw.text((MARGIN, PANEL_H), "FMTT: no sampling run recorded yet.", fill=COLORS["axis"])
    else:
        run = diag.runs[0]
        steps = len(run.trace)
        n = run.log_weights.numel()
        mean = [s.reward_mean for s in run.trace]
        best = [s.reward_max for s in run.trace]
        ess = [s.ess / n for s in run.trace]
        events = [i for i, s in enumerate(run.trace) if s.resampled]
        _panel(draw, 0, "look-ahead reward r(X_t,1) per step", [("mean (weighted)", COLORS["mean"], mean),
               ("max", COLORS["max"], best)], _range(mean + best), steps, events)
        _panel(draw, PANEL_H, "ESS / particles (red lines: resampling or selection; grey: threshold)",
               [("ESS/N", COLORS["ess"], ess)], (0.0, 1.05), steps, events, hline=diag.settings.get("ess_threshold"))
        draw.text((MARGIN, 2 * PANEL_H + 8), f"steps 1..{steps}   particles {n}   {run.method}",
                  fill=COLORS["axis"])
    for i, line in enumerate(notes):
        draw.text((8, 2 * PANEL_H + 30 + 14 * i), line, fill=COLORS["resample"])
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def _settings_lines(diag: Diagnostics) -> list[str]:
    s, run = diag.settings, diag.runs[0]
    return [f"FMTT {s.get('mode')} | reward: {s.get('reward')} x {s.get('reward_scale')} | "
            f"look-ahead: {s.get('lookahead')}",
            f"{len(diag.runs)} population(s) x {run.log_weights.numel()} particles, {len(run.trace)} steps, "
            f"eta {s.get('eta')}, {s.get('sde_step')} SDE step, ESS threshold {s.get('ess_threshold')}, "
            f"{s.get('resampling')} resampling, "
            f"output: {s.get('output')}",
            f"time {diag.seconds:.1f} s; memory: {diag.memory or 'not planned'}"] + (
            [f"MultiGPU: particles per step on {diag.devices}"] if diag.devices else [])


def _population_line(b: int, run) -> str:
    """Final rewards, ESS and resampling of one population, as the core's result reports them."""
    r = run.rewards.double()
    ok = torch.isfinite(r)
    if ok.any():
        w = run.weights.double()[ok]
        rewards = (f"best {float(r[run.best_index]):.4g}, mean {float(r[ok].mean()):.4g}, weighted mean "
                   f"{float((w * r[ok]).sum() / w.sum()):.4g}")
    else:
        rewards = "not finite"
    rules = getattr(run, "rule_counts", {})
    share = getattr(run, "approximate_share", math.nan)
    split = (f"; weights per step: {', '.join(f'{k} {v}' for k, v in rules.items())} ({share:.0%} approximate: "
             "Jarzynski steps, O(h) bias)") if rules else ""
    return (f"[{b}] final reward {rewards}; final ESS {run.ess:.2f}/{run.log_weights.numel()}; {run.n_resamples} "
            f"resampling/selection step(s); thermodynamic length {run.thermodynamic_length:.3g}{split}")


def _nfe_lines(diag: Diagnostics) -> list[str]:
    """The core's NFE counters, summed over the populations."""
    total = type(diag.runs[0].nfe)()
    for run in diag.runs:
        for k, v in vars(run.nfe).items():
            total.add(k, v)
    particles = sum(run.log_weights.numel() for run in diag.runs)
    return [f"NFE (particle-evaluations): {total}",
            "NFE per particle: " + ", ".join(f"{k} {v:.1f}" for k, v in total.per_particle(particles).items())]


def eulerian_defect_line(run) -> str:
    """The core's Eulerian-defect diagnostic (StepTrace.defect, FMTTResult.max_defect): how far the look-ahead
    is from the base flow map along the run, i.e. whether cheap Eulerian weights would hold."""
    defect = getattr(run, "max_defect", math.nan)
    if math.isnan(defect):
        return "    Eulerian defect: not measured (advective steps or defect_probe > 0 measure it)"
    return (f"    Eulerian defect max {defect:.3g} (reward units per step; 0 = the look-ahead is the base flow map, "
            "so Eulerian weights would hold)")


def summary(diag: Diagnostics) -> str:
    """Plain-text report of the last run: settings, memory plan, rewards, ESS, resampling, where the compute went,
    and the run's warnings."""
    if not diag.runs:
        text = "FMTT: no sampling run recorded yet (connect the sampler's output latent so this runs after it)."
        return "\n".join([text] + [f"WARNING: {w}" for w in diag.warnings])
    populations = [line for b, run in enumerate(diag.runs) for line in (_population_line(b, run),
                                                                         eulerian_defect_line(run))]
    lines = _settings_lines(diag) + populations + _nfe_lines(diag)
    return "\n".join(lines + [f"WARNING: {w}" for w in diag.warnings])

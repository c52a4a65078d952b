"""What the steering did, for people: a plot (reward, ESS, resampling events over the steps) and a text summary
with the NFE breakdown. Drawn with Pillow (a ComfyUI dependency) so the pack needs no plotting library."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .sampler import Diagnostics

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
    resampling threshold, and resampling / selection events (red lines), population 0 solid."""
    height = 2 * PANEL_H + 36
    img = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(img)
    if not diag.runs:
        draw.text((MARGIN, height // 2), "FMTT: no sampling run recorded yet.", fill=COLORS["axis"])
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
        _panel(draw, PANEL_H, "ESS / particles (red lines: resampling or selection; grey: threshold)", [("ESS/N", COLORS["ess"], ess)],
               (0.0, 1.05), steps, events, hline=diag.settings.get("ess_threshold"))
        draw.text((MARGIN, 2 * PANEL_H + 8), f"steps 1..{steps}   particles {n}   {run.method}",
                  fill=COLORS["axis"])
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def eulerian_defect_line(run) -> str:
    """The core's Eulerian-defect diagnostic (StepTrace.defect, FMTTResult.max_defect): how far the look-ahead
    is from the base flow map along the run, i.e. whether cheap Eulerian weights would hold."""
    defect = getattr(run, "max_defect", math.nan)
    if math.isnan(defect):
        return "    Eulerian defect: not measured (weights 'advective' or defect_probe > 0 measure it)"
    return (f"    Eulerian defect max {defect:.3g} (reward units per step; 0 = the look-ahead is the base flow map, "
            "so Eulerian weights would hold)")


def summary(diag: Diagnostics) -> str:
    """Plain-text report of the last run: settings, rewards, ESS, resampling and where the compute went."""
    if not diag.runs:
        return "FMTT: no sampling run recorded yet (connect the sampler's output latent so this runs after it)."
    s = diag.settings
    n = diag.runs[0].log_weights.numel()
    lines = [f"FMTT {s.get('mode')} | reward: {s.get('reward')} x {s.get('reward_scale')} | "
             f"look-ahead: {s.get('lookahead')}",
             f"{len(diag.runs)} population(s) x {n} particles, {len(diag.runs[0].trace)} steps, eta {s.get('eta')}, "
             f"ESS threshold {s.get('ess_threshold')}, {s.get('resampling')} resampling, output: {s.get('output')}",
             f"time {diag.seconds:.1f} s"]
    for b, run in enumerate(diag.runs):
        r = run.rewards.double()
        finite = r[torch.isfinite(r)]
        w = run.weights.double()
        weighted = float((w[torch.isfinite(r)] * finite).sum() / w[torch.isfinite(r)].sum()) if finite.numel() else math.nan
        best = f"{float(finite.max()):.4g}" if finite.numel() else "nan"
        mean = f"{float(finite.mean()):.4g}" if finite.numel() else "nan"
        lines.append(f"[{b}] final reward best {best}, mean {mean}, weighted mean {weighted:.4g}; final ESS "
                     f"{run.ess:.2f}/{n}; {run.n_resamples} resampling/selection step(s); thermodynamic length "
                     f"{run.thermodynamic_length:.3g}")
        lines.append(eulerian_defect_line(run))
    total = {k: sum(getattr(run.nfe, k) for run in diag.runs) for k in
             ("denoiser", "lookahead", "decoder", "reward", "backward")}
    particles = n * len(diag.runs)
    lines.append("NFE (particle-evaluations): " + ", ".join(f"{k} {v}" for k, v in total.items())
                 + f"; model total {total['denoiser'] + total['lookahead']}")
    lines.append("NFE per particle: " + ", ".join(f"{k} {v / particles:.1f}" for k, v in total.items()))
    return "\n".join(lines)

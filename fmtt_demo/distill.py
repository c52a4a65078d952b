"""`fmtt distill`: distil the digits demo's velocity model into a two-time flow map with fmtt_core's trainer.

    fmtt distill --out runs/my_map                       # LSD, the settings below; a new folder, never the shipped one
    fmtt distill --out runs/my_map --resume --steps 8000  # continue a stopped run (or extend a finished one)
    torchrun --nproc-per-node 2 -m fmtt_demo.cli distill --out runs/ddp   # data-parallel, same global batch

Teacher: the bundled VelocityNet v(x, t) (or --weights). Student: a FlowMapNet started at one Euler step
(u(x, s, t) = v(x, s)). Data: the digits "train" split, dequantised within one ink level, noised by the core's
interpolant. The folder gets state.safetensors (resumable), flow_map.safetensors, copies of the other three demo
networks (so `fmtt demo --weights OUT` runs FMTT with the distilled map) and metrics.json: the look-ahead errors
against the teacher's fine ODE end point on the same held-out trajectories as the bundled map's model card, beside
the bundled map's own figures.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fmtt_core.errors import FMTTInputError
from fmtt_core.flow_maps import DistillSettings, FlowMapTrainer

from .data import split_digits
from .models import WEIGHT_FILES, WEIGHTS_DIR, FlowMapNet, load_model, save_model
from .train import LEVEL, TrainConfig, lookahead_errors

DEFAULT_OUT = Path("fmtt_distill_out")
# What `fmtt distill` runs unless told otherwise: the figures in docs/training.md come from these. LSD with the
# gradient through the finite difference: FMRG's detached form diverged on this network (its time features reach
# frequency 142, which the stop-gradient iteration u <- b - (t - s) du/dt amplifies; see lsd_loss).
DIGITS_DEFAULTS = dict(objective="lsd", steps=3000, batch=128, lr=5e-4, lr_warmup_steps=200, grad_clip=1.0,
                       ema_decay=0.999, min_gap=0.0, shift=1.0, both_directions=False, fd_step=5e-3,
                       derivative_grad=True, derivative_warmup_steps=1000, norm="l1", seed=0, save_every=500,
                       log_every=100)
EVAL_SEED = 1000  # the held-out trajectories of the bundled model card (train.py: seed 0 + 1000)


def check_out(out: Path, resume: bool) -> None:
    """Never write over the shipped weights; never start afresh over a run that could be resumed."""
    if out.resolve() == WEIGHTS_DIR.resolve():
        raise FMTTInputError(f"--out {out} is the package's shipped weights folder; give a new folder.")
    if out.exists() and not out.is_dir():
        raise FMTTInputError(f"--out {out} is an existing file; give a folder (it is created if missing).")
    state = out / "state.safetensors"
    if resume and not state.is_file():
        raise FMTTInputError(f"--resume: {state} does not exist; start without --resume, or point --out at the "
                             "folder of the run to continue.")
    if not resume and state.is_file():
        raise FMTTInputError(f"{out} already holds a distillation run; pass --resume to continue it, or give "
                             "another --out.")


def digits_data(seed: int = 0):
    """(n, generator) -> n training digits, dequantised within one ink level (as the velocity was trained)."""
    images = split_digits(seed)["train"][0]

    def draw(n: int, generator: torch.Generator) -> torch.Tensor:
        x1 = images[torch.randint(images.shape[0], (n,), generator=generator)]
        return x1 + LEVEL * (torch.rand(x1.shape, generator=generator) - 0.5)

    return draw


def make_trainer(settings: DistillSettings, *, weights: Path | None = None, out: Path | None = None,
                 on_log=None) -> FlowMapTrainer:
    teacher = load_model("velocity", weights)
    student = FlowMapNet(**teacher.config)
    student.init_from_velocity(teacher)
    return FlowMapTrainer(student, teacher, digits_data(), settings, student=student.average_velocity,
                          out_dir=out, on_log=on_log)


@torch.no_grad()
def evaluate(flow_map: FlowMapNet, weights: Path | None, trajectories: int) -> dict:
    """Look-ahead errors of `flow_map` and of the bundled map on the same held-out teacher trajectories."""
    velocity, judge = load_model("velocity", weights), load_model("judge", weights)
    cfg = TrainConfig(eval_trajectories=trajectories, teacher_steps=64)
    ours = lookahead_errors(velocity, flow_map, judge, cfg, torch.Generator().manual_seed(EVAL_SEED))
    bundled = lookahead_errors(velocity, load_model("flow_map", weights), judge, cfg,
                               torch.Generator().manual_seed(EVAL_SEED))
    return {"distilled": ours, "bundled": bundled}


def distill_digits(out: Path = DEFAULT_OUT, *, settings: DistillSettings | None = None, weights: Path | None = None,
                   resume: bool = False, eval_trajectories: int = 1024, log=print) -> dict | None:
    """Run (or resume) the distillation; rank 0 writes the folder and returns the metrics (None on other ranks)."""
    settings = settings or DistillSettings(**DIGITS_DEFAULTS)
    out = Path(out)
    check_out(out, resume)

    def on_log(r):
        log(f"step {r['step']}/{r['steps']}  loss {r['loss']:.4f}  derivative weight {r['derivative_weight']:.2f}"
            f"  lr {r['lr']:.2e}  {1000 * r['seconds_per_step']:.1f} ms/step")

    trainer = make_trainer(settings, weights=weights, out=out, on_log=on_log)
    if trainer.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.resume(out)
        log(f"resumed at step {trainer.step}")
    start, first_step = time.perf_counter(), trainer.step
    trainer.run()
    seconds = time.perf_counter() - start
    if trainer.rank != 0:
        return None
    flow_map = trainer.trained_module().eval()
    save_model(flow_map, out / WEIGHT_FILES["flow_map"], distilled=asdict(settings))
    for kind in ("velocity", "classifier", "judge"):  # `fmtt demo --weights OUT` needs all four networks
        shutil.copyfile(Path(weights or WEIGHTS_DIR) / WEIGHT_FILES[kind], out / WEIGHT_FILES[kind])
    log("evaluating the look-ahead against the teacher's fine ODE end point")
    metrics = {"settings": asdict(settings), "processes": trainer.world, "steps_this_run": trainer.step - first_step,
               "train_seconds_this_run": round(seconds, 1), "threads": torch.get_num_threads(),
               "final_loss_mean_last_100": sum(trainer.losses[-100:]) / len(trainer.losses[-100:]),
               "lookahead_error": evaluate(flow_map, weights, eval_trajectories)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def summary_table(metrics: dict) -> str:
    """Markdown: RMS of 1 / 2 / 4 jumps from each start time, distilled against bundled."""
    rows = ["| t | distilled 1 jump | bundled 1 jump | distilled 4 jumps | bundled 4 jumps | denoiser |",
            "|---|---|---|---|---|---|"]
    ours, ref = metrics["lookahead_error"]["distilled"]["table"], metrics["lookahead_error"]["bundled"]["table"]
    for t, row in ours.items():
        cells = [row["flow_map_1"], ref[t]["flow_map_1"], row["flow_map_4"], ref[t]["flow_map_4"], row["denoiser"]]
        rows.append(f"| {t} | " + " | ".join(f"{c['rms']:.4f}" for c in cells) + " |")
    return "\n".join(rows)

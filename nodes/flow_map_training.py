"""Distilling the loaded MODEL into a two-time flow map, inside ComfyUI's sampling machinery.

The loss and the loop are fmtt_core's (flow_maps.distill, flow_maps.trainer: LSD / PSD, time pairs, exact resume);
this module only supplies the student and the teacher as the loaded model seen through ComfyUI's guider:

  teacher b_t(x)       = (D(x, t) - x) / (1 - t)                        the base model, two-time adapter off
  student u(x, s, t)   = (D2(x; s, t) - x) / (1 - s)                    the same call with the adapter active
  X_{s,t}(x)           = x + (t - s) u = one Euler step of sigma' - sigma in ComfyUI's sampling space

D is ComfyUI's denoised output (cfg and conditioning applied by the guider), in the core clock (t = 0 noise, 1 data;
nodes/clocks.py). The whole run happens inside one CFGGuider.sample call whose sampler function trains instead of
sampling: ComfyUI loads the model and encodes the conditioning exactly as for sampling, once.

Data: clean latents from ComfyUI's dataset nodes (one conditioning per latent, or one for all), or made by the
model itself (data-free): a pool of the teacher's own samples, each `ode_steps` Euler steps from noise.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch

from ..fmtt_core import FMTTInputError
from ..fmtt_core.clock import velocity_from_denoiser
from ..fmtt_core.flow_maps.distill import flow_map_from_student
from ..fmtt_core.flow_maps.trainer import DistillSettings, FlowMapTrainer, held_out_summary
from ..fmtt_core.flow_maps.two_time_file import save_two_time_lora
from ..fmtt_core.memory import FMTTMemoryError, measure_pass, mib
from . import memory_guard
from .autograd import block_lists, differentiable
from .clocks import clock_of, family_of, guided_parts
from .flux_flow_map import write_fmrg_format
from .two_time import TwoTimeAdapter, model_fingerprint

PREVIEW_JUMPS = (1, 2, 4)
# Samples (each with its own time pair) of the fixed held-out batch the objective is tracked on. A sample's objective
# is mostly set by its time pair (near-diagonal pairs ~0.05, pairs far apart ~1-2 on the tiny SD3), so the mean over
# 16 had a standard error of ~0.12 on SD3, larger than what 60 steps change; 64 bring the paired change's to ~0.02.
EVAL_BATCH = 64
T_MARGIN = 1e-4  # the model is never called at t = 1 exactly, where (D - x) / (1 - t) is 0 / 0
TRAINED_COPIES = 4  # per trained weight: the weight, its gradient and AdamW's two moments
# What the measured step does not see: the allocator keeping freed blocks, the held-out evaluation and previews
# between steps. Without it the measured estimate ran 0.91-0.97x of the peak on 3 of 9 bench rows
# (bench/results/train_node.md); the sampler's whole-run estimate lands at 1.16-1.37x without a margin.
ALLOCATOR_SLACK = 1.25


@dataclass
class TrainingData:
    """Clean latents x1 in the model's sampling space (process_latent_in applied) and the conditioning of each."""

    x1: torch.Tensor | None                 # [N, C, H, W]; None: data-free, made by the teacher
    caption: torch.Tensor                   # [N] index into positives (data-free: [pool] zeros)
    positives: list                         # CONDITIONINGs
    negative: list
    shape: tuple                            # one latent's [C, H, W]


@dataclass
class Report:
    losses: list = field(default_factory=list)
    lookahead_error: dict = field(default_factory=dict)   # {"step N": {"denoiser": e, "1 jump": e, ...}}
    # {"step N": held_out_summary of the objective on one fixed held-out batch: mean (the objective's estimate), se,
    #  median, and the paired change from the first evaluation of the run with its se}
    eval_loss: dict = field(default_factory=dict)
    saved: list = field(default_factory=list)
    stopped_at: int | None = None
    seconds_per_step: list = field(default_factory=list)  # wall time of each step run here (bench_train_node.py)
    memory_estimate: int = 0  # bytes one training step was estimated to need (check_memory)


def training_data(latents: list | None, positives: list, negative, width: int, height: int, channels: int,
                  pool: int) -> TrainingData:
    """From the node's inputs: dataset latents (each LATENT a batch) and their conditionings, or data-free."""
    if negative is None:
        negative = [[torch.zeros_like(c[0]), dict(c[1])] for c in positives[0]]
    if latents is None:
        if len(positives) != 1:
            raise FMTTInputError("FMTT Train Flow Map: data-free training takes one conditioning (a prompt); connect "
                                 "latents from a dataset to train on several captions.")
        return TrainingData(None, torch.zeros(pool, dtype=torch.long), positives, negative,
                            (channels, height // 8, width // 8))
    samples = [lat["samples"] for lat in latents if lat is not None and lat.get("samples") is not None]
    rows = [s for batch in samples for s in batch]
    if not rows:
        raise FMTTInputError("FMTT Train Flow Map: the dataset holds no images (0 latents). Point the image loader "
                             "at a folder with images (.png / .jpg / .webp), or disconnect 'latents' to train "
                             "data-free from the prompt.")
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) > 1:
        raise FMTTInputError(f"FMTT Train Flow Map: the dataset's latents have {len(shapes)} sizes "
                             f"({sorted(shapes)[:3]}); resize the images to one size (e.g. Resize Images by Shorter "
                             "Edge + Crop Images) before encoding.")
    if len(positives) not in (1, len(rows)):
        raise FMTTInputError(f"FMTT Train Flow Map: {len(positives)} conditionings for {len(rows)} images; give one "
                             "per image (a caption each) or a single one for all.")
    caption = torch.arange(len(rows)) if len(positives) > 1 else torch.zeros(len(rows), dtype=torch.long)
    if rows[0].shape[0] != channels:
        raise FMTTInputError(f"FMTT Train Flow Map: the dataset's latents have {rows[0].shape[0]} channels, the "
                             f"model's latent space {channels}; encode the images with this model's VAE.")
    return TrainingData(torch.stack(rows).float(), caption, positives, negative, tuple(rows[0].shape))


class GuidedModel:
    """The loaded model as the core's denoiser D(x_lin, t), one conditioning per row (grouped into calls)."""

    def __init__(self, model_fn, guider, base, data: TrainingData, noise: torch.Tensor, seed: int):
        self.model_fn, self.guider, self.base = model_fn, guider, base
        self.clock = clock_of(base.model_sampling, family_of(base))
        ms = base.model_sampling
        self.t_lo = float(self.clock.t(torch.tensor(float(ms.sigma_max))))
        self.conds = [comfy.samplers.process_conds(
            base, noise, {"positive": comfy.sampler_helpers.convert_cond(p),
                          "negative": comfy.sampler_helpers.convert_cond(data.negative)},
            noise.device, seed=seed) for p in data.positives]
        self.rows = None  # the conditioning index of each row of the current batch

    def model_t(self, t: torch.Tensor) -> torch.Tensor:
        """Times the model is called at: inside its sigma range, never t = 1 (the velocity's 0 / 0)."""
        return t.clamp(self.t_lo, 1 - T_MARGIN)

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = self.model_t(t.to(x.device))  # times and row indices are drawn on the CPU; the model runs where x is
        rows = (self.rows if self.rows is not None and len(self.rows) == x.shape[0] else torch.zeros(
            x.shape[0], dtype=torch.long)).to(x.device)
        out = torch.empty_like(x)
        for k in rows.unique().tolist():
            mask = rows == k
            self.guider.conds = self.conds[k]
            out[mask] = self.model_fn(self.clock.from_linear(x[mask], t[mask]), self.clock.sigma(t[mask]))
        return out

    def teacher(self, x, t):
        t = t.to(x.device)
        return velocity_from_denoiser(x, self.denoise(x, t), self.model_t(t))

    def student(self, adapter: TwoTimeAdapter):
        def u(x, s, t):
            s, t = s.to(x.device), t.to(x.device)
            with adapter.active(self.clock.sigma(self.model_t(t).clamp(max=1.0)).to(x)):
                return velocity_from_denoiser(x, self.denoise(x, s), self.model_t(s))

        return u

    def ode(self, x: torch.Tensor, steps: int) -> torch.Tensor:
        """The teacher's Euler ODE from t_lo to 1 (the 'many-step result')."""
        ts = torch.linspace(self.t_lo, 1.0, steps + 1, device=x.device)
        with torch.no_grad():
            for a, b in zip(ts[:-1], ts[1:]):
                comfy.model_management.throw_exception_if_processing_interrupted()
                x = x + (b - a) * self.teacher(x, a.expand(x.shape[0]))
        return x


def lookahead_errors(guided: GuidedModel, adapter, noise: torch.Tensor, target: torch.Tensor) -> dict:
    """RMS of each look-ahead's end point to the teacher's ODE end point, from held-out noise at t_lo."""
    t0 = torch.full((noise.shape[0],), guided.t_lo, device=noise.device)
    rms = lambda a: float((a - target).pow(2).mean().sqrt())  # noqa: E731
    out = {}
    with torch.no_grad():
        out["denoiser"] = rms(guided.denoise(noise, t0))
        jump = flow_map_from_student(guided.student(adapter))
        for n in PREVIEW_JUMPS:
            ts = torch.linspace(guided.t_lo, 1.0, n + 1, device=noise.device)
            x = noise
            for a, b in zip(ts[:-1], ts[1:]):
                x = jump(x, a, b)
            out[f"{n} jump"] = rms(x)
            out.setdefault("_x", []).append(x)
    return out


@dataclass
class Run:
    """Everything one training run needs besides the model."""

    settings: DistillSettings
    rank: int
    cfg: float
    data: TrainingData
    lora_path: str              # the flow map file (models/fmtt_flow_maps/<name>.safetensors)
    state_dir: str              # the resumable state (<name>.state/)
    resume_from: str | None     # a state file to continue from
    block_checkpointing: bool = True
    ode_steps: int = 16         # data-free: the teacher's steps per generated sample
    eval_steps: int = 64        # the teacher's ODE the look-ahead error is measured against
    eval_samples: int = 2
    eval_pairs: int = EVAL_BATCH  # held-out samples of the objective: 4 x this many forwards per evaluation
    writer: object = None       # (adapter, base, metadata) -> writes the flow map file
    on_eval: object = None      # (step, eval_loss entry, lookahead_error entry) after each evaluation (progress)


def check_memory(guided: GuidedModel, adapter: TwoTimeAdapter, base, run: Run, device, free: int) -> int:
    """Refuse a run whose training does not fit in `free` bytes (the budget before the adapter was made), before
    anything is trained; returns the estimate in bytes.

    The run adds to the loaded model: the adapter (its copies of the time embedders; the LoRA with its gradients
    and AdamW's two moments), a copy of the training latents, and a training step's activations. A step holds,
    per row of a micro-batch, what the objective keeps for its backward pass (the student's calls with gradient;
    the teacher's and the finite difference's calls run without one, each holding at most one op's tensors beside
    them), measured on one row and on two by running the objective forward and backward
    (fmtt_core.memory.measure_pass, block checkpointing counted as it runs) and extended linearly to the micro-batch.
    A micro-batch whose inference alone cannot fit (ComfyUI's estimate) is refused first, so that the measurement
    itself always fits."""
    micro, shape = run.settings.batch // run.settings.accumulate, run.data.shape
    one = [1, *shape]
    inference = base.memory_required(one) * (2 if run.cfg != 1.0 else 1)  # cfg evaluates two conditionings
    tensors = [(t, t.requires_grad) for t in adapter.parameters()] + [(t, False) for t in adapter.buffers()]
    held = sum(t.numel() * t.element_size() * (TRAINED_COPIES if trained else 1) for t, trained in tensors)
    held += len(run.data.caption) * math.prod(shape) * 4  # the latents trained on, float32

    def refuse_above(need: float) -> None:
        if need > free:
            raise FMTTMemoryError(
                f"FMTT Train Flow Map: one training step needs about {mib(need)} (micro-batch {micro} at "
                f"{shape[-1] * 8}x{shape[-2] * 8} px) but {mib(free)} is free. Lower batch_size, or raise "
                "accumulate for the same batch in smaller passes, lower the image size, or turn block_checkpointing "
                "on.")

    refuse_above(micro * inference + held)
    net = base.diffusion_model
    blocks = [b for bl in block_lists(net).values() for b in bl] if run.block_checkpointing else []
    probe = FlowMapTrainer(adapter, guided.teacher, None, dataclasses.replace(run.settings, batch=1, accumulate=1),
                           student=guided.student(adapter))

    def step_bytes(rows: int) -> int:
        x = torch.randn((rows, *shape), generator=torch.Generator().manual_seed(0)).to(device).requires_grad_()
        times = {k: torch.full((rows,), v, device=device) for k, v in (("s", 0.3), ("t", 0.7), ("r", 0.5))}
        return measure_pass(lambda x_s: probe.loss({"x_s": x_s, **times})[0], x, blocks=blocks).peak

    with differentiable([net]), adapter.installed(base, device):
        # On 1 and 2 rows: what grows with the rows (activations) and what does not (the LoRA's merged weights in
        # the embedder copies, saved once per call whatever the batch).
        # (2 rows only when the micro-batch has them: the inference check above covers what is measured.)
        one_row = step_bytes(1)
        two_rows = step_bytes(2) if micro > 1 else one_row
    for p in adapter.parameters():
        p.grad = None  # the probe's gradient is not the first step's
    per_row = max(two_rows - one_row, 0)  # (with micro 1 it is not used)
    need = int((one_row + (micro - 1) * per_row + held) * ALLOCATOR_SLACK)
    refuse_above(need)
    return need


def train(model, run: Run) -> Report:
    """Run the distillation on `model` (a ModelPatcher) inside ComfyUI's sampling machinery."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(run.data.positives[0], run.data.negative)
    guider.set_cfg(run.cfg)
    report = Report()

    def trainer_fn(m, x, sigmas, extra_args=None, callback=None, disable=None):
        inner, base = guided_parts(m)
        extra_args = dict(extra_args or {})
        guided = GuidedModel(lambda xc, sigma: m(xc, sigma, **extra_args), inner, base, run.data,
                             torch.zeros((1, *run.data.shape), device=x.device), run.settings.seed)
        # Time pairs inside the model's range: below t_lo (sigma_max; VE models: t = 1 / (1 + sigma_max), 0.064 for
        # SD) the model is called at t_lo whatever the time, so neither the student's pair nor the residual is what it
        # says. On the tiny SD1.5, 12 of 64 held-out pairs fell there, each residual ~6 (1e-4 inside), untrainable.
        in_range = dataclasses.replace(run, settings=dataclasses.replace(run.settings, t_min=guided.t_lo))
        free = memory_guard.budget(x.device)
        adapter = TwoTimeAdapter.fresh(inner.model_patcher, run.rank, torch.Generator().manual_seed(run.settings.seed),
                                       os.path.basename(run.lora_path))
        report.memory_estimate = check_memory(guided, adapter, base, in_range, x.device, free)
        with differentiable([base.diffusion_model], block_checkpointing=run.block_checkpointing):
            _train(guided, adapter, base, in_range, report, x.device)
        return x

    shape = (1, *run.data.shape)
    zeros = torch.zeros(shape)
    sigmas = model.get_model_object("model_sampling").sigma_max.reshape(1).cpu()
    guider.sample(zeros, zeros.clone(), comfy.samplers.KSAMPLER(trainer_fn), torch.cat([sigmas, sigmas * 0]),
                  seed=run.settings.seed)
    return report


class _NodeTrainer(FlowMapTrainer):
    """The core trainer, with the two-time adapter installed on the model for each step (side_lora casts the LoRA to
    the model's dtype on entry: a fresh cast per step keeps the gradient path to the trained matrices); every save of
    its resumable state also writes the flow map file beside it."""

    on_save = None
    install = None
    guided: GuidedModel = None

    def train_step(self):
        with self.install():
            return super().train_step()

    def draw_batch(self):
        # Each row's conditioning index travels with the row into its micro-batch (draw() has just set it).
        return {**super().draw_batch(), "rows": self.guided.rows}

    def loss(self, batch, per_row=False):
        if "rows" in batch:  # held_out_values sets guided.rows itself
            self.guided.rows = batch["rows"]
        return super().loss(batch, per_row)

    def save(self, path=None):
        out = super().save(path)
        if self.on_save is not None:
            self.on_save(self)
        return out


def _train(guided: GuidedModel, adapter: TwoTimeAdapter, base, run: Run, report: Report, device) -> None:
    data = run.data
    g_eval = torch.Generator().manual_seed(run.settings.seed + 7919)  # held-out noise, never a training draw
    eval_noise = torch.randn((run.eval_samples, *data.shape), generator=g_eval).to(device)
    target = guided.ode(eval_noise, run.eval_steps)
    x1 = data.x1.clone().to(device) if data.x1 is not None else _teacher_pool(guided, data, run, device)

    def draw(n, generator):
        rows = torch.randint(len(x1), (n,), generator=generator)
        guided.rows = data.caption[rows]
        return x1[rows.to(device)]

    pbar = comfy.utils.ProgressBar(run.settings.steps)
    fingerprint = model_fingerprint(base)
    metadata = {"family": adapter.family.name, "base_model_hash": fingerprint,
                "clock": guided.clock.kind, "prediction": type(base.model_sampling).__mro__[1].__name__,
                "cfg": run.cfg, "resolution": f"{data.shape[-1] * 8}x{data.shape[-2] * 8}",
                "objective": run.settings.objective, "rank": run.rank,
                "embedders": list(adapter.copies.keys())}

    # The objective is also tracked on one fixed held-out batch, drawn as a run of another seed would draw its first.
    eval_batch = FlowMapTrainer(adapter, guided.teacher, draw, dataclasses.replace(
        run.settings, seed=run.settings.seed + 15485863, batch=run.eval_pairs, accumulate=1)).draw_batch()
    eval_rows = guided.rows
    first = {}  # the run's first evaluation (step, each held-out sample's objective): the paired reference

    def install():
        return adapter.installed(base, device)

    def record_errors(trainer):
        with install():
            _record_errors(trainer)

    def _record_errors(trainer):
        errors = lookahead_errors(guided, adapter, eval_noise, target)
        xs = errors.pop("_x")
        report.lookahead_error[f"step {trainer.step}"] = errors
        values = held_out_values(trainer, guided, eval_batch, eval_rows)
        first.setdefault("step", trainer.step)
        summary = held_out_summary(values, first.setdefault("values", values))
        report.eval_loss[f"step {trainer.step}"] = {**summary, "change_from_step": first["step"]}
        if run.on_eval is not None:
            run.on_eval(trainer.step, report.eval_loss[f"step {trainer.step}"], errors)
        pbar.update_absolute(trainer.step, run.settings.steps, _preview_image(base, [target, *xs], device))

    def write(trainer):
        run.writer(adapter, base, {**metadata, "steps": trainer.step}, run.lora_path)
        report.saved.append(trainer.step)

    trainer = _NodeTrainer(adapter, guided.teacher, draw, run.settings, student=guided.student(adapter),
                           out_dir=run.state_dir, on_preview=record_errors,
                           on_log=lambda rec: (report.seconds_per_step.append(rec["seconds_per_step"]),
                                               pbar.update_absolute(rec["step"], run.settings.steps)),
                           identity={"base_model_hash": fingerprint, "family": adapter.family.name})
    trainer.on_save, trainer.install, trainer.guided = write, install, guided
    if run.resume_from:
        trainer.resume(run.resume_from)  # refused when saved from another model (shapes, or the identity below)
    else:
        record_errors(trainer)  # the untrained map and the denoiser, before any step
    try:
        # Cancel is honoured between steps, so the saved state is a whole step's (exact resume).
        trainer.run(should_stop=comfy.model_management.processing_interrupted)
    finally:
        report.losses = list(trainer.losses)
    if trainer.step < run.settings.steps:
        report.stopped_at = trainer.step
        _write_report(run, report)
        comfy.model_management.throw_exception_if_processing_interrupted()
    if f"step {trainer.step}" not in report.lookahead_error:  # not evaluated by the last preview
        record_errors(trainer)
    _write_report(run, report)


def held_out_values(trainer: FlowMapTrainer, guided: GuidedModel, batch: dict, rows: torch.Tensor) -> torch.Tensor:
    """Each held-out sample's objective [N] (its time pair's L1 residual), in no-gradient passes of at most one
    training micro-batch (the passes check_memory measured, and less)."""
    saved, values = guided.rows, []
    micro = max(1, trainer.settings.batch // trainer.settings.accumulate)
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            guided.rows = rows[i:i + micro]
            values.append(trainer.loss({k: v[i:i + micro] for k, v in batch.items()}, per_row=True)[0].float().cpu())
    guided.rows = saved
    return torch.cat(values)


def _write_report(run: Run, report: Report) -> None:
    with open(os.path.join(run.state_dir, "report.json"), "w") as f:
        json.dump({"losses": report.losses, "lookahead_error": report.lookahead_error, "eval_loss": report.eval_loss,
                   "saved": report.saved}, f)


def _teacher_pool(guided: GuidedModel, data: TrainingData, run: Run, device) -> torch.Tensor:
    """Data-free: the teacher's own samples (ode_steps Euler steps from noise), the same for a given seed. Made a
    micro-batch at a time: no-gradient passes no larger than the training passes check_memory measured (accumulate
    is how a user makes those fit)."""
    g = torch.Generator().manual_seed(run.settings.seed + 104729)
    noise = torch.randn((len(data.caption), *data.shape), generator=g).to(device)
    micro = max(1, run.settings.batch // run.settings.accumulate)
    return torch.cat([guided.ode(chunk, run.ode_steps) for chunk in noise.split(micro)])


def _preview_image(base, latents: list[torch.Tensor], device):
    """The teacher's many-step result beside 1, 2 and 4 jumps, first held-out sample, as a UI preview."""
    import latent_preview
    previewer = latent_preview.get_previewer(device, base.latent_format)
    if previewer is None:
        return None
    row = torch.cat([x[:1] for x in latents], dim=-1)
    return previewer.decode_latent_to_preview_image("JPEG", base.process_latent_out(row))


def loss_plot(losses: list[float]) -> torch.Tensor:
    """The per-step loss as an IMAGE [1, H, W, 3] (log scale, PIL only)."""
    from PIL import Image, ImageDraw
    w, h, pad = 512, 256, 24
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    values = [math.log10(max(v, 1e-12)) for v in losses if math.isfinite(v)]
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0
        pts = [(pad + i * (w - 2 * pad) / (len(values) - 1), h - pad - (v - lo) / span * (h - 2 * pad))
               for i, v in enumerate(values)]
        d.line(pts, fill=(200, 40, 40), width=2)
        d.text((pad, 4), f"loss (log10) {10 ** hi:.3g} .. {10 ** lo:.3g}, {len(values)} steps", fill="black")
    d.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    import numpy as np
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def write_pack_format(adapter: TwoTimeAdapter, base, metadata: dict, path: str) -> None:
    lora, second = adapter.tensors()
    save_two_time_lora(path, lora, second, metadata)


def writer_for(adapter: TwoTimeAdapter):
    return write_fmrg_format if adapter.family.name == "FLUX.1" else write_pack_format

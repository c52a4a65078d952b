"""The flow-map distillation loop shared by `fmtt distill` and the ComfyUI node: any torch student, any teacher.

One step: draw clean data x1 and noise x0, a time pair (s, t), form x_s = (1 - s) x0 + s x1 (the core clock's
interpolant), take the objective's loss (LSD, or PSD plus the diagonal term) and one optimiser step; an optional
exponential moving average of the weights is what the run hands out.

Resumable. Every random draw comes from the trainer's own generator, and the learning rate is a function of the
step, so the state is: the weights (and EMA), the optimiser's state, the step, the generator and torch's global RNG
state, the per-step losses. `save` writes it to ONE safetensors file (tensors, plus a JSON header entry for the
rest; no pickle), replaced atomically; `resume` reads it back, and the run continues exactly as if it had never
stopped (bit for bit on a CPU, where the kernels are deterministic).

Data-parallel (torchrun, DDP). With a torch.distributed process group of W ranks, every rank draws the same global
batch from the same generator and keeps its own B / W rows; gradients are averaged over the ranks before the step.
The update equals one process on the whole batch (up to the order of floating-point sums), and every rank holds
the same weights and state, which rank 0 saves.

Gradient accumulation. With `accumulate` = A, each rank's rows are split into A equal micro-batches, each taking its
forward and backward pass in turn with its loss scaled by 1 / A: the gradients sum to those of the mean loss over
the whole global batch, so the step is the un-accumulated one (up to the order of floating-point sums) while the
activations held at once are one micro-batch's. The global batch is still drawn in one piece from the generator, so
the random draws, and hence the run, do not depend on A.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import FMTTInputError, FMTTNumericalError
from .distill import derivative_warmup, diagonal_loss, lsd_loss, psd_loss, sample_time_pairs

STATE_FORMAT = "fmtt flow-map trainer state v1"
OBJECTIVES = ("lsd", "psd")
# Settings a resumed run may change without leaving the uninterrupted run's path.
# `accumulate` only splits the same global batch (the update changes by the order of float sums, no more): a run
# that ran out of memory may resume with more micro-batches.
RESUMABLE_CHANGES = ("steps", "save_every", "log_every", "preview_every", "accumulate")

DataSource = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> clean data x1 [n, ...]


@dataclass
class DistillSettings:
    objective: str = "lsd"            # "lsd" | "psd" (PSD + the diagonal term u(x, t, t) = b_t(x))
    steps: int = 1000                 # total optimiser steps of the run (a resumed run may raise it)
    batch: int = 64                   # global batch (split over data-parallel ranks)
    accumulate: int = 1               # micro-batches per step on each rank (gradient accumulation)
    lr: float = 1e-4
    lr_warmup_steps: int = 0          # linear learning-rate warmup, then constant
    weight_decay: float = 0.0
    grad_clip: float = 1.0            # max gradient norm; 0 = off
    ema_decay: float = 0.0            # EMA of the weights handed out; 0 = off (the raw weights)
    min_gap: float = 0.0
    shift: float = 1.0
    t_min: float = 0.0                # the model's earliest time: pairs are drawn in [t_min, 1] (sample_time_pairs)
    both_directions: bool = True
    fd_step: float = 5e-3
    derivative_grad: bool = False     # LSD: gradients through the finite difference too (see lsd_loss)
    derivative_warmup_steps: int = 0
    norm: str = "l1"
    seed: int = 0
    save_every: int = 0               # steps between saves of the resumable state; 0 = only at the end
    log_every: int = 10
    preview_every: int = 0

    def check(self) -> DistillSettings:
        if self.objective not in OBJECTIVES:
            raise FMTTInputError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        for name in ("steps", "batch", "accumulate"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise FMTTInputError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        if not self.lr > 0:
            raise FMTTInputError(f"lr must be > 0, got {self.lr}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise FMTTInputError(f"ema_decay must be in [0, 1), got {self.ema_decay}; 0 turns the EMA off.")
        return self


def held_out_summary(values: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    """The objective on a fixed held-out set of samples (each with its own time pair), from each sample's objective
    `values` [N]. The training objective is the expectation over samples of that value, so its estimate is their
    mean, with the standard error sd / sqrt(N). The median is reported beside it, as a different statistic (the
    per-pair objective is heavy-tailed in the time pair): it is not what training lowers. Against `reference` (the
    same samples' values at an earlier step) the change is a paired difference, whose standard error is that of
    the differences: far smaller than either mean's, since a sample's objective is mostly set by its time pair."""
    values = values.double()
    n = values.numel()

    def se(v: torch.Tensor) -> float:
        return float(v.std() / math.sqrt(n)) if n > 1 else float("nan")

    out = {"mean": float(values.mean()), "se": se(values), "median": float(values.quantile(0.5)), "pairs": n}
    if reference is not None:
        change = values - reference.double()
        out.update(change=float(change.mean()), change_se=se(change))
    return out


class FlowMapTrainer:
    """Distil `teacher` into the two-time student `module`.

    module    the nn.Module whose trainable parameters are optimised and saved
    teacher   b(x, t) -> base velocity in the core clock (called without gradients)
    data      (n, generator) -> n clean data samples x1; draw only from `generator` so runs are reproducible
    student   u(x, s, t) -> two-time velocity; default `module` itself (give e.g. `net.average_velocity`)
    optimizer default AdamW over the module's trainable parameters
    out_dir   where `state.safetensors` is saved (every `save_every` steps, on stop and at the end)
    on_log    called with a record {step, loss, lr, derivative_weight, seconds_per_step, ...} every `log_every`
    on_preview called with the trainer every `preview_every` steps (rank 0 only)
    identity  strings that name what is distilled (e.g. {"base_model": sha256, "family": "sdxl"}): saved with the
              state, and a resume from a state with other values is refused
    """

    def __init__(self, module: nn.Module, teacher, data: DataSource, settings: DistillSettings, *, student=None,
                 optimizer: torch.optim.Optimizer | None = None, out_dir: str | os.PathLike | None = None,
                 on_log=None, on_preview=None, group=None, identity: dict[str, str] | None = None):
        self.settings = settings.check()
        self.module, self.teacher, self.data = module, teacher, data
        self.student = student if student is not None else module
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise FMTTInputError("the student module has no trainable parameters; unfreeze the ones to distil "
                                 "(requires_grad_(True)).")
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=settings.lr,
                                                        weight_decay=settings.weight_decay)
        self.ema = copy.deepcopy(module).requires_grad_(False) if settings.ema_decay > 0 else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.on_log, self.on_preview = on_log, on_preview
        self.identity = dict(identity or {})
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step = 0
        self.losses: list[float] = []
        self._init_group(group)

    # ------------------------------------------------------------------ data parallel
    def _init_group(self, group) -> None:
        import torch.distributed as dist

        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world = dist.get_world_size(group) if group is not None else 1
        parts = self.world * self.settings.accumulate
        if self.settings.batch % parts:
            raise FMTTInputError(f"batch {self.settings.batch} does not split into {self.world} process(es) x "
                                 f"{self.settings.accumulate} micro-batch(es); use a multiple of {parts}.")

    def micro_batches(self, batch: dict) -> list[dict]:
        """This rank's rows of the global batch, in `accumulate` equal micro-batches (every entry is per row)."""
        per = self.settings.batch // (self.world * self.settings.accumulate)
        first = self.rank * self.settings.accumulate
        return [{k: v[(first + i) * per:(first + i + 1) * per] for k, v in batch.items()}
                for i in range(self.settings.accumulate)]

    def _average_over_ranks(self, tensors: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    # ------------------------------------------------------------------ one step
    def lr_at(self, step: int) -> float:
        warm = self.settings.lr_warmup_steps
        return self.settings.lr * (min(1.0, (step + 1) / warm) if warm > 0 else 1.0)

    def draw_batch(self) -> dict:
        """The global batch of one step, from the trainer's generator (the same on every rank)."""
        st = self.settings
        x1 = self.data(st.batch, self.generator)
        x0 = torch.randn(x1.shape, generator=self.generator, dtype=x1.dtype).to(x1.device)
        s, t = sample_time_pairs(st.batch, generator=self.generator, min_gap=st.min_gap, shift=st.shift,
                                 both_directions=st.both_directions, t_min=st.t_min, device=x1.device,
                                 dtype=x1.dtype)
        batch = {"x_s": (1 - s).view(-1, *[1] * (x1.ndim - 1)) * x0 + s.view(-1, *[1] * (x1.ndim - 1)) * x1,
                 "s": s, "t": t}
        if st.objective == "psd":
            batch["r"] = torch.rand(st.batch, generator=self.generator, dtype=torch.float64).to(x1.device, x1.dtype)
        return batch

    def loss(self, batch: dict, per_row: bool = False) -> tuple[torch.Tensor, dict]:
        """The objective's mean over the rows of `batch` (one micro-batch, or any slice of a drawn batch); per_row:
        each row's own objective ([B], whose mean is that)."""
        st = self.settings
        x_s, s, t = batch["x_s"], batch["s"], batch["t"]
        if st.objective == "lsd":
            return lsd_loss(self.student, self.teacher, x_s, s, t, fd_step=st.fd_step, norm=st.norm,
                            derivative_grad=st.derivative_grad, per_row=per_row, t_min=st.t_min,
                            derivative_weight=derivative_warmup(self.step, st.derivative_warmup_steps))
        diag, _ = diagonal_loss(self.student, self.teacher, x_s, s, norm=st.norm, per_row=per_row)
        psd, stats = psd_loss(self.student, x_s, s, t, generator=self.generator, norm=st.norm,
                              midpoint=batch["r"], per_row=per_row)
        loss = diag + psd
        return loss, {**stats, "loss": float(loss.detach().mean()), "diagonal": float(diag.detach().mean())}

    def train_step(self) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=False)
        parts = self.micro_batches(self.draw_batch())
        total, stats = 0.0, {}
        for part in parts:  # equal sizes: the mean over the rank's rows is the mean of the micro-batch means
            loss, part_stats = self.loss(part)
            (loss / len(parts)).backward()
            total = total + loss.detach() / len(parts)
            for k, v in part_stats.items():
                stats[k] = stats.get(k, 0.0) + v / len(parts)
        for p in self.params:
            if p.grad is None:  # a parameter this step did not reach: a zero gradient keeps ranks in step
                p.grad = torch.zeros_like(p)
        global_loss = total.reshape(1)
        self._average_over_ranks([p.grad for p in self.params] + [global_loss])
        stats["loss"] = float(global_loss)  # the mean over the global batch, the same on every rank
        if not math.isfinite(stats["loss"]):  # checked before the step, so the weights and the last save stay usable
            raise FMTTNumericalError(f"the distillation loss became {stats['loss']} at step {self.step + 1}; lower lr "
                                     f"(now {self.settings.lr}) or fd_step, or check the teacher's output. The last "
                                     "saved state is intact: resume from it with the changed setting in a new run.")
        if self.settings.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.settings.grad_clip))
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                for pe, p in zip(self.ema.parameters(), self.module.parameters()):
                    pe.lerp_(p, 1 - self.settings.ema_decay)
        self.step += 1
        self.losses.append(stats["loss"])
        return stats

    # ------------------------------------------------------------------ the loop
    def run(self, should_stop: Callable[[], bool] | None = None) -> list[float]:
        """Train until `settings.steps` (or until should_stop() says so: then the state is saved and the run
        returns, resumable). Returns the per-step losses of the whole run so far."""
        st = self.settings
        window, started = [], time.perf_counter()
        while self.step < st.steps:
            if should_stop is not None and should_stop():
                break
            stats = self.train_step()
            window.append(stats)
            if self.on_log is not None and (self.step % max(1, st.log_every) == 0 or self.step == st.steps):
                elapsed = time.perf_counter() - started
                record = {"step": self.step, "steps": st.steps, "lr": self.lr_at(self.step - 1),
                          "seconds_per_step": elapsed / len(window),
                          **{k: sum(w[k] for w in window) / len(window) for k in stats}}
                self.on_log(record)
                window, started = [], time.perf_counter()
            if self.on_preview is not None and st.preview_every and self.step % st.preview_every == 0 \
                    and self.rank == 0:
                self.on_preview(self)
            if st.save_every and self.step % st.save_every == 0:
                self.save()
        self.save()
        return self.losses

    def trained_module(self) -> nn.Module:
        """What the run hands out: the EMA weights when an EMA is kept, the raw weights otherwise."""
        return self.ema if self.ema is not None else self.module

    # ------------------------------------------------------------------ resumable state
    def state_path(self) -> Path | None:
        return self.out_dir / "state.safetensors" if self.out_dir is not None else None

    def _fingerprint(self) -> list:
        return [[name, list(p.shape)] for name, p in self.module.state_dict().items()]

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the resumable state (rank 0 only); returns its path, or None when there is nowhere to save."""
        from safetensors.torch import save_file

        path = Path(path) if path is not None else self.state_path()
        if path is None or self.rank != 0:
            return path
        tensors = {f"model.{k}": v for k, v in self.module.state_dict().items()}
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        opt = self.optimizer.state_dict()
        opt_scalars = {}
        for index, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value
                else:
                    opt_scalars[f"{index}.{key}"] = value
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        header = {"format": STATE_FORMAT, "step": self.step, "settings": dataclasses.asdict(self.settings),
                  "param_groups": opt["param_groups"], "optimizer_scalars": opt_scalars,
                  "model": self._fingerprint(), "identity": self.identity, "losses": self.losses}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"fmtt.trainer_state": json.dumps(header)})
        os.replace(tmp, path)
        return path

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a saved state: weights, EMA, optimiser, step, RNG states and losses."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / "state.safetensors"
        if not path.is_file():
            raise FMTTInputError(f"resume file {path} does not exist; give the state.safetensors a run saved "
                                 "(or its folder).")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("fmtt.trainer_state")
        header = json.loads(raw) if raw else {}
        if header.get("format") != STATE_FORMAT:
            raise FMTTInputError(f"{path} is not a flow-map trainer state (no '{STATE_FORMAT}' header); resume "
                                 "from the state.safetensors a distillation run wrote.")
        if header["model"] != self._fingerprint():
            raise FMTTInputError(f"{path} was saved from another model (its parameter names / shapes differ from "
                                 "this student's); resume with the same student architecture, or start afresh.")
        if header.get("identity", {}) != self.identity:
            raise FMTTInputError(f"{path} was saved while distilling {header.get('identity')}, not {self.identity}; "
                                 "resume with the same model, or start a new run.")
        saved = header["settings"]
        defaults = dataclasses.asdict(DistillSettings())  # a setting added since the state was saved: its default
        changed = [k for k, v in dataclasses.asdict(self.settings).items()
                   if k not in RESUMABLE_CHANGES and saved.get(k, defaults[k]) != v]
        if changed:
            saved_values = ", ".join(f"{k}={saved.get(k, defaults[k])!r}" for k in changed)
            raise FMTTInputError(f"{path} was saved with other settings ({saved_values}); "
                                 f"a resumed run may change only {', '.join(RESUMABLE_CHANGES)}. Use the saved "
                                 "values or start a new run.")
        tensors = load_file(str(path))
        self.module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        for key, value in header["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        groups = header["param_groups"]
        for group in groups:  # JSON turned tuples (Adam's betas) into lists
            for k, v in group.items():
                if isinstance(v, list) and k != "params":
                    group[k] = tuple(v)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.losses = int(header["step"]), list(header["losses"])

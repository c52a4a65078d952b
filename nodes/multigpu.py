"""FMTT's particles over ComfyUI's MultiGPU clones ("MultiGPU CFG Split" node, comfy/multigpu.py).

When the MODEL carries MultiGPU clones, ComfyUI's CFGGuider.outer_sample loads one BaseModel per extra device
(ModelPatchers flagged is_multigpu_base_clone) and a MultiGPUThreadPool with one worker thread per device. ComfyUI
itself spreads conds over them, under no_grad. FMTT spreads particles instead: each step, the population is cut
into one block of whole chunks per device (fmtt_core.split_rows, by the devices' relative speeds), and each block's
whole evaluation (denoiser, look-ahead, decode, reward, and the backward pass for the tilt gradient) runs on its
device with that device's copies of the models: the clone's BaseModel with the conds moved there, and copies of
the VAE decoder, the reward model and a flow-map network. The main device's block runs on the calling thread,
the others on the pool's workers; D, r and grad come back to the main device in particle order
(fmtt_core.particles.SPREAD). Weights, ESS, resampling and noise never leave the main device, so the run is the
single-device run, batch for batch.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import queue
from dataclasses import dataclass

import comfy.conds
import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import torch

from ..fmtt_core.nfe import NFE
from ..fmtt_core.particles import ParticleLoop, split_rows
from .autograd import normal_tensor, this_thread
from .decoding import vae_decoder
from .lookahead_specs import BaseModelLookahead, BesideTheWeights, FlowMapFileLookahead

MULTIGPU_KEYS = ("multigpu_clones", "multigpu_thread_pool")
POLL_S = 0.25  # how often the calling thread checks for Cancel while it waits for the other devices


class MultiGPUError(RuntimeError):
    """A device's block of particles failed; names the device."""


def without_multigpu(options: dict) -> dict:
    """Model options for a call on one device: ComfyUI's cond-splitting path runs under no_grad and would drop
    the tilt gradient."""
    return {k: v for k, v in options.items() if k not in MULTIGPU_KEYS}


@dataclass
class Unit:
    """One device's share of the work: its ModelPatcher (the main one or a loaded MultiGPU clone)."""

    device: torch.device
    patcher: object
    speed: float
    name: str

    @property
    def main(self) -> bool:
        return self.name == "main"


def units(guider, options: dict) -> list[Unit]:
    """The main device and the MultiGPU clones ComfyUI loaded for this sampling, in ComfyUI's order.

    The clones are taken from the guider's loaded models (ComfyUI's own prepare_model_patcher_multigpu_clones does
    the same), not from the `multigpu_clones` dict: that dict is keyed by device, so a clone on the main device's
    own device (a CPU-only machine) would replace the main model there. A list keeps them apart.
    """
    speeds = options.get("multigpu_options", {})
    main = guider.model_patcher
    clones = [p for p in getattr(guider, "loaded_models", []) if getattr(p, "is_multigpu_base_clone", False)]
    speed = lambda device: float(speeds.get(device, {}).get("relative_speed", 1.0))  # noqa: E731
    return ([Unit(main.load_device, main, speed(main.load_device), "main")]
            + [Unit(p.load_device, p, speed(p.load_device), f"clone {i + 1}") for i, p in enumerate(clones)])


# ------------------------------------------------------------------ copies of the models on a device

def replicate(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of a torch module on `device` (a reward, a VAE decoder, a flow-map network): every tensor copied
    straight to the device (never a second full copy on the source device), plain tensor attributes and
    `device` attributes (the pack's rewards move their inputs there) included, also in sub-rewards kept outside
    the module tree (a weighted sum's terms)."""
    with torch.inference_mode(False):
        memo = {}
        for t in [*module.parameters(), *module.buffers()]:
            moved = _copy_like(t, device)
            memo[id(t)] = torch.nn.Parameter(moved, requires_grad=t.requires_grad) if isinstance(
                t, torch.nn.Parameter) else moved
        clone = copy.deepcopy(module, memo)
        _retarget(clone, device, set())
    return clone


ALIGN = 64  # bytes; the CPU allocator's alignment (CUDA's is a multiple of it)


def _copy_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of t on `device` at the same address modulo ALIGN as t. Math libraries round differently for
    differently aligned operands (MKL's matrix-vector products do, e.g. for weights that are views into a
    safetensors buffer), and a device's copy must compute what the original computes."""
    t = t.detach()
    misalign = t.data_ptr() % ALIGN
    if not t.is_contiguous() or t.numel() == 0 or misalign % t.element_size():
        return t.to(device, copy=True)
    shift = misalign // t.element_size()
    return torch.empty(t.numel() + shift, dtype=t.dtype, device=device)[shift:].view(t.shape).copy_(t)


def _retarget(obj, device: torch.device, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        obj.to(device)
        items = vars(obj)
        if isinstance(items.get("device"), torch.device):
            obj.device = device
    elif isinstance(obj, dict):
        items = obj
    elif isinstance(obj, (list, tuple)):
        items = dict(enumerate(obj))
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        items = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    else:
        return
    for key, value in list(items.items()):
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            if isinstance(obj, dict):
                obj[key] = value.to(device)
            elif isinstance(obj, torch.nn.Module) and key not in ("_parameters", "_buffers"):
                setattr(obj, key, value.to(device))
        elif key not in ("_parameters", "_buffers"):
            _retarget(value, device, seen)


def moved(obj, device: torch.device):
    """ComfyUI's processed conds (lists of dicts of CONDRegular, masks, ControlNets) on `device`, as
    _calc_cond_batch_multigpu places them per device; a ControlNet becomes its MultiGPU instance for the device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, comfy.conds.CONDRegular):
        return obj._copy_with(moved(obj.cond, device))
    if isinstance(obj, dict):
        return {k: (v.get_instance_for_device(device) if k == "control" and hasattr(v, "get_instance_for_device")
                    else moved(v, device)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [moved(v, device) for v in obj]
    return obj


def device_call(model, extra_args: dict, unit: Unit):
    """(model, extra_args) as a SAMPLER function receives them, but computing on the unit's device with its
    BaseModel: the guider (any CFGGuider subclass) sees the clone's BaseModel and the conds moved there."""
    device = unit.device
    guider = copy.copy(model.inner_model)
    guider.inner_model = unit.patcher.model
    guider.conds = moved(guider.conds, device)
    view = comfy.samplers.KSamplerX0Inpaint(guider, model.sigmas.to(device))
    on_device = lambda t: None if t is None else normal_tensor(t).to(device)  # noqa: E731
    view.latent_image, view.noise = on_device(model.latent_image), on_device(getattr(model, "noise", None))
    options = comfy.model_patcher.create_model_options_clone(without_multigpu(extra_args.get("model_options", {})))
    transformer_options = options.setdefault("transformer_options", {})
    if isinstance(transformer_options.get("sample_sigmas"), torch.Tensor):
        transformer_options["sample_sigmas"] = transformer_options["sample_sigmas"].to(device)
    comfy.samplers.cast_transformer_options(transformer_options, device=device)
    return view, {**extra_args, "model_options": options, "denoise_mask": on_device(extra_args.get("denoise_mask"))}


@dataclass
class Replica:
    """One device's models, shared by every population of the batch; the denoiser is made per population."""

    unit: Unit
    reward: object
    decode: object
    spec: object
    modules: list  # what gradients flow through (made differentiable by the sampler)

    def prepared(self):
        """What the device's models need around the sampling run: a LoRA beside the weights hooked on the clone
        (the main model's is installed by the look-ahead's own run_with)."""
        if isinstance(self.spec, BesideTheWeights) and not self.unit.main:
            return self.spec.installed(self.unit.patcher.model, self.unit.device)
        return contextlib.nullcontext()


def spreadable(spec, reward) -> str | None:
    """Why this run cannot be spread over the clones (None: it can)."""
    if not isinstance(spec, (BaseModelLookahead, FlowMapFileLookahead, BesideTheWeights)):
        return (f"the look-ahead ({spec.describe()}) has no copies on the other devices (a companion model is "
                "prepared by a sampling run of its own, on the main device only)")
    if reward is not None and not isinstance(reward, torch.nn.Module):
        return "the reward is not a torch module, so it cannot be copied to the other devices"
    return None


def replicas(unit_list: list[Unit], settings, spec, base_model, decode, vae_module) -> list[Replica]:
    """Each unit's models: the main device's are the sampler's own; the others are copies on their device."""
    out = []
    for unit in unit_list:
        if unit.main:
            out.append(Replica(unit, settings.reward, decode, spec, []))
            continue
        vae = copy.copy(settings.vae)
        vae.first_stage_model, vae.device = replicate(vae_module, unit.device), unit.device
        decode_k, module_k = vae_decoder(vae, unit.patcher.model)
        spec_k = (dataclasses.replace(spec, network=replicate(spec.network, unit.device))
                  if isinstance(spec, FlowMapFileLookahead) else spec)
        reward_k = None if settings.reward is None else replicate(settings.reward, unit.device)
        out.append(Replica(unit, reward_k, decode_k, spec_k,
                           [unit.patcher.model.diffusion_model, module_k, *spec_k.modules()]))
    return out


# ------------------------------------------------------------------ the spread itself

class Spread:
    """fmtt_core's SPREAD hook for one population: each call cuts the particles into one block per device and
    evaluates each block with that device's ParticleLoop."""

    def __init__(self, replica_list: list[Replica], denoisers: list, pool, gradients: bool):
        self.replicas, self.denoisers, self.pool, self.gradients = replica_list, denoisers, pool, gradients
        self.loops = None
        self.rows = []  # particles per device of the last call, for the diagnostics

    def _loops(self, loop: ParticleLoop) -> list[ParticleLoop]:
        # The main device uses the core's own loop; the others mirror its chunk size and gradient clip.
        if self.loops is None or loop not in self.loops:
            self.loops = [loop if rep.unit.main else
                          ParticleLoop(den, rep.reward, rep.decode, rep.spec.build(den), loop.chunk_size,
                                       loop.grad_clip)
                          for rep, den in zip(self.replicas, self.denoisers)]
        return self.loops

    def __call__(self, loop: ParticleLoop, x: torch.Tensor, fn):
        loops = self._loops(loop)
        rows = split_rows(x.shape[0], loop.chunk_size, [rep.unit.speed for rep in self.replicas])
        self.rows = rows
        starts = [sum(rows[:i]) for i in range(len(rows))]
        jobs = [(i, x[s:s + n]) for i, (s, n) in enumerate(zip(starts, rows)) if n > 0]
        pooled = self.pool.devices if self.pool is not None else []
        results, submitted, done = {}, [], queue.Queue()
        for i, block in jobs:  # workers first, so they compute while this thread does the main block
            unit = self.replicas[i].unit
            if not unit.main and unit.device in pooled:
                loops[i].nfe = NFE()
                self.pool.submit(unit.device, self._pooled, done, i, loops[i], block.to(unit.device), fn)
                submitted.append(i)
        failure = None
        for i, block in jobs:  # the main block, and any device without a pool worker, on this thread
            if i not in submitted and failure is None:
                try:
                    if not self.replicas[i].unit.main:
                        loops[i].nfe = NFE()
                    results[i] = self._work(loops[i], block.to(self.replicas[i].unit.device), fn)
                except BaseException as e:  # noqa: BLE001  (collect the workers before raising)
                    failure = failure or (i, e)
        for _ in submitted:
            i, result, error = _next(done)
            if error is not None:
                failure = failure or (i, error)
            else:
                results[i] = result
        for i in submitted:  # the pool's own (empty) answers, so its queues stay in step for the next call
            self.pool.get_result(self.replicas[i].unit.device)
        if failure is not None:
            self._raise(*failure)
        for i, _ in jobs:
            if not self.replicas[i].unit.main:
                for key, value in vars(loops[i].nfe).items():
                    loop.nfe.add(key, value)
        return _gather([results[i] for i, _ in jobs], [self.replicas[i].unit.device for i, _ in jobs], x.device)

    def _pooled(self, done: queue.Queue, i: int, loop: ParticleLoop, rows: torch.Tensor, fn) -> None:
        """A block on a pool worker; its answer goes to this call's own queue, which the caller can stop waiting
        for (Cancel), unlike the pool's."""
        try:
            done.put((i, self._work(loop, rows, fn), None))
        except BaseException as e:  # noqa: BLE001  (handed to the calling thread, which raises it)
            done.put((i, None, e))

    def _work(self, loop: ParticleLoop, rows: torch.Tensor, fn):
        with this_thread(self.gradients):  # grad mode is per thread: a pool worker starts without ours
            out = fn(loop, rows)
        if rows.device.type == "cuda":  # the outputs are complete before another thread copies them
            torch.cuda.synchronize(rows.device)
        return out

    def _raise(self, i: int, error: BaseException):
        """The main device's errors and interrupts as they are (as in a one-device run); a clone's, naming it."""
        unit = self.replicas[i].unit
        if unit.main or isinstance(error, comfy.model_management.InterruptProcessingException):
            raise error
        raise MultiGPUError(f"FMTT: the particles on {unit.device} (MultiGPU {unit.name}) failed: "
                            f"{type(error).__name__}: {error}") from error

    def describe(self) -> str:
        return ", ".join(f"{rep.unit.device} ({rep.unit.name}{', this thread' if rep.unit.main else ''}): "
                         f"{n} particle(s)" for rep, n in zip(self.replicas, self.rows or [0] * len(self.replicas)))


def _next(done: queue.Queue):
    """The next device's answer. A device that never answers must not hang the run: Cancel still stops it (the
    sampling then ends, and ComfyUI shuts its pool down)."""
    while True:
        try:
            return done.get(timeout=POLL_S)
        except queue.Empty:
            comfy.model_management.throw_exception_if_processing_interrupted()


def _gather(outputs: list[tuple], devices: list, main_device: torch.device) -> tuple:
    """Concatenate the blocks' outputs in particle order; tensors computed on a block's device come back to the
    main device (the rewards are already float64 on the CPU)."""
    gathered = []
    for parts in zip(*outputs):
        if all(p is None for p in parts):
            gathered.append(None)
            continue
        gathered.append(torch.cat([p.to(main_device) if _same_device(p.device, d) else p
                                   for p, d in zip(parts, devices)]))
    return tuple(gathered)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

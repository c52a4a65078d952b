"""FMTT_LOOKAHEAD: what the look-ahead nodes hand to the sampler, turned into fmtt_core look-aheads at sampling time.

A spec is built when the graph runs but resolved only inside the sampler, because the base model's denoiser
(and a companion model's) exist only while ComfyUI is sampling. Every spec follows one small protocol
(LookaheadSpec); the sampler knows nothing else about it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import comfy.samplers
import torch

from ..fmtt_core import CompanionLookahead, DenoiserLookahead, FlowMapLookahead, FMTTInputError, ODELookahead
from .clocks import clock_of, core_denoiser, family_of, guided_parts


@runtime_checkable
class LookaheadSpec(Protocol):
    """What a look-ahead node hands to the sampler.

    describe()  one line for the diagnostics
    build(denoiser, companion)  the fmtt_core look-ahead, from the base model's denoiser D(x, t) (and the
                companion's, prepared by run_with)
    modules()   torch modules of the spec's own that gradients flow through (made differentiable by the sampler)
    run_with(base_model, x, sigmas, seed, body)  run the sampling `body(companion=None, companion_modules=())`
                with whatever the spec needs prepared around it (a second model loaded, a LoRA installed, ...)
    """

    kind: str

    def describe(self) -> str: ...

    def build(self, denoiser, companion=None): ...

    def modules(self) -> list: ...

    def run_with(self, base_model, x, sigmas, seed, body): ...


class _Plain:
    """Defaults for specs that need nothing prepared and own no modules."""

    def modules(self):
        return []

    def run_with(self, base_model, x, sigmas, seed, body):
        return body()


class BesideTheWeights(_Plain):
    """Specs that run the sampled model itself with a LoRA beside its weights (nodes/side_lora.py) inside their
    calls. `installed(base_model, device)` puts the hooks on a loaded model: the main one here, each MultiGPU clone's
    in nodes/multigpu.py."""

    def installed(self, base_model, device=None):
        raise NotImplementedError

    def run_with(self, base_model, x, sigmas, seed, body):
        with self.installed(base_model):
            return body()


@dataclass(frozen=True)
class BaseModelLookahead(_Plain):
    """(a) the base model's denoiser D(x, t), or (b) k ODE steps of the base model."""

    kind: str = "denoiser"  # "denoiser" | "ode"
    steps: int = 4
    solver: str = "euler"
    checkpoint: bool = True

    def build(self, denoiser, companion=None):
        if self.kind == "denoiser":
            return DenoiserLookahead(denoiser)
        return ODELookahead(denoiser, steps=self.steps, solver=self.solver, checkpoint=self.checkpoint)

    def describe(self) -> str:
        if self.kind == "denoiser":
            return "denoiser (1 step of the base model)"
        return f"ODE of the base model, {self.steps} {self.solver} steps"


@dataclass(frozen=True, eq=False)
class CompanionModelLookahead(_Plain):
    """(c) k steps of a second model sharing the latent space, with its own conditioning."""

    model: object  # ComfyUI ModelPatcher
    positive: list
    negative: list | None = None
    cfg: float = 1.0
    steps: int = 4
    solver: str = "euler"
    checkpoint: bool = True
    kind = "companion"

    def build(self, denoiser, companion=None):
        if companion is None:
            raise FMTTInputError("FMTT: internal error, the companion model was not prepared.")
        return CompanionLookahead(companion, steps=self.steps, solver=self.solver, checkpoint=self.checkpoint)

    def describe(self) -> str:
        return f"companion model, {self.steps} {self.solver} steps, cfg {self.cfg}"

    def run_with(self, base_model, x, sigmas, seed, body):
        """Run body(companion_denoiser, companion_modules) while ComfyUI has the companion prepared for sampling.

        The companion goes through ComfyUI's own sampling entry (CFGGuider.sample) with a sampler function that
        does not sample but runs `body`: ComfyUI loads the model, encodes its conditioning and cleans up exactly
        as for a normal run.
        """
        if shares_weights_with_other_patches(self.model, base_model):
            # ComfyUI patches a LoRA into the weights it shares with the base model: while the companion is
            # loaded, the base model would compute with the LoRA too (a wrong result, silently).
            raise FMTTInputError(
                f"FMTT: the companion is {family_of(base_model)} itself with other weight patches (e.g. a Lightning / "
                "Turbo LoRA on the same loaded checkpoint); ComfyUI patches those into the weights both share, so the "
                "base model would sample with the LoRA too. Give the companion its own weights: a merged few-step "
                "checkpoint (e.g. sdxl_lightning_4step_unet.safetensors through UNETLoader, or SDXL-Turbo), or a "
                "second loader of another file with the LoRA on it.")
        guider = comfy.samplers.CFGGuider(self.model)
        guider.set_conds(self.positive, self.negative if self.negative is not None else self.positive)
        guider.set_cfg(self.cfg)
        box = {}

        def capture(model, x, sigmas, extra_args=None, callback=None, disable=None):
            _, companion_base = guided_parts(model)
            check_companion(base_model, companion_base)
            clock = clock_of(companion_base.model_sampling, family_of(companion_base))
            extra_args = dict(extra_args or {})
            # A companion MODEL with MultiGPU clones: ComfyUI's cond-splitting call runs under no_grad and would drop
            # the gradient through the look-ahead; the companion computes on the main device (nodes/multigpu.py).
            extra_args["model_options"] = {k: v for k, v in extra_args.get("model_options", {}).items()
                                           if k not in ("multigpu_clones", "multigpu_thread_pool")}
            fn = lambda xc, sigma: model(xc, sigma, **extra_args)  # noqa: E731
            box["out"] = body(core_denoiser(fn, clock), [companion_base.diffusion_model])
            return x

        zeros = torch.zeros((1, *x.shape[1:]), dtype=torch.float32)
        guider.sample(zeros, zeros.clone(), comfy.samplers.KSAMPLER(capture), sigmas.cpu(), seed=seed)
        return box["out"]


def shares_weights_with_other_patches(companion_patcher, base_model) -> bool:
    """Whether the companion is a clone of the (loaded) base network with other weight patches, e.g. a LoRA."""
    if companion_patcher.model is not base_model:
        return False
    loaded = getattr(base_model, "current_weight_patches_uuid", None)  # the patches now in the shared weights
    return companion_patcher.patches_uuid != loaded if loaded is not None else bool(companion_patcher.patches)


def check_companion(base_model, companion_base) -> None:
    base_fmt, comp_fmt = type(base_model.latent_format), type(companion_base.latent_format)
    channels = base_model.latent_format.latent_channels, companion_base.latent_format.latent_channels
    if base_fmt is not comp_fmt or channels[0] != channels[1]:
        raise FMTTInputError(
            f"FMTT: the companion model works in another latent space ({comp_fmt.__name__}) than the base model "
            f"({base_fmt.__name__}). A companion must share the base model's latent space, e.g. FLUX.1-schnell "
            "for FLUX.1-dev, or the SDXL-Lightning / Turbo UNet for SDXL.")
    if (clock_of(base_model.model_sampling, family_of(base_model)).kind
            != clock_of(companion_base.model_sampling, family_of(companion_base)).kind):
        raise FMTTInputError("FMTT: the companion model is a flow model and the base model is not (or the "
                             "reverse); both must use the same parameterisation.")


@dataclass(frozen=True, eq=False)
class FlowMapFileLookahead(_Plain):
    """(d) a learned two-time flow map X_{s,t} read from a file in the pack's format (fmtt_core.flow_maps)."""

    network: torch.nn.Module
    name: str
    jumps: int = 1
    checkpoint: bool = False
    kind = "flow_map"

    def build(self, denoiser, companion=None):
        net = self.network

        def flow_map(x, s, t):
            return net(x.to(_dtype(net)), s, t).to(x.dtype)

        return FlowMapLookahead(flow_map, jumps=self.jumps, checkpoint=self.checkpoint)

    def describe(self) -> str:
        return f"flow map '{self.name}', {self.jumps} jump(s)"

    def modules(self):
        return [self.network]

    def run_with(self, base_model, x, sigmas, seed, body):
        self.network.to(x.device)
        return body()


def _dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def describe(spec) -> str:
    return (spec if spec is not None else BaseModelLookahead("denoiser")).describe()

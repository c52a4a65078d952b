"""Few-step LoRAs (LCM, TCD, Lightning / Hyper-SD / Turbo) on the sampled model as look-aheads, beside its weights.

The look-ahead X_{t,1}(x) is `steps` deterministic Euler steps of the sampled model with the LoRA active
(nodes/side_lora.py), from the particle's time down to the data, sampled the way each kind of LoRA is meant to be:

  lcm        LCM's boundary-condition parameterisation: D = c_out(tau) (x - sigma eps) + c_skip(tau) x with
             tau = 10 x the timestep on LCM's 50-step grid, exactly ComfyUI's ModelSamplingDiscrete "lcm"; between
             steps the deterministic DDIM jump replaces the LCM sampler's fresh noise (with 1 step they are the same).
  tcd        TCD with gamma 0: its DDIM jump x' = D + sigma' (x - D) / sigma, the plain noise parameterisation.
  lightning  Lightning / Hyper-SD / Turbo / DMD-style LoRAs: plain Euler steps, the same jump.
Sub-steps are uniform in the model's own timestep from the current one to 0 (the "trailing" spacing these LoRAs'
schedulers use; ComfyUI's sgm_uniform); flow models (FLUX, Qwen-Image) step uniformly in sigma.

In ComfyUI's sigma space an Euler step is exactly the core's Euler step on the linear interpolant, so what this
look-ahead returns is what ComfyUI's euler sampler returns for the same LoRA loaded with LoraLoader (and, for LCM,
ModelSamplingDiscrete lcm), on the same sigmas from the same state (tests/integration/test_few_step_lora.py).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import torch

from ..fmtt_core import FewStepLookahead, FMTTInputError, read_safetensors_header
from ..fmtt_core.flow_maps import FORMATS
from ..fmtt_core.lookahead import uniform_grid
from .clocks import Clock, clock_of, family_of
from .lookahead_specs import BesideTheWeights
from .side_lora import SideLoRA

KINDS = {"lcm": "LCM", "tcd": "TCD", "lightning": "Lightning / Hyper-SD / Turbo"}
CHOICES = ["auto", *KINDS.values()]
# Words in a file name or its metadata that say which kind a LoRA is (checked in this order).
MARKS = (("lcm", ("lcm",)), ("tcd", ("tcd",)),
         ("lightning", ("lightning", "hyper", "turbo", "dmd", "pcm", "flash", "schnell", "lightx2v")))
METADATA_FIELDS = ("ss_output_name", "modelspec.title", "modelspec.description", "ss_training_comment", "name",
                   "description", "title")


def choose_kind(choice: str, file_name: str, metadata: dict) -> tuple[str, str]:
    """(kind, why): the kind the user chose, or for "auto" the one the file's name or metadata names."""
    for kind, label in KINDS.items():
        if choice == label:
            return kind, "chosen"
    texts = [("its name", file_name)] + [(f"metadata {k}", str(metadata[k])) for k in METADATA_FIELDS
                                         if k in (metadata or {})]
    for where, text in texts:
        for kind, words in MARKS:
            if any(w in text.lower() for w in words):
                return kind, f"auto: {where} says {next(w for w in words if w in text.lower())}"
    raise FMTTInputError(
        f"FMTT: cannot tell which kind of few-step LoRA '{file_name}' is (neither its name nor its metadata says "
        "lcm, tcd, lightning, hyper, turbo, ...). Choose its kind in the node's 'kind' widget.")


def trailing_grid(model_sampling, clock: Clock) -> Callable:
    """The look-ahead's sub-steps: uniform in the model's timestep from the current one to 0 (the spacing few-step
    schedulers use), the last step landing at sigma = 0; for flow models uniform in sigma."""
    if clock.kind == "flow":
        return uniform_grid

    def grid(t: torch.Tensor, steps: int) -> list:
        with torch.no_grad():
            sigma = clock.sigma(t.float())
            timestep = model_sampling.timestep(sigma).float()
            inner = [clock.t(model_sampling.sigma(timestep * (1 - j / steps)).to(t.device)).to(t.dtype)
                     for j in range(1, steps)]
        return [t, *inner, torch.ones_like(t)]

    return grid


def _is_plain_eps(model_sampling) -> bool:
    ms = comfy.model_sampling
    other = tuple(getattr(ms, n) for n in ("V_PREDICTION", "EDM", "CONST", "X0") if hasattr(ms, n))
    return isinstance(model_sampling, ms.EPS) and not isinstance(model_sampling, other)


@contextlib.contextmanager
def lcm_parameterisation(base_model, lora: SideLoRA, device):
    """While `lora` is active, the model's timestep and denoised output are LCM's: ComfyUI's ModelSamplingDiscrete
    "lcm" (LCM's 50-step timestep grid, c_skip / c_out boundary condition), on the loaded model's own sampling
    object; outside, the model samples as before."""
    from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

    class LCMSampling(ModelSamplingDiscreteDistilled, LCM):
        pass

    with torch.inference_mode(False):  # its tables enter the look-ahead's autograd graph
        lcm = LCMSampling(base_model.model_config).to(device)
    ms = base_model.model_sampling
    saved = {name: ms.__dict__.get(name) for name in ("timestep", "calculate_denoised")}

    def gated(original, replacement):
        return lambda *args, **kwargs: (replacement if lora.is_active() else original)(*args, **kwargs)

    for name in saved:
        setattr(ms, name, gated(getattr(ms, name), getattr(lcm, name)))
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                delattr(ms, name)
            else:
                setattr(ms, name, before)


@dataclass(frozen=True, eq=False)
class FewStepLoRALookahead(BesideTheWeights):
    """The sampled model with a few-step LoRA beside its weights, `steps` Euler steps from t to 1."""

    lora: SideLoRA
    lora_kind: str  # "lcm" | "tcd" | "lightning"
    why: str
    steps: int
    grid: Callable
    checkpoint: bool = True
    kind = "few_step"

    def describe(self) -> str:
        return (f"few-step LoRA {self.lora.describe()}, {KINDS[self.lora_kind]} ({self.why}), {self.steps} step(s), "
                f"{self.steps} model call(s) per look-ahead")

    def build(self, denoiser, companion=None):
        lora = self.lora

        def with_lora(x, t):
            with lora.active():
                return denoiser(x, t)

        return FewStepLookahead(with_lora, steps=self.steps, checkpoint=self.checkpoint, grid=self.grid)

    @contextlib.contextmanager
    def installed(self, base_model, device=None):
        with self.lora.installed(base_model, device):
            if self.lora_kind != "lcm":
                yield
                return
            device = device if device is not None else comfy.model_management.get_torch_device()
            with lcm_parameterisation(base_model, self.lora, device):
                yield


def load_lookahead(model, path: str, name: str, strength: float, steps: int, kind: str,
                   checkpoint: bool) -> FewStepLoRALookahead:
    header = read_safetensors_header(path, what=f"few-step LoRA '{name}'")  # missing, not safetensors, truncated
    keys = [k for k in header if k != "__metadata__"]
    if any(fmt.matches(keys) for fmt in FORMATS):
        raise FMTTInputError(f"FMTT: '{name}' is a two-time flow-map LoRA: load it with 'FMTT Look-ahead (FLUX "
                             "flow-map LoRA)', which runs it as the flow map it is.")
    lora_kind, why = choose_kind(kind, name, header.get("__metadata__") or {})
    model_sampling = model.get_model_object("model_sampling")
    clock = clock_of(model_sampling, family_of(model.model))
    if lora_kind == "lcm" and not _is_plain_eps(model_sampling):
        raise FMTTInputError(f"FMTT: '{name}' is an LCM LoRA ({why}), and LCM's parameterisation is for noise-"
                             f"prediction models (SD1.5, SDXL); {family_of(model.model)} is not one. Use a LoRA made "
                             "for it, or set 'kind' if the file is not an LCM LoRA.")
    from safetensors.torch import load_file
    with torch.inference_mode(False):
        lora = SideLoRA.build(model, load_file(path), strength, os.path.basename(name))
    return FewStepLoRALookahead(lora, lora_kind, why, steps, trailing_grid(model_sampling, clock), checkpoint)

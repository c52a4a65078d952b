"""A FLUX two-time flow-map LoRA (FMRG's DualTimeEmbedder + diffusers LoRA) on ComfyUI's Flux, as a look-ahead.

What the file means is fmtt_core.flow_maps.two_time_lora's business; this module puts it on ComfyUI's modules:

* LoRA keys go through ComfyUI's own diffusers -> ComfyUI mapping (comfy.lora.model_lora_keys_unet, built on
  comfy.utils.flux_to_diffusers): to_q / to_k / to_v land in row slices of the fused qkv / linear1 weights, the
  final layer's scale / shift halves are swapped, exactly as ComfyUI's LoraLoader would merge them.
* The LoRA runs *beside* the weights (nodes/side_lora.py: out = W x + s up(down(x))), and only inside the
  look-ahead's calls: the base sampler keeps calling the same loaded model without it, so the user's MODEL is never
  modified and no second copy of the 12B weights exists (a weight-patched clone would make ComfyUI swap all weights
  at every look-ahead call).
* The second time embedder is a copy of the model's time_in / guidance_in / vector_in with the file's LoRA (or
  full tensors) merged in; while the look-ahead runs, each of the three returns the mean of itself and its copy,
  the copy's time_in embedding sigma' instead of sigma: vec = (E1(sigma) + E2(sigma')) / 2, FMRG's DualTimeEmbedder.

The LoRA and sigma' are "active" through context variables set around each look-ahead evaluation; block recompute
(autograd.py) restores the call's context in the backward pass, so gradients see the same model the forward pass did.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import comfy.model_base
import comfy.model_management
import comfy.utils
import torch
from comfy.ldm.flux.layers import timestep_embedding

from ..fmtt_core import FlowMapLookahead, FMTTInputError
from ..fmtt_core.flow_maps import TwoTimeLoRA, average_embeddings, inspect_two_time_lora, jump_from_denoiser
from .lookahead_specs import BesideTheWeights
from .side_lora import SideLoRA, forwards_replaced

EMBEDDERS = {"timestep_embedder": "time_in", "guidance_embedder": "guidance_in", "text_embedder": "vector_in"}
_SIGMA_NEXT: contextvars.ContextVar = contextvars.ContextVar("fmtt_flux_flow_map_sigma_next", default=None)


def check_flux(model) -> None:
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.Flux) or isinstance(base, getattr(comfy.model_base, "Flux2", ())) \
            or getattr(base.diffusion_model, "time_in", None) is None:
        name = type(base).__name__ if base is not None else type(model).__name__
        raise FMTTInputError(f"FMTT: the MODEL is {name}, not FLUX.1: the flow-map LoRA was trained on FLUX.1-dev. "
                             "Connect the FLUX.1-dev model (Load Diffusion Model with flux1-dev).")


@dataclass(eq=False)
class FluxFlowMapPatch:
    """The file mapped onto a FLUX MODEL: the base layers' LoRA (side_lora), and the second embedder's weights."""

    info: TwoTimeLoRA
    strength: float
    unet_config: dict
    lora: SideLoRA  # the base layers' LoRA, beside the weights
    second: dict[str, dict[str, object]] = field(default_factory=dict)  # "time_in" -> {"in_layer": delta / full}

    @classmethod
    def build(cls, model, info: TwoTimeLoRA, tensors: dict[str, torch.Tensor], strength: float) -> FluxFlowMapPatch:
        check_flux(model)
        base = model.model
        file_name = info.path.rsplit("/", 1)[-1]
        state = base.state_dict()
        second, unmatched, wrong = {}, [], []
        diffusers_to_comfy = comfy.utils.flux_to_diffusers(base.model_config.unet_config,
                                                           output_prefix="diffusion_model.")
        for name, value in [*info.second.items(), *info.second_full.items()]:
            sub = name if name in info.second else name.rsplit(".", 1)[0]
            target = diffusers_to_comfy.get(f"time_text_embed.{sub}.weight")
            if not isinstance(target, str) or target not in state:
                unmatched.append("second_embedder." + name)
                continue
            embedder, layer_name = target.removeprefix("diffusion_model.").removesuffix(".weight").split(".")
            if name in info.second:  # a LoRA on the copy: delta W (and delta b), merged into the copy at sampling time
                delta = value.delta(tensors) * strength
                if delta.shape != state[target].shape:
                    wrong.append(f"second_embedder.{name}: {tuple(delta.shape)} vs {tuple(state[target].shape)}")
                    continue
                second.setdefault(embedder, {})[layer_name] = delta
                if value.bias is not None:
                    second[embedder][f"{layer_name}.bias"] = value.bias_delta(tensors) * strength
            else:  # a full tensor replacing the copy's weight or bias
                kind = name.rsplit(".", 1)[1]
                second.setdefault(embedder, {})[f"{layer_name}.{kind}="] = tensors[value].float()
        if unmatched:
            raise FMTTInputError(
                f"FMTT: {len(unmatched)} layer(s) of '{file_name}' match nothing in this FLUX model "
                f"(e.g. {', '.join(unmatched[:4])}). The LoRA was made for another model: use the FLUX.1-dev it was "
                "trained on (FMRG's LoRA needs FLUX.1-dev with its guidance embedder).")
        if wrong:
            raise FMTTInputError(f"FMTT: the LoRA's shapes do not fit this FLUX model ({'; '.join(wrong[:3])}): it is "
                                 "for another model size. Use the FLUX.1-dev it was trained on.")
        try:
            lora = SideLoRA.build(model, comfy_named(info, tensors), strength, file_name)
        except FMTTInputError as e:  # the base layers: the same fix as above, in FLUX.1-dev's words
            raise FMTTInputError(f"{e} (FMRG's LoRA needs the FLUX.1-dev it was trained on, with its guidance "
                                 "embedder.)") from None
        return cls(info, strength, dict(base.model_config.unet_config), lora, second)

    # ---------------------------------------------------------------- on the loaded model, while sampling

    def _second_embedders(self, dm, device) -> dict[str, torch.nn.Module]:
        """Copies of time_in / guidance_in / vector_in with the file's second-embedder weights, in float32."""
        copies = {}
        with torch.inference_mode(False):
            for embedder in EMBEDDERS.values():
                original = getattr(dm, embedder, None)
                if original is None:
                    continue
                changes = self.second.get(embedder, {})
                layers = []
                for layer_name in ("in_layer", "out_layer"):
                    src = getattr(original, layer_name)
                    w = changes.get(f"{layer_name}.weight=", src.weight).detach().to(device, torch.float32).clone()
                    b = changes.get(f"{layer_name}.bias=", src.bias)
                    b = None if b is None else b.detach().to(device, torch.float32).clone()
                    if layer_name in changes:
                        w = w + changes[layer_name].to(device)
                    if f"{layer_name}.bias" in changes:
                        b = b + changes[f"{layer_name}.bias"].to(device)
                    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device)
                    linear.weight = torch.nn.Parameter(w, requires_grad=False)
                    if b is not None:
                        linear.bias = torch.nn.Parameter(b, requires_grad=False)
                    layers.append(linear)
                copies[embedder] = torch.nn.Sequential(layers[0], torch.nn.SiLU(), layers[1])
        return copies

    @contextlib.contextmanager
    def installed(self, base_model, device=None):
        """The LoRA's hooks and the dual embedders on the loaded model for a sampling run; they act only while
        `active`. device: where that model computes (default: ComfyUI's compute device; a MultiGPU clone's own)."""
        if dict(base_model.model_config.unet_config) != self.unet_config:
            raise FMTTInputError("FMTT: the flow-map LoRA look-ahead was loaded on another model than the one being "
                                 "sampled; connect the same FLUX.1-dev MODEL to both.")
        dm = base_model.diffusion_model
        device = device if device is not None else comfy.model_management.get_torch_device()
        dual = {getattr(dm, embedder): lambda forward, copy=copy, embedder=embedder: _dual_forward(
            forward, copy, embedder == "time_in") for embedder, copy in self._second_embedders(dm, device).items()}
        with forwards_replaced(dual), self.lora.installed(base_model, device):
            yield

    @contextlib.contextmanager
    def active(self, sigma_next: torch.Tensor):
        """Inside: the model is the two-time model at (sigma, sigma'), sigma' one per row of the caller's batch."""
        token = _SIGMA_NEXT.set(sigma_next.detach().reshape(-1))
        try:
            with self.lora.active():
                yield
        finally:
            _SIGMA_NEXT.reset(token)


def comfy_named(info: TwoTimeLoRA, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base layers' LoRA under the diffusers names ComfyUI's key map knows (`transformer.<module>`), with the
    file's scale (peft metadata, rsLoRA, alpha keys) written as the alpha LoraLoader reads: alpha = scale * rank."""
    named = {}
    for name, layer in info.base.items():
        down = tensors[layer.down]
        named[f"transformer.{name}.lora_A.weight"] = down
        named[f"transformer.{name}.lora_B.weight"] = tensors[layer.up]
        named[f"transformer.{name}.alpha"] = torch.tensor(layer.scale * down.shape[0], dtype=torch.float64)
        if layer.bias is not None:
            named[f"transformer.{name}.lora_B.bias"] = tensors[layer.bias]
    return named


def _rows(sigma_next: torch.Tensor, n: int) -> torch.Tensor:
    """sigma' for the model's batch: ComfyUI stacks the caller's rows once per condition (cond, uncond, ...)."""
    if n % sigma_next.shape[0]:
        raise FMTTInputError(f"FMTT: internal error, the model batch ({n}) is not a multiple of the look-ahead batch "
                             f"({sigma_next.shape[0]}).")
    return sigma_next.repeat(n // sigma_next.shape[0])


def _dual_forward(forward, second, embeds_time: bool):
    def dual_forward(e, *args, **kwargs):
        first = forward(e, *args, **kwargs)
        sigma_next = _SIGMA_NEXT.get()
        if sigma_next is None:
            return first
        if embeds_time:  # the copy embeds sigma', the original sigma (its input e)
            e = timestep_embedding(_rows(sigma_next, e.shape[0]).to(e.device, torch.float32), e.shape[-1])
        return average_embeddings(first, second(e.float()).to(first.dtype))

    return dual_forward


@dataclass(frozen=True, eq=False)
class FluxFlowMapLoRALookahead(BesideTheWeights):
    """(e) FLUX.1-dev's two-time flow-map LoRA: X_{t,1} in `jumps` jumps of the base model run as a flow map."""

    patch: FluxFlowMapPatch
    name: str
    jumps: int = 1
    checkpoint: bool = False
    kind = "flow_map"

    def describe(self) -> str:
        return (f"FLUX flow-map LoRA '{self.name}' (strength {self.patch.strength:g}), {self.jumps} jump(s), "
                f"{self.jumps} model call(s) per look-ahead")

    def flow_map(self, denoiser):
        """X(x, s, t) in the core clock from the base sampler's denoiser D(x, s) (its conditioning, its guidance):
        the model called as the two-time model at (sigma, sigma') = (1 - s, 1 - t)."""

        def jump(x, s, t):
            s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            with self.patch.active(1 - t):
                denoised = denoiser(x, s)
            return jump_from_denoiser(x, s, t, denoised)

        return jump

    def build(self, denoiser, companion=None):
        return FlowMapLookahead(self.flow_map(denoiser), jumps=self.jumps, checkpoint=self.checkpoint)

    def installed(self, base_model, device=None):
        return self.patch.installed(base_model, device)


def load_lookahead(model, path: str, name: str, strength: float, jumps: int, checkpoint: bool):
    info = inspect_two_time_lora(path)  # the header only: wrong files are refused before anything is loaded
    check_flux(model)
    with torch.inference_mode(False):
        tensors = info.load_tensors()
        patch = FluxFlowMapPatch.build(model, info, tensors, strength)
    return FluxFlowMapLoRALookahead(patch, name, jumps, checkpoint)

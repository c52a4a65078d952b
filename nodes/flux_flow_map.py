"""A FLUX two-time flow-map LoRA (FMRG's DualTimeEmbedder + diffusers LoRA) on ComfyUI's Flux, as a look-ahead.

What the file means is fmtt_core.flow_maps.two_time_lora's business; this module puts it on ComfyUI's modules:

* LoRA keys go through ComfyUI's own diffusers -> ComfyUI mapping (comfy.lora.model_lora_keys_unet, built on
  comfy.utils.flux_to_diffusers): to_q / to_k / to_v land in row slices of the fused qkv / linear1 weights, the
  final layer's scale / shift halves are swapped, exactly as ComfyUI's LoraLoader would merge them.
* The LoRA runs *beside* the weights (out = W x + s up(down(x))), and only inside the look-ahead's calls: the base
  sampler keeps calling the same loaded model without it, so the user's MODEL is never modified and no second copy
  of the 12B weights exists (a weight-patched clone would make ComfyUI swap all weights at every look-ahead call).
* The second time embedder is a copy of the model's time_in / guidance_in / vector_in with the file's LoRA (or
  full tensors) merged in; while the look-ahead runs, each of the three returns the mean of itself and its copy,
  the copy's time_in embedding sigma' instead of sigma: vec = (E1(sigma) + E2(sigma')) / 2, FMRG's DualTimeEmbedder.

The LoRA is "active" through a context variable set around each look-ahead evaluation; block recompute (autograd.py)
restores the call's context in the backward pass, so gradients see the same model the forward pass did.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field

import comfy.lora
import comfy.model_base
import comfy.model_management
import comfy.utils
import torch
import torch.nn.functional as F
from comfy.ldm.flux.layers import timestep_embedding

from ..fmtt_core import FlowMapLookahead, FMTTInputError
from ..fmtt_core.flow_maps import TwoTimeLoRA, average_embeddings, inspect_two_time_lora, jump_from_denoiser
from .lookahead_specs import _Plain

EMBEDDERS = {"timestep_embedder": "time_in", "guidance_embedder": "guidance_in", "text_embedder": "vector_in"}
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fmtt_flux_flow_map", default=None)


@dataclass(frozen=True)
class _Piece:
    """One LoRA on (a row slice of) a ComfyUI Linear: rows [start, start + size) get s * up(down(x))."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    rows: tuple[int, int] | None = None  # (start, size) inside a fused weight, None: all rows
    function: object = None  # ComfyUI's row transform of the weight (the final layer's scale / shift swap)

    def __call__(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        h = F.linear(F.linear(x, self.down.to(x)), self.up.to(x)) * self.scale
        if self.function is not None:
            h = self.function(h.movedim(-1, 0)).movedim(0, -1)
        if self.rows is not None:
            start, size = self.rows
            h = F.pad(h, (start, out_features - start - size))
        return h


def check_flux(model) -> None:
    base = getattr(model, "model", None)
    if not isinstance(base, comfy.model_base.Flux) or isinstance(base, getattr(comfy.model_base, "Flux2", ())) \
            or getattr(base.diffusion_model, "time_in", None) is None:
        name = type(base).__name__ if base is not None else type(model).__name__
        raise FMTTInputError(f"FMTT: the MODEL is {name}, not FLUX.1: the flow-map LoRA was trained on FLUX.1-dev. "
                             "Connect the FLUX.1-dev model (Load Diffusion Model with flux1-dev).")


def _module_path(key: str) -> str:
    return key.removeprefix("diffusion_model.").removesuffix(".weight")


def _split_target(value):
    """ComfyUI's key map entry: a weight key, (key, (dim, start, size)) or (key, None, function)."""
    if isinstance(value, str):
        return value, None, None
    key, offset = value[0], value[1]
    return key, (None if offset is None else (int(offset[1]), int(offset[2]))), (value[2] if len(value) > 2 else None)


@dataclass(eq=False)
class FluxFlowMapPatch:
    """The file mapped onto a FLUX MODEL: LoRA pieces per ComfyUI Linear, and the second embedder's weights."""

    info: TwoTimeLoRA
    strength: float
    unet_config: dict
    pieces: dict[str, list[_Piece]] = field(default_factory=dict)
    second: dict[str, dict[str, object]] = field(default_factory=dict)  # "time_in" -> {"in_layer": delta / full}

    @classmethod
    def build(cls, model, info: TwoTimeLoRA, tensors: dict[str, torch.Tensor], strength: float) -> FluxFlowMapPatch:
        check_flux(model)
        base = model.model
        key_map = comfy.lora.model_lora_keys_unet(base, {})
        state = base.state_dict()
        patch = cls(info, strength, dict(base.model_config.unet_config))
        unmatched, wrong = [], []
        for name, layer in info.base.items():
            target = key_map.get("transformer." + name)
            if target is None or _split_target(target)[0] not in state:
                unmatched.append(name)
                continue
            key, rows, function = _split_target(target)
            down, up = tensors[layer.down], tensors[layer.up]  # kept as stored; moved once per sampling run
            out_rows = rows[1] if rows is not None else state[key].shape[0]
            if state[key].ndim != 2 or down.shape[1] != state[key].shape[1] or up.shape[0] != out_rows:
                wrong.append(f"{name}: LoRA {(up.shape[0], down.shape[1])}, model {tuple(state[key].shape)}")
                continue
            patch.pieces.setdefault(_module_path(key), []).append(
                _Piece(down, up, layer.scale * strength, rows, function))
        diffusers_to_comfy = comfy.utils.flux_to_diffusers(base.model_config.unet_config,
                                                           output_prefix="diffusion_model.")
        for name, value in [*info.second.items(), *info.second_full.items()]:
            sub = name if name in info.second else name.rsplit(".", 1)[0]
            target = diffusers_to_comfy.get(f"time_text_embed.{sub}.weight")
            if not isinstance(target, str) or target not in state:
                unmatched.append("second_embedder." + name)
                continue
            embedder, layer_name = _module_path(target).split(".")
            if name in info.second:  # a LoRA on the copy: delta W, merged into the copy at sampling time
                delta = value.delta(tensors) * strength
                if delta.shape != state[target].shape:
                    wrong.append(f"second_embedder.{name}: {tuple(delta.shape)} vs {tuple(state[target].shape)}")
                    continue
                patch.second.setdefault(embedder, {})[layer_name] = delta
            else:  # a full tensor replacing the copy's weight or bias
                kind = name.rsplit(".", 1)[1]
                patch.second.setdefault(embedder, {})[f"{layer_name}.{kind}="] = tensors[value].float()
        if unmatched:
            raise FMTTInputError(
                f"FMTT: {len(unmatched)} layer(s) of '{info.path.rsplit('/', 1)[-1]}' match nothing in this FLUX model "
                f"(e.g. {', '.join(unmatched[:4])}). The LoRA was made for another model: use the FLUX.1-dev it was "
                "trained on (FMRG's LoRA needs FLUX.1-dev with its guidance embedder).")
        if wrong:
            raise FMTTInputError(f"FMTT: the LoRA's shapes do not fit this FLUX model ({'; '.join(wrong[:3])}): it is "
                                 "for another model size. Use the FLUX.1-dev it was trained on.")
        return patch

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
                    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=device)
                    linear.weight = torch.nn.Parameter(w, requires_grad=False)
                    if b is not None:
                        linear.bias = torch.nn.Parameter(b, requires_grad=False)
                    layers.append(linear)
                copies[embedder] = torch.nn.Sequential(layers[0], torch.nn.SiLU(), layers[1])
        return copies

    @contextlib.contextmanager
    def installed(self, base_model, device=None):
        """Hooks on the loaded model's modules for the duration of a sampling run; they act only while `active`.
        device: where that model computes (default: ComfyUI's compute device; a MultiGPU clone's own device)."""
        if dict(base_model.model_config.unet_config) != self.unet_config:
            raise FMTTInputError("FMTT: the flow-map LoRA look-ahead was loaded on another model than the one being "
                                 "sampled; connect the same FLUX.1-dev MODEL to both.")
        dm = base_model.diffusion_model
        device = device if device is not None else comfy.model_management.get_torch_device()
        dtype = base_model.get_dtype_inference()
        dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
        saved = []

        def replace(module, forward):
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward

        with torch.inference_mode(False):  # on the compute device once, not at every call
            on_device = {path: [dataclasses.replace(p, down=p.down.to(device, dtype), up=p.up.to(device, dtype))
                                for p in pieces] for path, pieces in self.pieces.items()}
        for path, pieces in on_device.items():
            module = dm.get_submodule(path)
            replace(module, _lora_forward(module.forward, pieces, module.weight.shape[0]))
        for embedder, copy in self._second_embedders(dm, device).items():
            module = getattr(dm, embedder)
            replace(module, _dual_forward(module.forward, copy, embedder == "time_in"))
        try:
            yield
        finally:
            for module, before in reversed(saved):
                if before is None:
                    del module.forward
                else:
                    module.forward = before

    @contextlib.contextmanager
    def active(self, sigma_next: torch.Tensor):
        """Inside: the model is the two-time model at (sigma, sigma'), sigma' one per row of the caller's batch."""
        token = _ACTIVE.set(sigma_next.detach().reshape(-1))
        try:
            yield
        finally:
            _ACTIVE.reset(token)


def _rows(sigma_next: torch.Tensor, n: int) -> torch.Tensor:
    """sigma' for the model's batch: ComfyUI stacks the caller's rows once per condition (cond, uncond, ...)."""
    if n % sigma_next.shape[0]:
        raise FMTTInputError(f"FMTT: internal error, the model batch ({n}) is not a multiple of the look-ahead batch "
                             f"({sigma_next.shape[0]}).")
    return sigma_next.repeat(n // sigma_next.shape[0])


def _lora_forward(forward, pieces, out_features):
    def lora_forward(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        if _ACTIVE.get() is None:
            return out
        return out + sum(piece(x, out_features) for piece in pieces).to(out.dtype)

    return lora_forward


def _dual_forward(forward, second, embeds_time: bool):
    def dual_forward(e, *args, **kwargs):
        first = forward(e, *args, **kwargs)
        sigma_next = _ACTIVE.get()
        if sigma_next is None:
            return first
        if embeds_time:  # the copy embeds sigma', the original sigma (its input e)
            e = timestep_embedding(_rows(sigma_next, e.shape[0]).to(e.device, torch.float32), e.shape[-1])
        return average_embeddings(first, second(e.float()).to(first.dtype))

    return dual_forward


@dataclass(frozen=True, eq=False)
class FluxFlowMapLoRALookahead(_Plain):
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

    def run_with(self, base_model, x, sigmas, seed, body):
        with self.patch.installed(base_model):
            return body()


def load_lookahead(model, path: str, name: str, strength: float, jumps: int, checkpoint: bool):
    info = inspect_two_time_lora(path)  # the header only: wrong files are refused before anything is loaded
    check_flux(model)
    with torch.inference_mode(False):
        tensors = info.load_tensors()
        patch = FluxFlowMapPatch.build(model, info, tensors, strength)
    return FluxFlowMapLoRALookahead(patch, name, jumps, checkpoint)

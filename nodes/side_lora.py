"""LoRAs beside the weights: a LoRA that acts on a loaded ComfyUI model only inside the calls that ask for it.

API (stable: the look-ahead nodes and the flow-map distillation trainer's node load their LoRAs through it)

    lora = SideLoRA.build(model, tensors, strength, file_name)
        model      the ComfyUI MODEL (ModelPatcher) the LoRA is for; any family ComfyUI's LoraLoader knows
        tensors    the file's state dict ({key: tensor}), in any naming LoraLoader accepts: kohya `lora_unet_...`,
                   diffusers / peft (`unet.` / `transformer.` ... `lora_A` / `lora_B` / `lora.down` ...), ComfyUI's
                   own (`diffusion_model....lora_up.weight`); peft's `lora_B.bias` (lora_bias=True) and ComfyUI's
                   `diff_b` are added to the layer's output; text-encoder keys are skipped (lora.skipped)
        strength   multiplies every layer's alpha / rank, as LoraLoader's strength_model
        file_name  named in every error
      Checked here, each refusal an FMTTInputError naming the file, the layer and the fix: keys that match nothing
      in the model (a few named), up / down ranks that disagree, shapes that do not fit the layer, non-finite values,
      adapters other than plain LoRA (LoHa, LoKr, OFT, DoRA, full weight diffs).
    with lora.installed(base_model, device):   # hooks on the loaded BaseModel's modules, for one sampling run
        with lora.active():                    # only inside: every hooked layer computes W x + b + s up(down(x))
            ...model calls...                  # lora.is_active(): whether this call is inside (for other hooks)

Why beside the weights: ComfyUI's LoraLoader merges a LoRA into a clone's weights, so a look-ahead run with the LoRA
and a base sampler without it would make ComfyUI swap the LoRA in and out of the shared weights at every call (or
hold a second copy of the model). Here the user's MODEL is never modified: outside `active` the hooks return the
layer's own output; inside, they add the LoRA's low-rank product, computed from the input (rank-r matrices only, no
merged weight). The result equals LoraLoader's merged weights up to float rounding: (W + s B A) x = W x + s B (A x).

`active` is a context variable: it follows the call into ComfyUI's model and into block recompute (nodes/autograd.py
re-runs a block in the context of its forward call), and it is per thread, so MultiGPU workers running other devices'
blocks see only their own calls. MultiGPU clones get the same hooks with `installed(clone_base_model, clone_device)`.
Gradients flow to the layer inputs through the LoRA's constant matrices (exact: the same linear maps).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.weight_adapter
import torch
import torch.nn.functional as F

from ..fmtt_core import FMTTInputError
from ..fmtt_core.flow_maps import family_of
from .autograd import trained_beside

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fmtt_side_lora", default=frozenset())
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "text_encoders.", "lora_text_encoder")
__all__ = ["SideLoRA", "SideLoRAError"]


class SideLoRAError(FMTTInputError):
    """A LoRA file that cannot act beside this model's weights: names the file, the layer and the fix."""


@dataclass(frozen=True)
class _Piece:
    """One LoRA on (a row slice of) a ComfyUI Linear or Conv: output channels [start, start + size) get
    scale * up(down(x)) + bias_scale * bias."""

    down: torch.Tensor  # [r, in] or [r, in, *kernel]
    up: torch.Tensor  # [out, r] or [out, r, 1, ...]
    scale: float
    bias: torch.Tensor | None = None  # [out]: peft's lora_B.bias (times scale) or ComfyUI's diff_b (times strength)
    bias_scale: float = 1.0
    rows: tuple[int, int] | None = None  # (start, size) inside a fused weight; None: all rows
    function: object = None  # ComfyUI's row transform of the weight (FLUX's final-layer scale / shift swap)
    conv: dict | None = None  # the layer's stride / padding / dilation; None: a Linear

    def to(self, device, dtype) -> _Piece:
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return dataclasses.replace(self, down=move(self.down), up=move(self.up), bias=move(self.bias))

    def __call__(self, x: torch.Tensor, out_channels: int) -> torch.Tensor:
        channel = -1 if self.conv is None else 1
        if self.down.numel() == 0:  # a bias difference alone: broadcast over the output
            shape = [1] * x.ndim
            shape[channel] = -1
            return (self.bias.to(x) * self.bias_scale).view(shape)
        if self.conv is None:
            h = F.linear(F.linear(x, self.down.to(x)), self.up.to(x)) * self.scale
        else:  # the spatial kernel is the down matrix's; up only mixes channels (a 1x1 convolution)
            conv = (F.conv1d, F.conv2d, F.conv3d)[x.ndim - 3]
            h = conv(conv(x, self.down.to(x), **self.conv), self.up.to(x)) * self.scale
        if self.bias is not None:
            shape = [1] * h.ndim
            shape[channel] = -1
            h = h + (self.bias.to(x) * self.bias_scale).view(shape)
        if self.function is not None:
            h = self.function(h.movedim(channel, 0)).movedim(0, channel)
        if self.rows is not None:
            start, size = self.rows
            h = F.pad(h.movedim(channel, -1), (start, out_channels - start - size)).movedim(-1, channel)
        return h


def _split_target(value):
    """ComfyUI's key map entry: a weight key, (key, (dim, start, size)) or (key, offset, function)."""
    if isinstance(value, str):
        return value, None, None
    key, offset = value[0], value[1]
    return key, (None if offset is None else (int(offset[1]), int(offset[2]))), (value[2] if len(value) > 2 else None)


def _module_path(key: str) -> str:
    return key.removeprefix("diffusion_model.").rsplit(".", 1)[0]


def _conv_args(module) -> dict | None:
    if not isinstance(module, torch.nn.modules.conv._ConvNd):
        return None
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}


@dataclass(eq=False)
class SideLoRA:
    """A LoRA mapped onto a ComfyUI model's modules: pieces per module path, applied beside the weights."""

    file_name: str
    strength: float
    unet_config: dict
    pieces: dict[str, list[_Piece]] = field(default_factory=dict)  # "input_blocks.1.1.proj_in" -> pieces
    skipped: list[str] = field(default_factory=list)  # text-encoder keys: the look-ahead uses the sampler's conds

    @property
    def layers(self) -> int:
        return sum(len(p) for p in self.pieces.values())

    def describe(self) -> str:
        skipped = f", {len(self.skipped)} text-encoder tensors not used" if self.skipped else ""
        return f"'{self.file_name}' ({self.layers} layers, strength {self.strength:g}{skipped})"

    # ---------------------------------------------------------------- building: ComfyUI's key mapping + checks

    @classmethod
    def build(cls, model, tensors: dict[str, torch.Tensor], strength: float, file_name: str) -> SideLoRA:
        if not math.isfinite(strength):
            raise SideLoRAError(f"FMTT: the strength for '{file_name}' is {strength}; give a finite number (1.0: as "
                                "trained).")
        base = model.model
        tensors = comfy.lora_convert.convert_lora(dict(tensors))
        skipped = sorted(k for k in tensors if k.startswith(TEXT_ENCODER_PREFIXES))
        unet_tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
        if not unet_tensors:
            raise SideLoRAError(f"FMTT: '{file_name}' holds no tensors for the diffusion model (only text-encoder "
                                "ones, or none): it is not a LoRA for the sampled model.")
        key_map = comfy.lora.model_lora_keys_unet(base, {})
        patches = comfy.lora.load_lora(unet_tensors, key_map, log_missing=False)
        lora = cls(file_name, strength, dict(base.model_config.unet_config), skipped=skipped)
        used = set()
        lora_b_biases = {}
        for x in key_map:  # peft lora_bias=True: ComfyUI's loader does not read lora_B.bias; peft adds it, scaled
            if f"{x}.lora_B.bias" in unet_tensors and f"{x}.lora_B.weight" in unet_tensors:
                lora_b_biases[key_map[x]] = f"{x}.lora_B.bias"
        state = base.state_dict()
        for target, patch in patches.items():
            key, rows, function = _split_target(target)
            layer = _module_path(key)
            if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
                used |= patch.loaded_keys
                piece = _lora_piece(file_name, layer, patch, state.get(key), strength, rows, function,
                                    base.diffusion_model.get_submodule(layer))
                bias_key = lora_b_biases.get(target)
                if bias_key is not None:
                    used.add(bias_key)
                    piece = dataclasses.replace(piece, bias=_checked(file_name, layer, unet_tensors[bias_key], "bias"),
                                                bias_scale=piece.scale)
                lora.pieces.setdefault(layer, []).append(piece)
            elif isinstance(patch, tuple) and patch[0] == "diff" and key.endswith(".bias") and rows is None:
                bias = _checked(file_name, layer, patch[1][0], "bias difference")
                if key not in state or state[key].shape != bias.shape:
                    model_bias = tuple(state[key].shape) if key in state else "none"
                    raise SideLoRAError(f"FMTT: '{file_name}': the bias difference of {layer} has shape "
                                        f"{tuple(bias.shape)}, the model's bias {model_bias}: the LoRA is for another "
                                        "model. Use the model it was trained for.")
                empty = torch.zeros(0, 0)
                lora.pieces.setdefault(layer, []).append(_Piece(empty, empty, 0.0, bias=bias, bias_scale=strength,
                                                                conv=_conv_args(base.diffusion_model.get_submodule(layer))))
            else:
                kind = getattr(patch, "name", None) or (patch[0] if isinstance(patch, tuple) else type(patch).__name__)
                raise SideLoRAError(
                    f"FMTT: '{file_name}' holds a '{kind}' patch on {layer}; only plain LoRA (up / down matrices, "
                    "with alpha and biases) can act beside the weights. Load this file with LoraLoader instead, or use "
                    "a plain LoRA.")
        used |= {f"{x}.diff_b" for x in key_map if f"{x}.diff_b" in unet_tensors}
        unmatched = sorted(k for k in unet_tensors if k not in used and not k.endswith(".alpha"))
        if unmatched or not lora.pieces:
            family = family_of(unet_tensors)
            what = f"it looks like a LoRA for {family}" if family else "it is for another model"
            raise SideLoRAError(
                f"FMTT: {len(unmatched)} of the {len(unet_tensors)} tensors of '{file_name}' match nothing in this "
                f"{type(base).__name__} model (e.g. {', '.join(unmatched[:4])}): {what}. Use a LoRA made for the "
                "sampled model's family (the one LoraLoader applies to it without 'lora key not loaded' warnings).")
        return lora

    # ---------------------------------------------------------------- on the loaded model, while sampling

    @contextlib.contextmanager
    def installed(self, base_model, device=None):
        """Hooks on the loaded model's modules for the duration of a sampling run; they act only while `active`.
        base_model: the BaseModel being sampled (ModelPatcher.model; a MultiGPU clone's own); device: where it
        computes (default: ComfyUI's compute device). The LoRA's matrices are moved there once, here."""
        if dict(base_model.model_config.unet_config) != self.unet_config:
            raise SideLoRAError(f"FMTT: the LoRA '{self.file_name}' was loaded on another model than the one being "
                                "sampled; connect the same MODEL to the look-ahead and to the sampler.")
        dm = base_model.diffusion_model
        device = device if device is not None else comfy.model_management.get_torch_device()
        dtype = base_model.get_dtype_inference()
        dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
        with torch.inference_mode(False):
            on_device = {path: [p.to(device, dtype) for p in pieces] for path, pieces in self.pieces.items()}
        modules = {path: dm.get_submodule(path) for path in on_device}
        # A LoRA being trained (the flow-map trainer's): recomputed blocks must differentiate its matrices too.
        trained = [t for pieces in on_device.values() for p in pieces for t in (p.down, p.up, p.bias)
                   if t is not None and t.requires_grad]
        with forwards_replaced({modules[path]: lambda forward, path=path: _side_forward(
                self, forward, on_device[path], modules[path].weight.shape[0]) for path in on_device}), \
                trained_beside(trained):
            yield

    @contextlib.contextmanager
    def active(self):
        """Inside (this thread, and block recomputes of calls made here): the hooked layers carry the LoRA."""
        token = _ACTIVE.set(_ACTIVE.get() | {self})
        try:
            yield
        finally:
            _ACTIVE.reset(token)

    def is_active(self) -> bool:
        return self in _ACTIVE.get()


def _side_forward(lora: SideLoRA, forward, pieces: list[_Piece], out_channels: int):
    def side_forward(x, *args, **kwargs):
        out = forward(x, *args, **kwargs)
        if not lora.is_active():
            return out
        return out + sum(piece(x, out_channels) for piece in pieces).to(out.dtype)

    return side_forward


def _checked(file_name: str, layer: str, tensor: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise SideLoRAError(f"FMTT: '{file_name}' holds non-finite values (NaN / inf) in the {what} of {layer}: the "
                            "file is damaged. Download or export it again.")
    return tensor


def _lora_piece(file_name, layer, adapter, weight, strength, rows, function, module) -> _Piece:
    """The LoRA's matrices for one layer, checked against it: ranks, shapes, values."""
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if dora_scale is not None or mid is not None or reshape is not None:
        kind = "a DoRA" if dora_scale is not None else "a LoCon with a Tucker mid matrix" if mid is not None \
            else "a reshaping LoRA"
        raise SideLoRAError(f"FMTT: '{file_name}' is {kind} on {layer}; only plain LoRA can act beside the weights. "
                            "Load it with LoraLoader instead.")
    up = _checked(file_name, layer, up, "up (B) matrix")
    down = _checked(file_name, layer, down, "down (A) matrix")
    if alpha is not None and not math.isfinite(alpha):
        raise SideLoRAError(f"FMTT: '{file_name}': the alpha of {layer} is {alpha}; the file is damaged.")
    rank = down.shape[0]
    if up.ndim < 2 or up.shape[1] != rank:
        raise SideLoRAError(f"FMTT: '{file_name}': the LoRA of {layer} has up (B) {tuple(up.shape)} and down (A) "
                            f"{tuple(down.shape)}: their ranks disagree ({up.shape[1] if up.ndim > 1 else '?'} vs "
                            f"{rank}). The file is damaged or was edited; export it again.")
    out_rows = rows[1] if rows is not None else weight.shape[0]
    conv = _conv_args(module)
    if conv is not None:  # a conv layer: down carries the kernel, up is 1x1 (a Linear-shaped LoRA on a 1x1 conv too)
        kernel = tuple(weight.shape[2:])
        if down.ndim == 2 and down.shape[1] == weight[0].numel():
            down = down.reshape(rank, weight.shape[1], *kernel)
        up = up.reshape(*up.shape[:2], *[1] * len(kernel)) if up.ndim == 2 else up
        fits = tuple(down.shape[1:]) == tuple(weight.shape[1:]) and all(k == 1 for k in up.shape[2:])
    else:
        if down.ndim > 2 and all(k == 1 for k in down.shape[2:]) and all(k == 1 for k in up.shape[2:]):
            down, up = down.flatten(1), up.flatten(1)
        fits = down.ndim == 2 and up.ndim == 2 and weight.ndim == 2 and down.shape[1] == weight.shape[1]
    if not fits or up.shape[0] != out_rows:
        raise SideLoRAError(f"FMTT: '{file_name}': the LoRA of {layer} gives a {tuple(up.shape[:1])} x "
                            f"{tuple(down.shape[1:])} change, the model's layer is {tuple(weight.shape)}: the LoRA is "
                            "for another model (or size). Use a LoRA made for the sampled model.")
    scale = (alpha / rank if alpha is not None else 1.0) * strength
    return _Piece(down, up, scale, rows=rows, function=function, conv=conv)


@contextlib.contextmanager
def forwards_replaced(wrappers: dict):
    """Inside: each module's forward is wrapper(its forward); afterwards exactly what it was (an instance-level
    forward put back, the class's forward uncovered), so no hook outlives the sampling run."""
    saved = []
    try:
        for module, wrap in wrappers.items():
            saved.append((module, module.__dict__.get("forward")))
            module.forward = wrap(module.forward)
        yield
    finally:
        for module, before in reversed(saved):
            if before is None:
                del module.forward
            else:
                module.forward = before

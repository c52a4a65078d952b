"""Two-time conditioning for every family the pack samples: the loaded model as u(x; sigma, sigma').

FMRG's DualTimeEmbedder, for every family: a copy of the model's own time embedder embeds the second time sigma',
and the conditioning vector is the mean of the two embeddings, (E(sigma) + E2(sigma')) / 2. A LoRA on the model's
Linears and on the copy makes the pair (sigma, sigma') matter. Both act *beside* the weights and only while a
two-time call is active (a context variable): outside those calls the loaded MODEL is the plain base model, which
is what the teacher of the distillation and the base sampler of FMTT see, with no second copy of the weights.

family         ComfyUI config       copied embedder(s)                          second input
SD1.5, SDXL    SD15 / SD20 / SDXL   time_embed (sinusoid -> MLP)                sinusoid of timestep(sigma')
FLUX.1         Flux / FluxSchnell   time_in, guidance_in, vector_in             sinusoid of sigma' (time_in only)
SD3 / SD3.5    SD3                  t_embedder (takes the timestep itself)      timestep(sigma')
Z-Image        ZImage               t_embedder (takes (1 - timestep) x scale)   (1 - timestep(sigma')) x time_scale

timestep(sigma') is the model's own sigma -> timestep map, made continuous for discrete (SD) schedules by
interpolating log sigma, so that d/dsigma' exists for the distillation's finite differences.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import re
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import torch
import torch.nn.functional as F
from comfy.ldm.flux.layers import timestep_embedding as flux_embedding
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding as unet_embedding

from ..fmtt_core import FMTTInputError
from .side_lora import SideLoRA

_SECOND: contextvars.ContextVar = contextvars.ContextVar("fmtt_second_time", default=None)


@dataclass(frozen=True)
class Family:
    name: str
    configs: tuple[str, ...]          # ComfyUI supported_models class names
    embedders: tuple[str, ...]        # modules copied as the second embedder (absent ones skipped)
    time_embedder: str                # the one whose input is the time
    second_input: object              # (diffusion model, original input, timestep') -> the copy's input
    targets: re.Pattern               # Linears (ComfyUI module paths) that get a LoRA
    frequency_layer: str              # the time embedder's Linear that reads the sinusoids of the timestep


# No LoRA on the Linear that reads the timestep's sinusoids (frequency_layer), in the model's time embedder or in its
# copy: those sinusoids turn up to ~1 radian per timestep unit, ~1000 per unit of time, and a LoRA's random down
# projection reads them all, whatever weight the model gives them. Measured on the tiny SD3 / Z-Image: once trained,
# the student then varied in its target time at a scale LSD's finite difference (step 5e-3) cannot resolve (the
# derivative at steps 5e-3 and 1.25e-3 differed by 50-95 %, the teacher's by 0.1 %), and the LSD residual it trained
# on was noise. Without it, the two-time dependence is built from the model's own time features, as smooth as its
# velocity (the two derivatives agree to 0.1-0.2 %). The second layer and the copy of the first keep the pair apart.
_UNET_TARGETS = re.compile(r"(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
                           r"|time_embed\.2)$")
FAMILIES = (
    Family("SD1.5 / SDXL", ("SD15", "SD20", "SDXL"), ("time_embed",), "time_embed",
           lambda dm, e, ts: unet_embedding(ts, e.shape[-1]), _UNET_TARGETS, "time_embed.0"),
    Family("FLUX.1", ("Flux", "FluxSchnell"), ("time_in", "guidance_in", "vector_in"), "time_in",
           lambda dm, e, ts: flux_embedding(ts, e.shape[-1]),
           re.compile(r"((double_blocks|single_blocks)\.\d+\.(img_attn\.(qkv|proj)|txt_attn\.(qkv|proj)|img_mlp\.[02]"
                      r"|txt_mlp\.[02]|linear1|linear2)|time_in\.out_layer)$"), "time_in.in_layer"),
    Family("SD3 / SD3.5", ("SD3",), ("t_embedder",), "t_embedder", lambda dm, t, ts: ts,
           re.compile(r"(joint_blocks\.\d+\.(x_block|context_block)\.(attn\.(qkv|proj)|mlp\.fc[12])"
                      r"|t_embedder\.mlp\.2)$"), "t_embedder.mlp.0"),
    Family("Z-Image", ("ZImage",), ("t_embedder",), "t_embedder",
           # NextDiT embeds t_embedder((1 - timestep) x time_scale), timestep = sigma (comfy/ldm/lumina/model.py)
           lambda dm, t, ts: (1 - ts) * dm.time_scale,
           re.compile(r"((layers|noise_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])"
                      r"|t_embedder\.mlp\.2)$"), "t_embedder.mlp.0"),
)
SUPPORTED = "SD1.5 (eps and v), SDXL, FLUX.1 (dev / schnell), SD3 / SD3.5 and Z-Image"


def family_of(base_model) -> Family:
    config = type(getattr(base_model, "model_config", None)).__name__
    for family in FAMILIES:
        if config in family.configs:
            return family
    raise FMTTInputError(f"FMTT: two-time flow maps are not available for the {config} model: they are implemented "
                         f"for {SUPPORTED}. Load one of those (the base model you sample with).")


def model_fingerprint(base_model) -> str:
    """A short hash of the diffusion model's tensors (names, shapes, the first values of each): tells whether a file
    was trained on this model without reading all of its weights."""
    h = hashlib.sha256()
    for name, t in sorted(base_model.diffusion_model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1)[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_timestep(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """The model's timestep input for sigma, continuous also for discrete schedules (log-sigma interpolated)."""
    log_sigmas = getattr(model_sampling, "log_sigmas", None)
    if log_sigmas is None or not isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete):
        return model_sampling.timestep(sigma).float()
    table = log_sigmas.float().to(sigma.device)
    s = sigma.float().clamp(table[0].exp(), table[-1].exp()).log()
    i = torch.searchsorted(table, s.contiguous()).clamp(1, len(table) - 1)
    lo, hi = table[i - 1], table[i]
    return (i - 1).float() + (s - lo) / (hi - lo)


class LoRALinear(torch.nn.Module):
    """A Linear of the second embedder with its LoRA: x -> x (W + up down)^T + b (W, b frozen: the model's own, or
    the file's where it replaces them, as FMRG's files may)."""

    def __init__(self, linear: torch.nn.Linear, down: torch.Tensor, up: torch.Tensor, trainable: bool,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        device = linear.weight.device  # all on the model's device: installed() uses them there as they are

        def frozen(t):
            return None if t is None else torch.nn.Parameter(t.detach().to(device).clone().float(),
                                                            requires_grad=False)
        with torch.inference_mode(False):
            self.weight = frozen(linear.weight if weight is None else weight)
            self.bias = frozen(linear.bias if bias is None else bias)
            self.down = torch.nn.Parameter(down.detach().to(device).clone().float(), requires_grad=trainable)
            self.up = torch.nn.Parameter(up.detach().to(device).clone().float(), requires_grad=trainable)

    def forward(self, x):
        return F.linear(x.to(self.weight.dtype), self.weight + self.up @ self.down, self.bias)


class TwoTimeAdapter(torch.nn.Module):
    """The two-time model's own tensors: a LoRA beside the model's Linears, applied by the pack's one mechanism for
    that (nodes/side_lora.py), and the second time embedder (a copy of the model's, with a LoRA on its Linears).

    lora[path]    = (down [r, in], up [out, r]) on the model's Linear `path` (ComfyUI's module path)
    copies[name]  = the copied embedder; its Linears are LoRALinear (second[name.sub] = their (down, up))

    Every two-time file is read into one: the pack's own (`base`, `second`), and FMRG's FLUX LoRA
    (nodes/flux_flow_map.py), whose base layers come as a SideLoRA built from its diffusers names (`side`) and whose
    second-embedder changes may also replace a copied Linear's weight or bias (`replaced[name.sub]`).
    """

    def __init__(self, family: Family, model, base: dict, second: dict, trainable: bool, name: str,
                 side: SideLoRA | None = None, replaced: dict | None = None):
        super().__init__()
        self.family, self.name = family, name
        dm = model.model.diffusion_model
        self.lora = _pairs(base, trainable)
        self.copies = torch.nn.ModuleDict()
        replaced = replaced or {}
        with torch.inference_mode(False):
            for embedder in family.embedders:
                module = getattr(dm, embedder, None)
                if module is not None:
                    self.copies[embedder] = _lora_copy(module, embedder, second, trainable, replaced)
        copied = {f"{e}.{sub}" for e, c in self.copies.items() for sub, m in c.named_modules()
                  if isinstance(m, LoRALinear)}
        unused = sorted((set(second) | set(replaced)) - copied)
        if unused:
            raise FMTTInputError(f"FMTT: '{name}' has second-embedder layers this {family.name} model lacks "
                                 f"({', '.join(unused[:3])}): it was trained on another model.")
        tensors = {f"diffusion_model.{path}.lora_{side}.weight": t
                   for path, (down, up) in _items(self.lora) for side, t in (("down", down), ("up", up))}
        # SideLoRA holds these very Parameters (no copy): it applies what the optimiser updates.
        self.side = side if side is not None else SideLoRA.build(model, tensors, 1.0, name) if tensors else None
        _set_model_sampling(self, None)

    @classmethod
    def fresh(cls, model, rank: int, generator: torch.Generator, name: str) -> TwoTimeAdapter:
        """Random down (1 / sqrt(in)), zero up: at the start the LoRA adds nothing and the copy equals the original."""
        family = family_of(model.model)
        dm = model.model.diffusion_model
        layers = {p: m.weight.shape for p, m in dm.named_modules()
                  if family.targets.search(p) and isinstance(m, torch.nn.Linear)}
        if not layers:
            raise FMTTInputError(f"FMTT: no layers of this {family.name} model match the flow-map LoRA's targets; "
                                 "the model's layout is not the one this pack knows.")
        second = {f"{e}.{sub}": m.weight.shape for e in family.embedders if getattr(dm, e, None) is not None
                  for sub, m in getattr(dm, e).named_modules()
                  if isinstance(m, torch.nn.Linear) and f"{e}.{sub}" != family.frequency_layer}
        with torch.inference_mode(False):
            def init(shapes):
                return {p: (torch.randn(rank, s[1], generator=generator) / s[1] ** 0.5, torch.zeros(s[0], rank))
                        for p, s in shapes.items()}
            return cls(family, model, init(layers), init(second), trainable=True, name=name)

    def second_pairs(self) -> list:
        return [(f"{e}.{sub}", (m.down, m.up)) for e, c in self.copies.items()
                for sub, m in c.named_modules() if isinstance(m, LoRALinear) and m.down.shape[0] > 0]

    def tensors(self) -> tuple[dict, dict]:
        """({path: (down, up)} on the model, {embedder.path: (down, up)} on the copy), detached."""
        return ({p: (d.detach(), u.detach()) for p, (d, u) in _items(self.lora)},
                {p: (d.detach(), u.detach()) for p, (d, u) in self.second_pairs()})

    # ---------------------------------------------------------------- on the loaded model

    @contextlib.contextmanager
    def installed(self, base_model, device=None):
        """The LoRA (side_lora) and the dual-embedder hooks on the loaded model, acting only inside `active`.
        device: where that model computes (default: ComfyUI's compute device; a MultiGPU clone's own, each clone
        installed in turn inside the main model's installation).
        For training, install per step: side_lora casts the matrices to the model's device and dtype on entry; the
        copies the optimiser trains are used where they are (built on the model's device; moved there otherwise)."""
        dm = base_model.diffusion_model
        device = torch.device(device if device is not None else comfy.model_management.get_torch_device())
        copies = self.copies
        if not all(_same_device(p.device, device) for p in copies.parameters()):
            with torch.inference_mode(False):
                if any(p.requires_grad for p in copies.parameters()):
                    copies.to(device)  # trained: moved in place, the optimiser keeps the same Parameters
                else:  # a loaded file: a frozen copy for this device (MultiGPU clones each get their own)
                    copies = copy.deepcopy(copies).to(device)
        outer = self._model_sampling
        _set_model_sampling(self, base_model.model_sampling)
        handles = [getattr(dm, name).register_forward_hook(
            _dual_hook(copy_, functools.partial(self.family.second_input, dm)
                       if name == self.family.time_embedder else None),
            with_kwargs=True) for name, copy_ in copies.items()]
        try:
            with self.side.installed(base_model, device) if self.side is not None else contextlib.nullcontext():
                yield self
        finally:
            for handle in handles:
                handle.remove()
            _set_model_sampling(self, outer)

    @contextlib.contextmanager
    def active(self, sigma_next: torch.Tensor):
        """Inside: the model is the two-time model at (sigma, sigma'), one sigma' per row of the caller's batch."""
        if self._model_sampling is None:
            raise FMTTInputError("FMTT: internal error, the two-time adapter is not installed on the model.")
        token = _SECOND.set(model_timestep(self._model_sampling, sigma_next.detach().reshape(-1)))
        try:
            with self.side.active() if self.side is not None else contextlib.nullcontext():
                yield
        finally:
            _SECOND.reset(token)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)  # cuda and cuda:0 are one device


def _set_model_sampling(adapter: TwoTimeAdapter, model_sampling) -> None:
    """The installed model's sigma schedule, held by reference: not a sub-module (it is no part of the adapter's
    state, which the trainer saves and resumes)."""
    object.__setattr__(adapter, "_model_sampling", model_sampling)


def _lora_copy(module: torch.nn.Module, name: str, second: dict, trainable: bool, replaced: dict) -> torch.nn.Module:
    """A copy of the embedder whose Linears carry the file's (or fresh) LoRA; without one a layer keeps W (or the
    weight / bias the file replaces it with)."""
    out = copy.deepcopy(module)
    for sub, m in list(out.named_modules()):
        if isinstance(m, torch.nn.Linear):
            down, up = second.get(f"{name}.{sub}", (torch.zeros(0, m.in_features), torch.zeros(m.out_features, 0)))
            if down.shape[1] != m.in_features or up.shape[0] != m.out_features or up.shape[1] != down.shape[0]:
                raise FMTTInputError(f"FMTT: the second time embedder's LoRA on {name}.{sub} is {tuple(up.shape)} x "
                                     f"{tuple(down.shape)}, the layer {m.out_features} x {m.in_features}: the flow map "
                                     "was trained on another model. Use the model it was trained on.")
            new = replaced.get(f"{name}.{sub}", {})
            for kind, own in (("weight", m.weight), ("bias", m.bias)):
                if kind in new and (own is None or tuple(new[kind].shape) != tuple(own.shape)):
                    raise FMTTInputError(f"FMTT: the second time embedder's {name}.{sub}.{kind} is "
                                         f"{tuple(new[kind].shape)}, the model's "
                                         f"{None if own is None else tuple(own.shape)}: the flow map was trained on "
                                         "another model. Use the model it was trained on.")
            parent, _, attr = sub.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, attr,
                    LoRALinear(m, down, up, trainable, new.get("weight"), new.get("bias")))
    for p in out.parameters():
        if not isinstance(p, torch.nn.Parameter) or p.is_inference():
            raise FMTTInputError("FMTT: internal error, an inference tensor left in the second time embedder.")
    return out


def _pairs(layers: dict, trainable: bool) -> torch.nn.ParameterDict:
    """{path: (down, up)} as a ParameterDict ('.' is not allowed in its keys: '/' instead)."""
    out = torch.nn.ParameterDict()
    with torch.inference_mode(False):
        for path, (down, up) in layers.items():
            for side, t in (("down", down), ("up", up)):
                out[f"{path.replace('.', '/')}:{side}"] = torch.nn.Parameter(t.detach().clone().float(),
                                                                           requires_grad=trainable)
    return out


def _items(pairs: torch.nn.ParameterDict):
    paths = sorted({k.rsplit(":", 1)[0] for k in pairs.keys()})
    return [(p.replace("/", "."), (pairs[f"{p}:down"], pairs[f"{p}:up"])) for p in paths]


def _rows(values: torch.Tensor, n: int) -> torch.Tensor:
    """sigma' for the model's batch: ComfyUI stacks the caller's rows once per condition (cond, uncond, ...)."""
    if n % values.shape[0]:
        raise FMTTInputError(f"FMTT: internal error, the model batch ({n}) is not a multiple of the two-time batch "
                             f"({values.shape[0]}).")
    return values.repeat(n // values.shape[0])


def _dual_hook(second: torch.nn.Module, second_input):
    """The embedder's output averaged with its copy's; the time embedder's copy sees timestep(sigma')."""

    def hook(module, args, kwargs, out):
        timestep_next = _SECOND.get()
        if timestep_next is None:
            return out
        first, *rest = args
        if second_input is not None:
            first = second_input(first, _rows(timestep_next, first.shape[0]).to(first.device))
        first = first.float() if first.is_floating_point() else first
        kwargs = {**kwargs, "dtype": torch.float32} if "dtype" in kwargs else kwargs  # SD3's t_embedder casts
        return (out + second(first, *rest, **kwargs).to(out.dtype)) / 2

    return hook

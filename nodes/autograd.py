"""Gradients through ComfyUI models inside a node: out of inference mode, frozen normal-tensor weights, saved
activations copied (ComfyUI's blocks update them in place), and optionally each transformer block recomputed in
the backward pass instead of storing its activations."""
from __future__ import annotations

import contextlib
import contextvars

import comfy.model_management
import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ..fmtt_core.memory import is_weight


def _normal_weights(module: torch.nn.Module) -> None:
    """Replace inference-mode weights (ComfyUI loads models inside torch.inference_mode) by normal clones,
    which autograd accepts. Same values; done once per load (a re-patched weight is cloned again)."""
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()


@contextlib.contextmanager
def _frozen(modules: list[torch.nn.Module]):
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def _clone_saved_activations():
    """DiT blocks update activations in place (x += ...) after autograd saved them; saving a copy keeps the
    backward pass valid. Weights are never modified in place, so they are saved as they are, also as the views a
    linear layer saves (its weight transposed): a copy of those would hold a second copy of the model's weights."""

    def pack(t: torch.Tensor):
        return t if is_weight(t) else t.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


def _tensor_leaves(tree):
    """The autograd-usable tensors in a nest of tuples / lists / dicts, and what rebuilds the nest from
    replacements for them. Inference tensors (ComfyUI's sigmas, conditioning) are constants: they cannot take
    part in autograd, nor be changed in place."""
    leaves, spec = torch.utils._pytree.tree_flatten(tree)
    tracked = [isinstance(v, torch.Tensor) and not v.is_inference() for v in leaves]

    def rebuild(tensors):
        tensors = iter(tensors)
        return torch.utils._pytree.tree_unflatten([next(tensors) if t else v for v, t in zip(leaves, tracked)], spec)

    return [v for v, t in zip(leaves, tracked) if t], rebuild


class _RecomputedBlock(torch.autograd.Function):
    """A DiT block call that keeps only its inputs for the backward pass and runs again there.

    torch.utils.checkpoint does not fit ComfyUI's blocks: they update activations in place (x += ...) after autograd
    saved them, and its recompute keeps saved tensors as views that those updates overwrite (silently wrong
    gradients). This recompute saves copies instead, like the un-checkpointed path, one block at a time.
    Gradients flow to the call's tensors (also inside tuples, lists and dicts) and to the `beside` tensors the block
    uses without taking them as arguments (a LoRA being trained beside the weights); other objects are constants.
    """

    @staticmethod
    def forward(ctx, run, outputs_box, n_args, *tensors):
        ctx.run, ctx.n_args = run, n_args
        ctx.save_for_backward(*tensors)
        outputs, outputs_box["rebuild"] = _tensor_leaves(run(tensors[:n_args]))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        saved, n = ctx.saved_tensors, ctx.n_args
        inputs = [t.detach().requires_grad_(need) for t, need in zip(saved[:n], ctx.needs_input_grad[3:])]
        beside = list(saved[n:])  # used by the block as they are (not detached): the recompute reaches them
        with torch.enable_grad(), _clone_saved_activations():
            outputs, _ = _tensor_leaves(ctx.run(inputs))
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad and g is not None]
        wanted = [t for t in inputs if t.requires_grad] + beside
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
                     if pairs and wanted else [None] * len(wanted))
        return (None, None, None, *(next(grads) if t.requires_grad else None for t in inputs),
                *(next(grads) for _ in beside))


_BESIDE: contextvars.ContextVar = contextvars.ContextVar("fmtt_trained_beside", default=())


@contextlib.contextmanager
def trained_beside(tensors):
    """Inside: recomputed blocks also deliver gradients to these tensors, which the blocks' modules use without
    taking them as arguments (a LoRA beside the weights, nodes/side_lora.py, while it is being trained). Without
    this a recomputed block differentiates only its arguments, and a LoRA inside it gets no gradient."""
    token = _BESIDE.set(_BESIDE.get() + tuple(t for t in tensors if t.requires_grad))
    try:
        yield
    finally:
        _BESIDE.reset(token)


def _recomputed(block_forward):
    """A block's forward that recomputes it in the backward pass. The arguments are captured as they are at the
    call (ComfyUI updates transformer_options between blocks), and the block always runs on copies of its input
    tensors because it updates them in place."""

    def forward(*args, **kwargs):
        tensors, rebuild_call = _tensor_leaves((args, kwargs))
        beside = _BESIDE.get()
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (*tensors, *beside))):
            return block_forward(*args, **kwargs)  # nothing to differentiate: the plain call
        # The recompute runs in the context variables of this call (a flow-map LoRA is active only inside its
        # look-ahead calls), whichever thread runs the backward pass.
        context = contextvars.copy_context()

        def run(inputs):
            call_args, call_kwargs = rebuild_call([t.clone() for t in inputs])
            return context.run(block_forward, *call_args, **call_kwargs)

        box = {}
        outputs = _RecomputedBlock.apply(run, box, len(tensors), *tensors, *beside)
        return box["rebuild"](outputs)

    return forward


BLOCK_LISTS = ("double_blocks", "single_blocks",  # Flux-family DiTs (Flux, Flux 2, Chroma, HunyuanVideo)
               "joint_blocks")  # MMDiT (SD3, SD3.5)


def block_lists(model: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The transformer blocks of a diffusion model that are recomputed, by name: a DiT's block lists, or in a UNet
    (SD1.x, SDXL) the transformer blocks of each SpatialTransformer (its attention, the bulk of its activations;
    the UNet's own blocks are not called through their forward, so they cannot be wrapped)."""
    found = {name: getattr(model, name) for name in BLOCK_LISTS if getattr(model, name, None)}
    found.update({f"{name}.transformer_blocks": m.transformer_blocks for name, m in model.named_modules()
                  if isinstance(m, SpatialTransformer) and len(m.transformer_blocks)})
    return found


@contextlib.contextmanager
def _recomputed_blocks(modules: list[torch.nn.Module]):
    """Recompute every transformer block of these models in the backward pass: memory per model call is about one
    block's activations plus each block's inputs, instead of every block's activations."""
    # Each block once, also when two models share one network (a companion that is the base model itself).
    blocks = list({id(b): b for m in modules for blocks in block_lists(m).values() for b in blocks}.values())
    patched = [(b, b.__dict__.get("forward")) for b in blocks]
    for b in blocks:
        b.forward = _recomputed(b.forward)  # an instance attribute over the class's forward
    try:
        yield
    finally:
        for b, before in patched:
            if before is None:
                del b.forward
            else:
                b.forward = before


@contextlib.contextmanager
def differentiable(modules: list[torch.nn.Module], enabled: bool = True, block_checkpointing: bool = False):
    """Make gradients flow through ComfyUI models inside a node (see the pack's design notes):
    leave inference mode, use normal-tensor frozen weights, set ComfyUI's `in_training` flag (Flux's fused
    RoPE has no backward otherwise) and copy saved activations, or with `block_checkpointing` recompute each DiT
    block in the backward pass instead of storing its activations. Everything is restored on exit."""
    with torch.inference_mode(False):
        if not enabled:
            yield
            return
        for m in modules:
            _normal_weights(m)
        saved_flag = comfy.model_management.in_training
        comfy.model_management.in_training = True
        try:
            with _frozen(modules), this_thread(True):
                with _recomputed_blocks(modules) if block_checkpointing else contextlib.nullcontext():
                    yield
        finally:
            comfy.model_management.in_training = saved_flag


@contextlib.contextmanager
def this_thread(enabled: bool = True):
    """The part of differentiable() that torch keeps per thread (inference mode, grad mode, saved-tensor hooks): a
    worker thread running model calls inside differentiable() (the MultiGPU spread) enters it itself."""
    with torch.inference_mode(False):
        if not enabled:
            yield
            return
        with torch.enable_grad(), _clone_saved_activations():
            yield


def normal_tensor(t):
    """A normal (autograd-usable) copy of a tensor created in inference mode; None stays None."""
    if t is None:
        return None
    with torch.inference_mode(False):
        return t.clone()

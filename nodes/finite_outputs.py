"""Nothing non-finite leaves a pack node, and what went non-finite is named in the node's words.

fmtt_core traces a NaN / inf to the stage that first made it (fmtt_core/finite.py: model call, look-ahead,
decoder, reward, gradient, step) but knows nothing of widgets. `explain` adds what the node knows: the guidance
scale the model was called with, the look-ahead's file and strength. `guard` wraps every pack node's execute: a
float widget fed NaN / inf by a link is refused before the node runs, naming the widget (typed-in ones are refused
at queue time, strict_inputs.py), and a tensor output (a latent, an image) holding NaN / inf is refused at the node
that made it, never handed on as a success. Outputs that are objects (a SAMPLER, a reward, a look-ahead) are
checked where they run, by the core and the samplers.
"""
from __future__ import annotations

import functools
import math

import torch
from comfy_api.latest import io

from ..fmtt_core import FMTTNumericalError
from ..fmtt_core.finite import FMTTNonFiniteError, finite_rows


def explain(err: FMTTNonFiniteError, cfg=None, lookahead=None) -> FMTTNumericalError:
    """The core's error with this run's suspects: a cfg that is not finite is the cause whatever the model does;
    otherwise the look-ahead or the model, as the core found."""
    message = str(err)
    if err.stage in ("model", "lookahead") and cfg is not None and not math.isfinite(float(cfg)):
        message += f" Here cfg is {float(cfg)}: give cfg a finite value (the node's cfg widget or its guider)."
    elif err.stage == "lookahead" and lookahead is not None:
        message += f" The look-ahead: {lookahead.describe()}."
    elif err.stage == "model" and cfg is not None:
        message += f" (cfg was {float(cfg):g}.)"
    return FMTTNumericalError(message)


def _tensors(value, name: str):
    """(label, tensor) for the float tensors an output carries: an IMAGE / MASK, a LATENT's samples."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        yield name, value
    elif isinstance(value, dict) and isinstance(value.get("samples"), torch.Tensor):
        yield f"{name} (samples)", value["samples"]


def check_outputs(schema: io.Schema, out) -> None:
    if not isinstance(out, io.NodeOutput) or not out.args:
        return
    for output, value in zip(schema.outputs, out.args):
        for label, tensor in _tensors(value, output.display_name or output.id):
            if tensor.numel() and not bool(finite_rows(tensor.reshape(1, -1)).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise FMTTNumericalError(
                    f"{schema.display_name}: its output '{label}' holds {bad} non-finite values (NaN / inf) of "
                    f"{tensor.numel()}; it is not handed on. Check this node's float inputs and the files it read.")


def check_float_inputs(schema: io.Schema, inputs: dict) -> None:
    """A NaN / inf reaching a float widget through a link (a primitive node, a math node): ComfyUI checks only
    typed-in values (strict_inputs.py refuses non-finite ones at queue time), so linked ones are checked here."""
    for widget in schema.inputs:
        value = inputs.get(widget.id)
        if isinstance(widget, io.Float.Input) and isinstance(value, (int, float)) and not math.isfinite(value):
            raise FMTTNumericalError(f"{schema.display_name}: {widget.id} is {value} (from a link); it takes finite "
                                     f"numbers from {widget.min} to {widget.max}. Fix the node that feeds it.")


def guard(node_class) -> None:
    """Wrap node_class.execute: float inputs are checked before it runs, tensor outputs before ComfyUI hands them
    on. The schema is read once here: ComfyUI runs a locked clone of the class, which cannot build it again."""
    execute = node_class.execute.__func__
    schema = node_class.GET_SCHEMA()

    @functools.wraps(execute)
    def checked(cls, *args, **kwargs):
        check_float_inputs(schema, kwargs)
        out = execute(cls, *args, **kwargs)
        check_outputs(schema, out)
        return out

    node_class.execute = classmethod(checked)


def register(node_classes) -> None:
    for cls in node_classes:
        guard(cls)

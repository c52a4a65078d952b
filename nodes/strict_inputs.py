"""Numbers typed into the pack's widgets are taken exactly as given, or refused.

ComfyUI converts a widget value with int() / float() before it checks the value's range, so through the API 2.5
for an integer widget runs as 2 and the string "3" as 3. This handler, run on every queued prompt before
ComfyUI validates it, replaces such a value (and NaN / inf, which pass ComfyUI's min / max comparisons) in the
pack's nodes by a text saying what is wrong: ComfyUI's own
conversion then refuses the prompt (HTTP 400) naming the input, and nothing runs with a value the user did not
give. Values ComfyUI's frontend sends (plain JSON numbers) pass untouched.
"""
from __future__ import annotations

import logging
import math

from comfy_api.latest import io


def _numeric_widgets(node_class) -> dict[str, io.Input]:
    return {i.id: i for i in node_class.GET_SCHEMA().inputs if isinstance(i, (io.Int.Input, io.Float.Input))}


def value_problem(widget: io.Input, value) -> str | None:
    """Why a raw prompt value is not a number this widget takes as it is (None: it is one)."""
    if isinstance(value, list):  # a link to another node's output: checked when that node runs
        return None
    integer = isinstance(widget, io.Int.Input)
    kind = "whole numbers" if integer else "numbers"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value!r} is not a number; {widget.id} takes {kind} from {widget.min} to {widget.max}"
    if not math.isfinite(value):  # NaN passes every min / max comparison: ComfyUI's range check lets it through
        return f"{value!r} is not a finite number; {widget.id} takes {kind} from {widget.min} to {widget.max}"
    if integer and value != int(value):
        return f"{value!r} is not a whole number; {widget.id} takes {kind} from {widget.min} to {widget.max}"
    return None


def handler(node_classes):
    """An on-prompt handler for these node classes (see the module docstring)."""
    widgets = {cls.GET_SCHEMA().node_id: _numeric_widgets(cls) for cls in node_classes}

    def strict_numbers(json_data: dict) -> dict:
        prompt = json_data.get("prompt")
        for node in (prompt.values() if isinstance(prompt, dict) else ()):
            known = widgets.get(node.get("class_type")) if isinstance(node, dict) else None
            inputs = node.get("inputs") if known else None
            for name, value in (inputs.items() if isinstance(inputs, dict) else ()):
                if isinstance(value, dict) and "__value__" in value:  # ComfyUI's wrapper for list-like values
                    value = value["__value__"]
                problem = value_problem(known[name], value) if name in known else None
                if problem is not None:
                    inputs[name] = problem  # not a number: ComfyUI's conversion refuses it, naming the input
        return json_data

    return strict_numbers


def register(node_classes) -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server
        return
    if getattr(PromptServer, "instance", None) is None:
        logging.warning("FMTT: no ComfyUI server instance; typed-in numbers are not checked strictly.")
        return
    PromptServer.instance.add_on_prompt_handler(handler(node_classes))

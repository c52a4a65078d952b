"""Nothing non-finite passes as success in a real ComfyUI (see conftest.py): a NaN typed into a float widget is
refused at queue time naming the input; a NaN that arrives through a link, a look-ahead file or a LoRA with NaN
tensors ends the run with an error that names where it came from and the fix; the server keeps serving."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmtt_testing.comfy_prompts import custom_prompt, error_message, fmtt_sampler, ksampler_prompt, ok

pytestmark = pytest.mark.integration
LORA = "tiny_flux_flowmap_lora.safetensors"
_seeds = iter(range(9_000_000, 10_000_000))  # apart from the other modules' seeds: ComfyUI caches identical prompts


def fresh_seed():
    return next(_seeds)


def flux_flow_map(lora=LORA, strength=1.0):
    return {"class_type": "FMTTFluxFlowMapLookahead", "inputs": {
        "model": ["model", 0], "lora_name": lora, "strength": strength, "jumps": 1, "checkpoint": False}}


def flow_map_sampler_prompt(look):
    p = custom_prompt(fresh_seed(), {"class_type": "FMTTFlowMapSampler", "inputs": {"flow_map": ["look", 0],
                                                                                    "candidates": 1}}, steps=4)
    p["look"] = look
    return p


def failed(entry) -> str:
    assert entry["status"]["status_str"] == "error", "a run with NaN was reported as success"
    return error_message(entry)


@pytest.mark.parametrize("node, name", [("ks", "cfg"), ("ks", "reward_scale"), ("look", "strength")])
def test_nan_typed_into_a_float_widget_is_refused_at_queue_time(comfy, node, name):
    p = ksampler_prompt(fresh_seed()) if node == "ks" else flow_map_sampler_prompt(flux_flow_map())
    p[node]["inputs"][name] = math.nan
    status, body = comfy.submit(p)
    mine = [e for e in body.get("node_errors", {}).get(node, {}).get("errors", [])
            if e.get("extra_info", {}).get("input_name") == name]
    assert status == 400 and len(mine) == 1 and "not a finite number" in json.dumps(mine), body


def test_nan_cfg_through_a_link_is_named_as_the_cause(comfy):
    # Into the FMTT KSampler's own cfg: refused before it runs, naming the widget.
    p = ksampler_prompt(fresh_seed())
    p["nan"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    p["ks"]["inputs"]["cfg"] = ["nan", 0]
    message = failed(comfy.run(p))
    assert "cfg is nan (from a link)" in message, message
    # Into ComfyUI's own CFGGuider driving the FMTT Sampler: the model call is named, and the cfg that broke it.
    p = custom_prompt(fresh_seed(), fmtt_sampler(particles=2))
    p["nan"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    p["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["model", 0], "positive": ["cond", 0],
                                                         "negative": ["cond", 0], "cfg": ["nan", 0]}}
    message = failed(comfy.run(p))
    assert "model call" in message and "cfg is nan" in message, message
    assert "reward_scale" not in message, message  # not blamed on the reward
    ok(comfy.run(ksampler_prompt(fresh_seed())))


def test_nan_strength_through_a_link_is_refused_naming_the_widget(comfy):
    p = flow_map_sampler_prompt(flux_flow_map(strength=["nan", 0]))
    p["nan"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    entry = comfy.run(p)
    message = failed(entry)
    assert "strength is nan" in message and "FMTTFluxFlowMapLookahead" in message, message


def test_a_flow_map_lora_with_nan_tensors_fails_naming_the_file(comfy):
    loras = comfy.base / "models" / "loras"
    tensors = load_file(str(loras / LORA))
    key = sorted(k for k in tensors if tensors[k].is_floating_point())[0]
    tensors[key] = torch.full_like(tensors[key], math.nan)
    save_file(tensors, str(loras / "nan_flowmap_lora.safetensors"))
    message = failed(comfy.run(flow_map_sampler_prompt(flux_flow_map("nan_flowmap_lora.safetensors"))))
    assert "nan_flowmap_lora.safetensors" in message and "NaN" in message, message
    p = custom_prompt(fresh_seed(), fmtt_sampler(particles=2))
    p["look"] = flux_flow_map("nan_flowmap_lora.safetensors")
    p["sampler"]["inputs"]["lookahead"] = ["look", 0]
    message = failed(comfy.run(p))
    assert "nan_flowmap_lora.safetensors" in message and "reward_scale" not in message, message
    ok(comfy.run(flow_map_sampler_prompt(flux_flow_map())))


def test_a_flow_map_file_with_nan_tensors_is_refused_naming_the_tensor(comfy):
    folder = comfy.base / "models" / "fmtt_flow_maps"
    from safetensors import safe_open
    with safe_open(str(folder / "tiny_flow_map.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(folder / "tiny_flow_map.safetensors"))
    tensors["out.weight"][0] = math.nan
    save_file(tensors, str(folder / "nan_flow_map.safetensors"), meta)
    p = ksampler_prompt(fresh_seed(), lookahead={"class_type": "FMTTFlowMapLookahead", "inputs": {
        "flow_map": "nan_flow_map.safetensors", "jumps": 1, "checkpoint": False}})
    message = failed(comfy.run(p))
    assert "out.weight" in message and "nan_flow_map.safetensors" in message and "Re-export" in message, message

"""The FLUX two-time flow-map LoRA inside a real ComfyUI (see conftest.py): the pack's look-ahead on ComfyUI's Flux
against diffusers + FMRG's DualTimeEmbedder + peft (tiny_flux_flow_map.py), FMTT and the few-step sampler with it,
and wrong files / models refused with errors that name the fix while the server keeps serving."""
from __future__ import annotations

import json
import math

import pytest

from fmtt_testing.comfy_prompts import custom_prompt, error_message, fmtt_sampler, latent_of, ok

pytestmark = pytest.mark.integration
LORA = "tiny_flux_flowmap_lora.safetensors"
_seeds = iter(range(500_000, 10**6))  # apart from test_comfyui's seeds: ComfyUI caches identical prompts


def fresh_seed():
    return next(_seeds)


def flow_map_lookahead(lora=LORA, model="model", jumps=1, strength=1.0):
    return {"class_type": "FMTTFluxFlowMapLookahead", "inputs": {
        "model": [model, 0], "lora_name": lora, "strength": strength, "jumps": jumps, "checkpoint": False}}


def test_pack_flow_map_equals_the_diffusers_reference(comfy):
    p = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dev_fm.safetensors",
                                                          "weight_dtype": "default"}},
         "cond": {"class_type": "FMTTTestConditioning", "inputs": {"seed": 21, "tokens": 4}},
         "look": flow_map_lookahead(),
         "check": {"class_type": "FMTTTestFlowMapCompare", "inputs": {
             "model": ["model", 0], "lookahead": ["look", 0], "positive": ["cond", 0], "h": 1e-2,
             "reference": str(comfy.base / "fmtt_reference" / "flux_flow_map.safetensors")}}}
    report = json.loads(ok(comfy.run(p))["outputs"]["check"]["text"][0])
    shapes = {tuple(c["shape"]) for c in report["cases"]}
    assert {(1, 16, 4, 4), (3, 16, 4, 4), (2, 16, 6, 8)} <= shapes, shapes  # batch sizes, both packings
    for case in report["cases"]:
        assert case["error"] < 1e-4, case  # relative to the reference's largest value, float32
        if case["sigma"] == case["sigma_next"]:
            assert case["identity"] is True, case  # X(x, s, s) = x exactly
    assert report["chain_error"] < 1e-4, report  # 3 jumps = the reference's 3 composed jumps
    for kind in ("plain", "blocks"):
        g = report["gradients"][kind]
        assert abs(g["autograd"] - g["finite_difference"]) < 0.01 * abs(g["finite_difference"]), report["gradients"]
    assert report["gradients"]["checkpoint_error"] < 1e-5, report["gradients"]  # block recompute sees the LoRA
    assert report["base_unchanged_inside"] and report["base_unchanged_after"], report
    assert report["hooks_left"] == [], report


def test_fmtt_with_the_flow_map_lora_lookahead(comfy):
    p = custom_prompt(fresh_seed(), fmtt_sampler(particles=2))
    p["look"] = flow_map_lookahead(jumps=2)
    p["sampler"]["inputs"]["lookahead"] = ["look", 0]
    p["diag"] = {"class_type": "FMTTDiagnostics", "inputs": {"diagnostics": ["sampler", 1], "samples": ["sca", 0]}}
    entry = ok(comfy.run(p))
    shape, values = latent_of(entry)
    assert shape == [1, 16, 4, 4] and all(math.isfinite(v) for v in values)
    text = entry["outputs"]["diag"]["text"][0]
    assert "FLUX flow-map LoRA" in text and int(text.split("lookahead ")[1].split(",")[0]) > 0, text


def test_few_step_flow_map_sampler_and_its_best_of_n(comfy):
    seed = fresh_seed()
    one = custom_prompt(seed, {"class_type": "FMTTFlowMapSampler", "inputs": {"flow_map": ["look", 0],
                                                                              "candidates": 1}}, steps=4)
    one["look"] = flow_map_lookahead()
    a = latent_of(ok(comfy.run(one)))
    assert a[0] == [1, 16, 4, 4] and all(math.isfinite(v) for v in a[1])
    best = custom_prompt(seed, {"class_type": "FMTTFlowMapSampler", "inputs": {
        "flow_map": ["look", 0], "candidates": 3, "reward": ["reward", 0], "vae": ["vae", 0]}}, steps=4)
    best["look"] = flow_map_lookahead()
    b = latent_of(ok(comfy.run(best)))
    assert b[0] == [1, 16, 4, 4]
    # Candidate 0 starts from ComfyUI's own noise: best of 3 either keeps it or picks another, never a blend.
    assert b[1] == a[1] or max(abs(x - y) for x, y in zip(a[1], b[1])) > 1e-3


@pytest.mark.parametrize("lora, model, expected", [
    ("tiny_flux_style_lora.safetensors", "model", "not a flow-map LoRA; load it with LoraLoader"),
    ("tiny_sdxl_lora.safetensors", "model", "LoRA for SD1.x / SDXL"),
    ("tiny_truncated_lora.safetensors", "model", "truncated"),
    (LORA, "schnell", "match nothing in this FLUX model"),
    (LORA, "sd3", "not FLUX.1"),
], ids=["ordinary_flux_lora", "other_family", "truncated", "keys_match_nothing", "not_a_flux_model"])
def test_wrong_files_and_models_are_refused_and_the_server_keeps_serving(comfy, lora, model, expected):
    p = custom_prompt(fresh_seed(), {"class_type": "FMTTFlowMapSampler", "inputs": {"flow_map": ["look", 0],
                                                                                    "candidates": 1}})
    p["schnell"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_schnell.safetensors",
                                                           "weight_dtype": "default"}}
    p["sd3"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3_not_flux.safetensors",
                                                       "weight_dtype": "default"}}
    p["look"] = flow_map_lookahead(lora=lora, model=model)
    entry = comfy.run(p)
    assert entry["status"]["status_str"] == "error" and expected in error_message(entry), error_message(entry)
    ok(comfy.run(custom_prompt(fresh_seed(), fmtt_sampler())))

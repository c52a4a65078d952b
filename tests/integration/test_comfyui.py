"""The pack inside a real ComfyUI (see conftest.py): import, schemas, every example workflow with tiny models,
the SAMPLER path and the all-in-one node in every mode, gradients through the MODEL, bad inputs, interrupts."""
from __future__ import annotations

import json
import math
import os
import time
import zlib

import pytest

from fmtt_testing import workflows as wt
from fmtt_testing.comfy_prompts import (
    custom_prompt,
    error_message,
    fmtt_sampler,
    ksampler_prompt,
    latent_of,
    loaders,
    ok,
)

pytestmark = pytest.mark.integration

PACK_NODES = ["FMTTSampler", "FMTTKSampler", "FMTTDiagnostics", "FMTTBaseModelLookahead", "FMTTCompanionLookahead",
              "FMTTFlowMapLookahead", "FMTTFluxFlowMapLookahead", "FMTTFlowMapSampler", "FMTTCLIPScoreReward",
              "FMTTPickScoreReward", "FMTTHPSv2Reward",
              "FMTTAestheticReward", "FMTTImageReward", "FMTTVLMQuestionReward", "FMTTMaskReward",
              "FMTTSymmetryReward", "FMTTCombineRewards", "FMTTFewStepLoRALookahead", "FMTTTrainFlowMap",
              "FMTTTrainedFlowMapLookahead"]
_seeds = iter(range(1000, 10**6))


def fresh_seed():
    """Identical prompts are cached by ComfyUI and not re-run: every test prompt gets its own seed."""
    return next(_seeds)


# ------------------------------------------------------------------ loading and schemas

def test_pack_imports_without_errors(comfy):
    log = comfy.log.read_text()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert "comfyui-fmtt" in log


def test_object_info_lists_every_node_with_tooltips(object_info):
    for name in PACK_NODES:
        assert name in object_info, f"{name} missing from /object_info"
        info = object_info[name]
        assert info["category"].startswith("sampling/FMTT")
        for section in ("required", "optional"):
            for inp, spec in info["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        assert all(info["output_tooltips"]), f"{name} has outputs without tooltips"


def test_snapshot_used_by_the_workflow_test_is_current(object_info, comfy):
    version = comfy.get("/system_stats")["system"].get("comfyui_version", "?")
    live = wt.make_snapshot(object_info, version)
    if os.environ.get("FMTT_UPDATE_SNAPSHOT"):
        wt.SNAPSHOT.write_text(json.dumps(live, indent=1, sort_keys=True) + "\n")
    stored = json.loads(wt.SNAPSHOT.read_text())
    assert stored["pack_nodes"] == live["pack_nodes"] == sorted(PACK_NODES)
    assert stored["nodes"] == live["nodes"], ("tests/data/object_info.json is stale: rerun this test with "
                                              "FMTT_UPDATE_SNAPSHOT=1")


# ------------------------------------------------------------------ example workflows with tiny models

def tiny_substitutes(prompt: dict) -> dict:
    """Swap the real models a workflow expects for the tiny ones built for the test (and shrink the run)."""
    for key, node in list(prompt.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            inp["unet_name"] = "tiny_flux_schnell.safetensors" if "schnell" in inp["unet_name"] \
                else "tiny_flux_dev.safetensors"
        elif kind == "VAELoader":
            inp["vae_name"] = "tiny_taef1.safetensors"
        elif kind == "CLIPTextEncode":  # no text encoder here: random conditioning of Flux's shapes
            prompt[key] = {"class_type": "FMTTTestConditioning",
                           "inputs": {"seed": zlib.crc32(inp["text"].encode()) % 2**31, "tokens": 4}}
        elif kind in ("DualCLIPLoader", "CLIPLoader"):
            del prompt[key]
        elif kind in ("FMTTPickScoreReward", "FMTTCLIPScoreReward"):
            inp["model"] = "tiny_clip"
            if "tokenizer" in inp:
                inp["tokenizer"] = "(model folder)"
        elif kind == "FMTTHPSv2Reward":  # open_clip ViT-H-14 is too big to build here: same socket, tiny CLIP
            prompt[key] = {"class_type": "FMTTCLIPScoreReward", "inputs": {
                "model": "tiny_clip", "open_clip_arch": "ViT-H-14", "prompt": inp["prompt"], "scale": "cosine",
                "dtype": "auto"}}
        elif kind == "FMTTVLMQuestionReward":
            inp["model"] = "tiny_smolvlm"
        elif kind == "LoadImage":
            inp["image"] = "tiny_image.png"
        elif kind == "LoadImageMask":
            inp["image"] = "tiny_mask.png"
        elif kind == "EmptySD3LatentImage":
            inp.update(width=32, height=32)
        elif kind == "BasicScheduler":
            inp["steps"] = 3
        elif kind in ("FMTTKSampler", "FMTTSampler"):
            inp["particles"] = 2
            if "steps" in inp:
                inp["steps"] = 3
        elif kind == "FMTTFluxFlowMapLookahead":
            inp["lora_name"] = "tiny_flux_flowmap_lora.safetensors"
        elif kind in ("FMTTCompanionLookahead", "FMTTBaseModelLookahead"):
            inp["steps"] = 2
        elif kind == "RandomNoise":
            inp["noise_seed"] = fresh_seed()
        if kind == "FMTTKSampler":
            inp["seed"] = fresh_seed()
    return prompt


# The SD1.5 / SDXL workflows run in test_model_families.py, with tiny models of their families.
SUBSTITUTED_WORKFLOWS = [p for p in wt.workflow_paths() if not p.stem.startswith(("fmtt_sdxl", "fmtt_sd15"))]


@pytest.mark.parametrize("path", SUBSTITUTED_WORKFLOWS, ids=[p.stem for p in SUBSTITUTED_WORKFLOWS])
def test_example_workflow_runs_with_tiny_models(comfy, sigs, path):
    from PIL import Image

    workflow = wt.load_workflow(path)
    assert wt.check_workflow(workflow, sigs) == []
    prompt = tiny_substitutes(wt.to_api(workflow, sigs))
    entry = ok(comfy.run(prompt))
    saved = [img for node, out in entry["outputs"].items() for img in out.get("images", [])
             if img.get("type") == "output"]
    assert saved, "the workflow saved no image"
    for img in saved:
        with Image.open(comfy.base / "output" / img["subfolder"] / img["filename"]) as im:
            assert min(im.size) >= 32
    if "upscale" in path.stem:
        sizes = [Image.open(comfy.base / "output" / i["subfolder"] / i["filename"]).size for i in saved]
        assert (64, 64) in sizes, f"the 2x upscale of the 32x32 sample was not saved: {sizes}"


# ------------------------------------------------------------------ the sampler itself

@pytest.mark.parametrize("mode", ["exact", "search", "zero_order"])
def test_all_in_one_node_runs_every_mode(comfy, mode):
    entry = ok(comfy.run(ksampler_prompt(fresh_seed(), steps=4, mode=mode, particles=4, search_keep=2)))
    shape, values = latent_of(entry)
    assert shape == [1, 16, 4, 4] and all(math.isfinite(v) for v in values)
    summary = entry["outputs"]["summary"]["text"][0]
    assert f"FMTT {mode}" in summary and "4 particles" in summary and "NFE" in summary
    backward = int(summary.split("backward ")[1].split(";")[0].split(",")[0])
    assert (backward == 0) == (mode == "zero_order"), summary
    assert entry["outputs"]["plot"]["images"], "no diagnostics plot"


@pytest.mark.parametrize("mode", ["exact", "search", "zero_order"])
def test_sampler_node_runs_every_mode_through_sampler_custom_advanced(comfy, mode):
    p = custom_prompt(fresh_seed(), fmtt_sampler(mode=mode, particles=3, output="top_k", output_count=2))
    p["diag"] = {"class_type": "FMTTDiagnostics", "inputs": {"diagnostics": ["sampler", 1], "samples": ["sca", 0]}}
    entry = ok(comfy.run(p))
    shape, _ = latent_of(entry)
    assert shape == [2, 16, 4, 4], "top_k with output_count 2 hands on two latents"
    text = entry["outputs"]["diag"]["text"][0]
    assert f"FMTT {mode}" in text and "3 particles" in text
    assert entry["outputs"]["diag"]["images"]


def test_each_lookahead_kind_runs(comfy):
    kinds = {
        "ode": {"class_type": "FMTTBaseModelLookahead", "inputs": {"kind": "ode", "steps": 2, "solver": "heun",
                                                                   "checkpoint": True}},
        "flow_map": {"class_type": "FMTTFlowMapLookahead", "inputs": {"flow_map": "tiny_flow_map.safetensors",
                                                                      "jumps": 2, "checkpoint": True}},
        "companion": {"class_type": "FMTTCompanionLookahead", "inputs": {
            "model": ["schnell", 0], "positive": ["cond", 0], "cfg": 1.0, "steps": 2, "solver": "euler",
            "checkpoint": True}},
    }
    for name, look in kinds.items():
        p = ksampler_prompt(fresh_seed(), lookahead=look, particles=2)
        p["schnell"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_schnell.safetensors",
                                                               "weight_dtype": "default"}}
        entry = ok(comfy.run(p))
        summary = entry["outputs"]["summary"]["text"][0]
        lookahead_nfe = int(summary.split("lookahead ")[1].split(",")[0])
        assert lookahead_nfe > 0, f"{name}: the look-ahead was never called\n{summary}"


def test_one_particle_without_reward_is_comfyui_euler(comfy):
    """FMTT with one particle, eta = 0 and reward scale 0 is the probability-flow ODE with Euler steps, which is
    what ComfyUI's own euler sampler computes: same noise, same sigmas, same latent."""
    seed = fresh_seed()
    ours = custom_prompt(seed, fmtt_sampler(particles=1, eta=0.0, reward_scale=0.0), steps=4)
    euler = custom_prompt(seed, {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}, steps=4)
    a, b = latent_of(ok(comfy.run(ours)))[1], latent_of(ok(comfy.run(euler)))[1]
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(1.0, max(abs(y) for y in b))


def test_same_seed_same_result_and_chunking_does_not_change_it(comfy):
    seed = fresh_seed()
    first = latent_of(ok(comfy.run(ksampler_prompt(seed, particles=3, chunk_size=0))))[1]
    comfy.free()  # drop ComfyUI's cache so the identical prompt really runs again
    again = latent_of(ok(comfy.run(ksampler_prompt(seed, particles=3, chunk_size=0))))[1]
    chunked = latent_of(ok(comfy.run(ksampler_prompt(seed, particles=3, chunk_size=1))))[1]
    other = latent_of(ok(comfy.run(ksampler_prompt(seed + 1, particles=3, chunk_size=0))))[1]
    assert first == again
    assert max(abs(x - y) for x, y in zip(first, chunked)) < 1e-4
    assert first != other


def test_the_sde_step_setting_reaches_the_core(comfy):
    """sde_step picks the core's integrator: the summary names it, and with noise (eta > 0) the 2m step's
    correction from the previous model call moves the result away from Euler-Maruyama's, same seed."""
    seed = fresh_seed()
    runs = {step: ok(comfy.run(ksampler_prompt(seed, particles=2, steps=5, eta=0.5, sde_step=step)))
            for step in ("euler", "2m")}
    for step, entry in runs.items():
        assert f"{step} SDE step" in entry["outputs"]["summary"]["text"][0]
    euler, second_order = (latent_of(runs[step])[1] for step in ("euler", "2m"))
    assert max(abs(x - y) for x, y in zip(euler, second_order)) > 1e-3


def test_img2img_with_denoise_below_one(comfy):
    p = ksampler_prompt(fresh_seed(), particles=2, steps=4)
    p["img"] = {"class_type": "LoadImage", "inputs": {"image": "tiny_image.png"}}
    p["enc"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0]}}
    p["ks"]["inputs"].update(latent_image=["enc", 0], denoise=0.5)
    entry = ok(comfy.run(p))
    assert latent_of(entry)[0] == [1, 16, 4, 4]
    assert "4 steps" in entry["outputs"]["summary"]["text"][0]


def test_batch_of_latents_is_one_population_each(comfy):
    entry = ok(comfy.run(ksampler_prompt(fresh_seed(), batch=2, particles=2, output="weighted_resample",
                                         output_count=2)))
    assert latent_of(entry)[0] == [4, 16, 4, 4]
    assert "2 population(s) x 2 particles" in entry["outputs"]["summary"]["text"][0]


def test_reward_gradient_through_the_model_matches_finite_differences(comfy):
    p = loaders()
    p["check"] = {"class_type": "FMTTTestGradientCheck", "inputs": {
        "model": ["model", 0], "vae": ["vae", 0], "reward": ["reward", 0], "positive": ["cond", 0], "seed": 3,
        "t": 0.4, "checkpoint": True, "h": 1e-2}}
    report = json.loads(ok(comfy.run(p))["outputs"]["check"]["text"][0])
    look, reward = report["lookahead"], report["reward"]
    assert abs(look["autograd"] - look["finite_difference"]) < 0.01 * abs(look["finite_difference"]), look
    assert reward["autograd"] > 0  # the derivative along the gradient is its norm
    assert abs(reward["autograd"] - reward["finite_difference"]) < 0.05 * reward["autograd"], reward
    # Block checkpointing (the default): each block runs again in the backward pass, same gradient.
    assert all(e < 1e-5 for errors in report["gradient_error"].values() for e in errors.values()), json.dumps(report)
    on, off = report["block_calls_blocks"], report["block_calls_plain"]
    assert all(on[k] == 2 * off[k] > 0 for k in on), (on, off)
    run = report["sampler"]
    assert all(run["block_calls_on"][k] > run["block_calls_off"][k] for k in on), run
    assert run["max_difference"] <= 1e-5 * run["scale"], run
    assert report["restored"] == {"in_training": False, "grad_enabled": False, "inference_mode": True,
                                  "block_forward_patched": False}


# ------------------------------------------------------------------ bad inputs: clear errors, server keeps serving

def test_bad_inputs_give_clear_errors_and_the_server_keeps_serving(comfy):
    # A VAE of another latent space.
    entry = comfy.run(custom_prompt(fresh_seed(), fmtt_sampler(), vae="tiny_taesd_4ch.safetensors"))
    assert entry["status"]["status_str"] == "error"
    assert "4-channel latents" in error_message(entry) and "Connect the VAE" in error_message(entry)

    # Zero particles: refused at validation by ComfyUI's own range check, naming the input and its limit.
    status, body = comfy.submit(ksampler_prompt(fresh_seed(), particles=0))
    assert status == 400 and "smaller than min of 1" in json.dumps(body) and "particles" in json.dumps(body)

    # A reward file that is not in models/reward_models/.
    p = ksampler_prompt(fresh_seed())
    p["reward"]["inputs"]["model"] = "missing_reward.safetensors"
    status, body = comfy.submit(p)
    assert status == 400 and "missing_reward.safetensors" in json.dumps(body)

    # A reward that returns NaN for every particle.
    p = ksampler_prompt(fresh_seed())
    p["reward"] = {"class_type": "FMTTTestNaNReward", "inputs": {}}
    entry = comfy.run(p)
    assert entry["status"]["status_str"] == "error" and "non-finite" in error_message(entry)

    # top_k asking for more particles than there are: a cross-input check, made when the node runs.
    entry = comfy.run(ksampler_prompt(fresh_seed(), particles=2, output="top_k", output_count=3))
    assert "output_count (3) is larger than particles (2)" in error_message(entry)

    ok(comfy.run(ksampler_prompt(fresh_seed())))


def test_interrupt_stops_a_long_run_within_seconds(comfy):
    status, body = comfy.submit(ksampler_prompt(fresh_seed(), steps=400, particles=16))
    assert status == 200
    prompt_id = body["prompt_id"]
    deadline = time.time() + 60
    while comfy.get("/queue")["queue_running"] == [] and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # well into the sampling loop
    sent = time.time()
    comfy.post("/interrupt", {})
    entry = comfy.wait(prompt_id, timeout=60)
    stopped = time.time() - sent
    messages = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in messages, messages
    assert stopped < 5.0, f"took {stopped:.1f} s to stop"
    ok(comfy.run(ksampler_prompt(fresh_seed())))

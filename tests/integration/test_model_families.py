"""Beyond FLUX: SD1.5 (eps and v-prediction), SDXL, SD3.5 and Z-Image through both FMTT nodes in a real ComfyUI.

Tiny random models of the real architectures (tiny_unets.py) are built into the test server's base directory;
ComfyUI's own loaders detect them as SD15 / SDXL / SD3 (the tiny Z-Image is built as ComfyUI's ZImage model by a
test node: ComfyUI detects Z-Image only at its real width). Conditioning is random, of each family's shapes
(FMTTTestSDConditioning); the reward is the mask reward (no reward model to load) unless a test says otherwise.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from fmtt_testing import workflows as wt
from fmtt_testing.comfy_prompts import error_message, latent_of, ok

HERE = Path(__file__).resolve().parent
_seeds = iter(range(500_000, 10**6))  # apart from test_comfyui.py's: ComfyUI caches identical prompts


def fresh_seed():
    return next(_seeds)


pytestmark = pytest.mark.integration

# How each family is loaded and conditioned; `size` is the latent's side (images are 8x larger).
FAMILIES = {
    "sd15": {"ckpt": "tiny_sd15.safetensors", "context_dim": 768, "pooled_dim": 0, "channels": 4,
             "detected": "SD15", "sampling": "EPS"},
    "sd15_v": {"ckpt": "tiny_sd15.safetensors", "context_dim": 768, "pooled_dim": 0, "channels": 4,
               "detected": "SD15", "sampling": "V_PREDICTION", "v_prediction": True},
    "sdxl": {"ckpt": "tiny_sdxl.safetensors", "context_dim": 2048, "pooled_dim": 1280, "channels": 4,
             "detected": "SDXL", "sampling": "EPS"},
    "sd35": {"unet": "tiny_sd35.safetensors", "vae": "tiny_taef1.safetensors", "context_dim": 64, "pooled_dim": 32,
             "channels": 16, "detected": "SD3", "sampling": "CONST"},
    # built by a test node (ComfyUI detects Z-Image only at its real width); no pooled vector
    "zimage": {"unet": "tiny_zimage.safetensors", "loader": "FMTTTestZImageLoader", "vae": "tiny_taef1.safetensors",
               "context_dim": 64, "pooled_dim": 0, "channels": 16, "detected": "ZImage", "sampling": "CONST"},
}
SIZE = 8


@pytest.fixture(scope="module")
def families(comfy):
    """The tiny SD1.5 / SDXL / SD3.5 models, written next to the suite's other tiny models (ComfyUI rescans its
    model folders when they change)."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    for script in ("tiny_unets.py", "tiny_few_step_loras.py"):  # the few-step LoRAs for the family workflows
        subprocess.run([python, str(HERE / script), os.environ["COMFYUI_PATH"], str(comfy.base)], check=True,
                       capture_output=True, timeout=600, env=env)
    return comfy


def family_nodes(family: str, size: int = SIZE) -> dict:
    """API-format nodes: model (as "model_out"), vae (as "vae_out"), positive, negative, latent, mask reward."""
    f = FAMILIES[family]
    p = {}
    if "ckpt" in f:
        p["loader"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": f["ckpt"]}}
        model, vae = ["loader", 0], ["loader", 2]
    else:
        p["loader"] = ({"class_type": f["loader"], "inputs": {"unet_name": f["unet"]}} if "loader" in f else
                       {"class_type": "UNETLoader", "inputs": {"unet_name": f["unet"], "weight_dtype": "default"}})
        p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": f["vae"]}}
        model, vae = ["loader", 0], ["vae", 0]
    if f.get("v_prediction"):
        p["vpred"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": model, "sampling": "v_prediction",
                                                                          "zsnr": False}}
        model = ["vpred", 0]
    for name, seed in (("positive", 1), ("negative", 2)):
        p[name] = {"class_type": "FMTTTestSDConditioning", "inputs": {
            "seed": seed, "tokens": 4, "context_dim": f["context_dim"], "pooled_dim": f["pooled_dim"]}}
    latent = "EmptySD3LatentImage" if f["channels"] == 16 else "EmptyLatentImage"
    p["latent"] = {"class_type": latent, "inputs": {"width": 8 * size, "height": 8 * size, "batch_size": 1}}
    p["mask"] = {"class_type": "LoadImageMask", "inputs": {"image": "tiny_mask.png", "channel": "red"}}
    p["reward"] = {"class_type": "FMTTMaskReward", "inputs": {"mask": ["mask", 0], "mass": "luminance",
                                                              "color": "1.0, 0.0, 0.0", "color_tolerance": 0.25}}
    p["model_out"], p["vae_out"] = model, vae
    return p


def _split(p):
    model, vae = p.pop("model_out"), p.pop("vae_out")
    return p, model, vae


def img2img(p, vae):
    """Start from tiny_image.png encoded by the family's VAE instead of an empty latent."""
    p["image"] = {"class_type": "LoadImage", "inputs": {"image": "tiny_image.png"}}
    p["latent"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["image", 0], "vae": vae}}


def custom_prompt(family, seed, sampler, cfg, steps=4, denoise=1.0):
    """SamplerCustomAdvanced with a CFG guider; sampler(vae) is the SAMPLER node."""
    p, model, vae = _split(family_nodes(family))
    if denoise < 1:
        img2img(p, vae)
    p.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": model, "positive": ["positive", 0],
                                                         "negative": ["negative", 0], "cfg": cfg}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": "normal", "steps": steps,
                                                              "denoise": denoise}},
        "sampler": sampler(vae),
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "report": {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["sca", 0]}},
    })
    return p


def fmtt_custom_prompt(family, seed, cfg, denoise=1.0):
    """FMTT Sampler with one particle, eta 0 and no reward."""
    settings = {"mode": "exact", "particles": 1, "reward_scale": 0.0, "eta": 0.0, "ess_threshold": 0.5,
                "resampling": "systematic", "chunk_size": 0, "output": "best", "output_count": 1, "tilt_ramp": 1.0,
                "grad_clip": 0.0, "search_steps": 2, "search_keep": 0, "weights": "auto",
                "block_checkpointing": True}
    sampler = lambda vae: {"class_type": "FMTTSampler",  # noqa: E731
                           "inputs": {"reward": ["reward", 0], "vae": vae, **settings}}
    return custom_prompt(family, seed, sampler, cfg, denoise=denoise)


def euler_prompt(family, seed, cfg, denoise=1.0):
    sampler = lambda vae: {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}  # noqa: E731
    return custom_prompt(family, seed, sampler, cfg, denoise=denoise)


def ksampler_prompt(family, seed, cfg=2.0, steps=3, lookahead=None, **fmtt):
    """The all-in-one FMTT KSampler."""
    p, model, vae = _split(family_nodes(family))
    settings = {"mode": "exact", "particles": 2, "reward_scale": 1.0, "eta": 1.0, "ess_threshold": 0.5,
                "resampling": "systematic", "chunk_size": 0, "output": "best", "output_count": 1, "tilt_ramp": 1.0,
                "grad_clip": 0.0, "search_steps": 2, "search_keep": 0, "weights": "auto",
                "block_checkpointing": True}
    p["ks"] = {"class_type": "FMTTKSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "scheduler": "normal", "positive": ["positive", 0],
        "negative": ["negative", 0], "latent_image": ["latent", 0], "denoise": 1.0, "reward": ["reward", 0],
        "vae": vae, **settings, **fmtt}}
    if lookahead:
        p["look"] = lookahead
        p["ks"]["inputs"]["lookahead"] = ["look", 0]
    p["report"] = {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["ks", 0]}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["ks", 2]}}
    return p


def close(a, b, rel=1e-4):
    scale = max(1.0, max(abs(y) for y in b))
    return max(abs(x - y) for x, y in zip(a, b)) < rel * scale


# ------------------------------------------------------------------ one particle, no reward = ComfyUI's euler

@pytest.mark.parametrize("family,cfg,denoise", [
    ("sd15", 1.0, 1.0), ("sd15", 3.0, 1.0), ("sd15_v", 3.0, 1.0), ("sd15", 3.0, 0.6),
    ("sdxl", 3.0, 1.0), ("sdxl", 3.0, 0.6), ("sd35", 3.0, 1.0), ("zimage", 3.0, 1.0)])
def test_one_particle_without_reward_is_comfyui_euler(families, family, cfg, denoise):
    """FMTT with one particle, eta = 0 and reward scale 0 is the probability-flow ODE with Euler steps: on the
    noise-prediction (VE) clock too, through the CFG-guided denoiser, and from an encoded image (img2img) at
    denoise < 1."""
    seed = fresh_seed()
    ours = latent_of(ok(families.run(fmtt_custom_prompt(family, seed, cfg, denoise=denoise))))
    euler = latent_of(ok(families.run(euler_prompt(family, seed, cfg, denoise=denoise))))
    assert ours[0] == euler[0]
    assert ours[0][1] == FAMILIES[family]["channels"]
    assert close(ours[1], euler[1]), max(abs(x - y) for x, y in zip(ours[1], euler[1]))


def test_cfg_changes_the_result_and_the_core_sees_the_guided_denoiser(families):
    seed = fresh_seed()
    guided = latent_of(ok(families.run(fmtt_custom_prompt("sd15", seed, 4.0))))[1]
    plain = latent_of(ok(families.run(euler_prompt("sd15", seed, 1.0))))[1]
    guided_euler = latent_of(ok(families.run(euler_prompt("sd15", seed, 4.0))))[1]
    assert close(guided, guided_euler)
    assert max(abs(x - y) for x, y in zip(guided, plain)) > 1e-2, "cfg 4 and cfg 1 gave the same latent"


# ------------------------------------------------------------------ the all-in-one node in every mode

@pytest.mark.parametrize("family,mode", [(f, m) for f in ("sd15", "sdxl", "sd35")
                                         for m in ("exact", "search", "zero_order")] + [("sd15_v", "exact")])
def test_all_in_one_node_runs_every_mode(families, family, mode):
    particles = 2 if family == "sdxl" else 3
    entry = ok(families.run(ksampler_prompt(family, fresh_seed(), cfg=2.0, mode=mode, particles=particles,
                                            search_keep=1)))
    shape, values = latent_of(entry)
    assert shape == [1, FAMILIES[family]["channels"], SIZE, SIZE] and all(math.isfinite(v) for v in values)
    summary = entry["outputs"]["summary"]["text"][0]
    assert f"FMTT {mode}" in summary and f"{particles} particles" in summary
    backward = int(summary.split("backward ")[1].split(";")[0].split(",")[0])
    assert (backward == 0) == (mode == "zero_order"), summary


def test_img2img_through_the_all_in_one_node(families):
    p = ksampler_prompt("sdxl", fresh_seed(), particles=2, steps=4)
    img2img(p, ["loader", 2])
    p["ks"]["inputs"]["denoise"] = 0.5
    entry = ok(families.run(p))
    assert latent_of(entry)[0] == [1, 4, 4, 4]  # tiny_image.png is 32x32
    assert "4 steps" in entry["outputs"]["summary"]["text"][0]


# ------------------------------------------------------------------ gradients through the UNet / MMDiT

@pytest.mark.parametrize("family", ["sd15", "sd15_v", "sdxl", "sd35"])
def test_reward_gradient_through_the_model_matches_finite_differences(families, family):
    p, model, vae = _split(family_nodes(family))
    p["check"] = {"class_type": "FMTTTestFamilyGradientCheck", "inputs": {
        "model": model, "vae": vae, "reward": ["reward", 0], "positive": ["positive", 0],
        "negative": ["negative", 0], "cfg": 2.0, "seed": 3, "t": 0.4, "h": 1e-2, "size": SIZE}}
    report = json.loads(ok(families.run(p))["outputs"]["check"]["text"][0])
    f = FAMILIES[family]
    assert report["family"] == f["detected"] and f["sampling"] in report["sampling"], report
    assert report["clock"] == ("flow" if f["sampling"] == "CONST" else "ve")
    look, reward = report["lookahead"], report["reward"]
    assert abs(look["autograd"] - look["finite_difference"]) < 0.01 * abs(look["finite_difference"]), look
    assert reward["autograd"] > 0
    assert abs(reward["autograd"] - reward["finite_difference"]) < 0.05 * reward["autograd"], reward
    # Block recomputation (the default) covers the family's transformer blocks and changes no gradient.
    plain, recomputed = report["block_runs_plain"], report["block_runs_recomputed"]
    assert plain and all(recomputed[k] == 2 * plain[k] > 0 for k in plain), (plain, recomputed)
    assert all(e < 1e-5 for e in report["recompute_error"].values()), report["recompute_error"]
    assert report["restored"] == {"grad_enabled": False, "inference_mode": True, "block_forward_patched": False}


# ------------------------------------------------------------------ SDXL with a Lightning-style companion

def companion(p, model):
    p["look"] = {"class_type": "FMTTCompanionLookahead", "inputs": {
        "model": model, "positive": ["positive", 0], "cfg": 1.0, "steps": 2, "solver": "euler", "checkpoint": True}}
    p["ks"]["inputs"]["lookahead"] = ["look", 0]
    return p


def test_sdxl_lightning_unet_as_companion_lookahead(families):
    p = ksampler_prompt("sdxl", fresh_seed(), particles=2)
    p["lightning"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sdxl_lightning_unet.safetensors",
                                                             "weight_dtype": "default"}}
    entry = ok(families.run(companion(p, ["lightning", 0])))
    summary = entry["outputs"]["summary"]["text"][0]
    assert "companion model, 2 euler steps" in summary, summary
    assert int(summary.split("lookahead ")[1].split(",")[0]) > 0, summary


def test_lora_on_the_same_loaded_checkpoint_as_companion_is_refused(families):
    """ComfyUI patches a LoRA into the weights its clone shares with the base model: the base would sample with
    the LoRA while the companion is loaded. Refused with the fix, instead of a silently wrong result."""
    p = ksampler_prompt("sdxl", fresh_seed(), particles=2)
    p["lightning"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["loader", 0], "lora_name": "tiny_sdxl_lightning.safetensors", "strength_model": 1.0}}
    entry = families.run(companion(p, ["lightning", 0]))
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "SDXL" in message and "LoRA" in message and "its own weights" in message, message


def test_companion_from_another_latent_space_is_refused(families):
    p = ksampler_prompt("sdxl", fresh_seed(), particles=2)
    p["sd35"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd35.safetensors",
                                                        "weight_dtype": "default"}}
    entry = families.run(companion(p, ["sd35", 0]))
    assert entry["status"]["status_str"] == "error"
    assert "another latent space (SD3)" in error_message(entry) and "(SDXL)" in error_message(entry)


# ------------------------------------------------------------------ what is not supported says so

def test_unsupported_parameterisation_names_the_family_and_what_is_supported(families):
    p = ksampler_prompt("sd15", fresh_seed())
    p["ms"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["loader", 0],
                                                                 "sampling": "img_to_img_flow", "zsnr": False}}
    p["ks"]["inputs"]["model"] = ["ms", 0]
    entry = families.run(p)
    assert entry["status"]["status_str"] == "error"
    message = error_message(entry)
    assert "the SD15 model" in message and "IMG_TO_IMG_FLOW" in message and "SDXL" in message, message
    ok(families.run(ksampler_prompt("sd15", fresh_seed())))


# ------------------------------------------------------------------ the SD workflows with tiny models

FAMILY_WORKFLOWS = [p for p in wt.workflow_paths() if p.stem.startswith(("fmtt_sdxl", "fmtt_sd15"))]


def family_substitutes(prompt: dict) -> dict:
    """The tiny SD models for the real ones a family workflow expects, and a shorter run."""
    family = "sdxl" if any("xl" in n["inputs"].get("ckpt_name", "").lower() for n in prompt.values()) else "sd15"
    f = FAMILIES[family]
    for key, node in list(prompt.items()):
        kind, inp = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inp["ckpt_name"] = f["ckpt"]
        elif kind == "UNETLoader":  # the few-step companion's own UNet
            inp["unet_name"] = "tiny_sdxl_lightning_unet.safetensors"
        elif kind == "CLIPTextEncode":
            prompt[key] = {"class_type": "FMTTTestSDConditioning", "inputs": {
                "seed": zlib.crc32(inp["text"].encode()) % 2**31, "tokens": 4, "context_dim": f["context_dim"],
                "pooled_dim": f["pooled_dim"]}}
        elif kind in ("FMTTPickScoreReward", "FMTTCLIPScoreReward"):
            inp["model"] = "tiny_clip"
            if "tokenizer" in inp:
                inp["tokenizer"] = "(model folder)"
        elif kind == "LoadImageMask":
            inp["image"] = "tiny_mask.png"
        elif kind == "EmptyLatentImage":
            inp.update(width=8 * SIZE, height=8 * SIZE)
        elif kind in ("FMTTKSampler", "FMTTSampler"):
            inp.update(particles=2, seed=fresh_seed()) if "seed" in inp else inp.update(particles=2)
            if "steps" in inp:
                inp["steps"] = 3
        elif kind in ("FMTTCompanionLookahead", "FMTTBaseModelLookahead"):
            inp["steps"] = 2
        elif kind == "FMTTFewStepLoRALookahead":  # a random LoRA of the family, named like the real one's kind
            inp["lora_name"] = {"sdxl": "tiny_sdxl_lcm_kohya.safetensors",
                                "sd15": "tiny_sd15_hyper_diffusers.safetensors"}[family]
            inp["steps"] = 2
        elif kind == "BasicScheduler":
            inp["steps"] = 3
        elif kind == "RandomNoise":
            inp["noise_seed"] = fresh_seed()
        elif kind == "LoadImageTextDataSetFromFolder":  # captions need a text encoder: the images alone
            prompt[key] = {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "tiny_dataset"}}
        elif kind == "MakeTrainingDataset":  # latents by the VAE, one random conditioning for all images
            prompt[key] = {"class_type": "VAEEncode", "inputs": {"pixels": inp["images"], "vae": inp["vae"]}}
            prompt[key + "_cond"] = {"class_type": "FMTTTestSDConditioning", "inputs": {
                "seed": 3, "tokens": 4, "context_dim": f["context_dim"], "pooled_dim": f["pooled_dim"]}}
            for other in prompt.values():
                for name, value in other["inputs"].items():
                    if value == [key, 1]:
                        other["inputs"][name] = [key + "_cond", 0]
        elif kind == "FMTTTrainFlowMap":
            inp.update(steps=2, width=8 * SIZE, height=8 * SIZE, data_free_samples=2, save_every=0, preview_every=0)
    return prompt


def test_there_is_an_sdxl_and_an_sd15_workflow():
    stems = [p.stem for p in FAMILY_WORKFLOWS]
    assert any(s.startswith("fmtt_sdxl") for s in stems) and any(s.startswith("fmtt_sd15") for s in stems), stems


@pytest.mark.parametrize("path", FAMILY_WORKFLOWS, ids=[p.stem for p in FAMILY_WORKFLOWS])
def test_family_workflow_runs_with_tiny_models(families, sigs, path):
    workflow = wt.load_workflow(path)
    assert wt.check_workflow(workflow, sigs) == []
    entry = ok(families.run(family_substitutes(wt.to_api(workflow, sigs))))
    saved = [img for out in entry["outputs"].values() for img in out.get("images", []) if img.get("type") == "output"]
    assert saved, "the workflow saved no image"

"""API-format prompts for the real-ComfyUI suite (tests/integration) on the tiny models its conftest builds,
and reading their results. The test-only nodes (FMTTTestConditioning, FMTTTestLatentReport) are in
tests/integration/comfy_test_nodes.py."""
from __future__ import annotations

import json

FMTT_DEFAULTS = {"mode": "exact", "particles": 2, "reward_scale": 1.0, "eta": 1.0, "ess_threshold": 0.5,
                 "resampling": "systematic", "chunk_size": 0, "output": "best", "output_count": 1, "tilt_ramp": 1.0,
                 "grad_clip": 0.0, "search_steps": 2, "search_keep": 0, "weights": "auto"}


def error_message(entry) -> str:
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return ""


# ------------------------------------------------------------------ prompt builders (API format)

def loaders(size=32, vae="tiny_taef1.safetensors", reward=None):
    reward = reward or {"class_type": "FMTTCLIPScoreReward",
                        "inputs": {"model": "tiny_clip", "open_clip_arch": "ViT-H-14", "prompt": "a red cat",
                                   "scale": "logit", "dtype": "auto"}}
    return {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dev.safetensors",
                                                         "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "cond": {"class_type": "FMTTTestConditioning", "inputs": {"seed": 0, "tokens": 4}},
        "reward": reward,
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }


def ksampler_prompt(seed, steps=3, lookahead=None, batch=1, **fmtt):
    p = loaders()
    p["latent"]["inputs"]["batch_size"] = batch
    p["ks"] = {"class_type": "FMTTKSampler", "inputs": {
        "model": ["model", 0], "seed": seed, "steps": steps, "cfg": 1.0, "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["latent", 0], "denoise": 1.0,
        "reward": ["reward", 0], "vae": ["vae", 0], **{**FMTT_DEFAULTS, **fmtt}}}
    if lookahead:
        p["look"] = lookahead
        p["ks"]["inputs"]["lookahead"] = ["look", 0]
    p["report"] = {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["ks", 0]}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["ks", 2]}}
    p["plot"] = {"class_type": "PreviewImage", "inputs": {"images": ["ks", 1]}}
    return p


def custom_prompt(seed, sampler, steps=3, vae="tiny_taef1.safetensors"):
    """SamplerCustomAdvanced with the given SAMPLER node (as "sampler")."""
    p = loaders(vae=vae)
    p.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["model", 0], "conditioning": ["cond", 0]}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple",
                                                              "steps": steps, "denoise": 1.0}},
        "sampler": sampler,
        "sca": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "report": {"class_type": "FMTTTestLatentReport", "inputs": {"samples": ["sca", 0]}},
    })
    return p


def fmtt_sampler(**fmtt):
    return {"class_type": "FMTTSampler", "inputs": {"reward": ["reward", 0], "vae": ["vae", 0],
                                                    **{**FMTT_DEFAULTS, **fmtt}}}


def latent_of(entry, node="report"):
    report = json.loads(entry["outputs"][node]["text"][0])
    return report["shape"], report["values"]


def ok(entry):
    assert entry["status"]["status_str"] == "success", error_message(entry)
    return entry

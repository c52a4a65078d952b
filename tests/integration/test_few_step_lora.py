"""Few-step LoRAs (LCM, TCD, Lightning / Hyper-SD / Turbo) as look-aheads in a real ComfyUI, on tiny SD1.5 / SDXL /
FLUX models with random LoRAs in kohya and diffusers naming (tiny_few_step_loras.py):

* the look-ahead equals what ComfyUI itself produces for the same LoRA loaded with LoraLoaderModelOnly and sampled
  with its euler sampler (LCM: after ModelSamplingDiscrete lcm; 1 LCM step: its lcm sampler) on the look-ahead's
  sigmas from the same state; the base MODEL's output is unchanged inside and after; gradients match central
  differences with and without block recompute (FewStepCompare, few_step_test_nodes.py);
* FMTT runs end to end with each kind;
* wrong files are refused when the node runs, naming the file and the fix, and the server serves the next prompt.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fmtt_testing.comfy_prompts import error_message, latent_of, ok

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.integration
_seeds = iter(range(700_000, 10**6))


def fresh_seed():
    return next(_seeds)


sys.path.insert(0, str(HERE))
from test_model_families import FAMILIES, families, family_nodes, ksampler_prompt  # noqa: E402, F401


@pytest.fixture(scope="module")
def loras(families):  # noqa: F811  (the fixture imported above)
    """The tiny SD models and the few-step LoRAs (test_model_families.families builds both)."""
    return families


def flux_nodes() -> dict:
    """The tiny FLUX.1-dev with random conditioning (model as "model_out", no VAE needed for the comparison)."""
    return {"loader": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dev.safetensors",
                                                              "weight_dtype": "default"}},
            "positive": {"class_type": "FMTTTestConditioning", "inputs": {"seed": 21, "tokens": 4}},
            "negative": {"class_type": "FMTTTestConditioning", "inputs": {"seed": 22, "tokens": 4}},
            "model_out": ["loader", 0]}


def look(lora, steps=2, kind="auto", strength=1.0, model=None, checkpoint=True):
    return {"class_type": "FMTTFewStepLoRALookahead", "inputs": {
        "model": model, "lora_name": lora, "strength": strength, "steps": steps, "kind": kind,
        "checkpoint": checkpoint}}


CASES = [  # family, LoRA file, kind shown, steps, ComfyUI's sampler, cfg
    ("sd15", "tiny_sd15_lcm_kohya.safetensors", "LCM", 1, "lcm", 1.0),
    ("sd15", "tiny_sd15_lcm_kohya.safetensors", "LCM", 3, "euler", 2.0),
    ("sd15", "tiny_sd15_hyper_diffusers.safetensors", "Lightning", 2, "euler", 2.0),
    ("sdxl", "tiny_sdxl_lcm_kohya.safetensors", "LCM", 2, "euler", 1.5),
    ("sdxl", "tiny_sdxl_tcd_diffusers.safetensors", "TCD", 2, "euler", 1.5),
    ("flux", "tiny_flux_turbo_kohya.safetensors", "Lightning", 2, "euler", 1.0),
    ("flux", "tiny_flux_turbo_diffusers.safetensors", "Lightning", 3, "euler", 1.0),
]


@pytest.mark.parametrize("family, lora, kind, steps, sampler, cfg", CASES,
                         ids=[f"{c[0]}-{c[1].split('_', 2)[2].split('.')[0]}-{c[3]}step-{c[4]}" for c in CASES])
def test_lookahead_equals_comfyui_loraloader_and_its_sampler(loras, family, lora, kind, steps, sampler, cfg):
    p = flux_nodes() if family == "flux" else family_nodes(family)
    model = p.pop("model_out")
    p.pop("vae_out", None)
    # FLUX without step checkpointing: torch.utils.checkpoint's recompute keeps views that ComfyUI's Flux updates in
    # place, so its gradient differs from block recompute's by ~1e-3 (the core's step checkpoint, the ODE
    # look-ahead's too; block recompute, the sampler's default, is the exact path and is what is checked here).
    p["look"] = look(lora, steps, model=model, checkpoint=family != "flux")
    p["with_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                      "strength_model": 1.0}}
    lora_model = ["with_lora", 0]
    if kind == "LCM":
        p["lcm"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": lora_model, "sampling": "lcm",
                                                                       "zsnr": False}}
        lora_model = ["lcm", 0]
    p["check"] = {"class_type": "FMTTTestFewStepCompare", "inputs": {
        "model": model, "lora_model": lora_model, "lookahead": ["look", 0], "positive": ["positive", 0],
        "negative": ["negative", 0], "cfg": cfg, "t": 0.35, "sampler_name": sampler,
        "size": 4 if family == "flux" else 8, "h": 1e-2}}
    report = json.loads(ok(loras.run(p, timeout=600))["outputs"]["check"]["text"][0])
    assert len(report["sigmas"]) == steps + 1 and report["sigmas"][-1] == 0.0, report["sigmas"]
    assert report["error"] < 1e-4, report  # relative to the largest value, float32
    # ... and far below what the LoRA changes in one call (else the comparison would prove nothing)
    assert report["error_abs"] < 0.01 * report["lora_effect"], report
    assert report["base_unchanged_inside"] and report["base_unchanged_after"], report
    assert report["hooks_left"] == [] and report["sampling_hooks_left"] == [], report
    for mode in ("plain", "blocks"):
        g = report["gradients"][mode]
        assert abs(g["autograd"] - g["finite_difference"]) < 0.02 * abs(g["finite_difference"]) + 1e-6, report
    assert report["gradients"]["checkpoint_error"] < 1e-4, report


@pytest.mark.parametrize("family, lora, expected", [
    ("sd15", "tiny_sd15_lcm_kohya.safetensors", "LCM (auto: its name says lcm)"),
    ("sdxl", "tiny_sdxl_fewstep_meta.safetensors", "LCM (auto: metadata ss_output_name says lcm)"),
    ("sdxl", "tiny_sdxl_lightning_diffusers.safetensors", "Lightning / Hyper-SD / Turbo (auto: its name says"),
])
def test_fmtt_runs_end_to_end_with_each_kind(loras, family, lora, expected):
    p = ksampler_prompt(family, fresh_seed(), cfg=2.0, steps=3, particles=2)
    p["look"] = look(lora, steps=2, model=p["ks"]["inputs"]["model"])
    p["ks"]["inputs"]["lookahead"] = ["look", 0]
    entry = ok(loras.run(p, timeout=600))
    shape, values = latent_of(entry)
    assert shape == [1, FAMILIES[family]["channels"], 8, 8] and all(math.isfinite(v) for v in values)
    summary = entry["outputs"]["summary"]["text"][0]
    assert "few-step LoRA" in summary and expected in summary, summary
    assert int(summary.split("lookahead ")[1].split(",")[0].split(";")[0]) > 0, summary


@pytest.mark.parametrize("family, lora, kind, expected", [
    ("sdxl", "tiny_flux_turbo_kohya.safetensors", "auto", "looks like a LoRA for FLUX"),
    ("sd15", "tiny_sd15_unknown_lcm.safetensors", "auto", "lora_unet_not_a_layer_of_any_model"),
    ("sd15", "tiny_sd15_truncated_lcm.safetensors", "auto", "truncated"),
    ("sd15", "tiny_sd15_nan_lcm.safetensors", "auto", "non-finite values"),
    ("sd15", "tiny_sd15_ranks_lcm.safetensors", "auto", "ranks disagree"),
    ("sd15", "tiny_sd15_lcm_kohya.safetensors", "auto", None),  # control: the same family's file runs
    ("sdxl", "tiny_sdxl_lcm_kohya.safetensors", "auto", None),
    ("flux", "tiny_flux_turbo_kohya.safetensors", "LCM", "LCM's parameterisation is for noise-prediction models"),
], ids=["other_family", "keys_match_nothing", "truncated", "nan_tensor", "rank_mismatch", "sd15_ok", "sdxl_ok",
        "lcm_on_flux"])
def test_wrong_files_are_refused_naming_the_file_and_the_server_keeps_serving(loras, family, lora, kind, expected):
    if family == "flux":
        p = flux_nodes()
        model = p.pop("model_out")
    else:
        p = family_nodes(family)
        model = p.pop("model_out")
        p.pop("vae_out")
    p["look"] = look(lora, kind=kind, model=model)
    p["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["look", 0]}}
    entry = loras.run(p)
    if expected is None:
        ok(entry)
        return
    message = error_message(entry)
    assert entry["status"]["status_str"] == "error" and expected in message, message
    assert lora in message, message
    ok(loras.run(ksampler_prompt("sd15", fresh_seed(), cfg=2.0, steps=2, particles=2)))

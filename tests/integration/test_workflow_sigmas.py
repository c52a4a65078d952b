"""The FLUX flow-map LoRA workflows sample on FMRG's sigmas in a real ComfyUI (see conftest.py): their own
ModelSamplingFlux and BasicScheduler nodes, run on the tiny FLUX model, give FMRG's [1, 0.849, 0.652, 0.385, 0]
at 4 steps; without the shift node ComfyUI's default gives other sigmas (the check can fail)."""
from __future__ import annotations

import re

import pytest

from fmtt_testing import workflows as wt
from fmtt_testing.comfy_prompts import ok

pytestmark = pytest.mark.integration
FMRG_4_STEPS = [1.0, 0.849, 0.652, 0.385, 0.0]  # FMRG's FluxPipeline at 512 px (time shift mu = 0.63)
FLOW_MAP_LORA_WORKFLOWS = [p for p in wt.workflow_paths() if "flowmap_lora" in p.stem]


def sigmas_of(comfy, prompt) -> list[float]:
    text = ok(comfy.run(prompt))["outputs"]["show"]["text"][0]
    return [float(v) for v in re.findall(r"-?\d+\.\d+", text)]


def schedule_prompt(workflow, sigs, shifted=True):
    """The workflow's own model -> ModelSamplingFlux -> BasicScheduler chain at 4 steps, on the tiny FLUX model."""
    prompt = wt.to_api(workflow, sigs)
    shift = next(k for k, n in prompt.items() if n["class_type"] == "ModelSamplingFlux")
    scheduler = next(k for k, n in prompt.items() if n["class_type"] == "BasicScheduler")
    loader = next(k for k, n in prompt.items() if n["class_type"] == "UNETLoader")
    p = {loader: {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_flux_dev.safetensors",
                                                         "weight_dtype": "default"}},
         shift: prompt[shift], scheduler: prompt[scheduler],
         "show": {"class_type": "PreviewAny", "inputs": {"source": [scheduler, 0]}}}
    p[scheduler]["inputs"]["steps"] = 4
    if not shifted:
        p[scheduler]["inputs"]["model"] = [loader, 0]
        del p[shift]
    return p


@pytest.mark.parametrize("path", FLOW_MAP_LORA_WORKFLOWS, ids=[p.stem for p in FLOW_MAP_LORA_WORKFLOWS])
def test_flow_map_lora_workflow_samples_on_fmrgs_sigmas(comfy, sigs, path):
    workflow = wt.load_workflow(path)
    assert sigmas_of(comfy, schedule_prompt(workflow, sigs)) == pytest.approx(FMRG_4_STEPS, abs=6e-4)
    plain = sigmas_of(comfy, schedule_prompt(workflow, sigs, shifted=False))
    assert plain == pytest.approx([1.0, 0.905, 0.760, 0.513, 0.0], abs=6e-4)  # the unshifted sigmas

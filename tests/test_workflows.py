"""Every example workflow in workflows/ opens in the frontend with no node drawn over another, and is structurally
sound, checked without ComfyUI against a snapshot of the node schemas (tests/data/object_info.json): node types
exist (this pack's or core ComfyUI's), links join equal types, required sockets are connected, widget counts
match the schemas. The integration suite checks that the
snapshot matches a live ComfyUI with the pack loaded, and runs every workflow there with tiny models."""
from __future__ import annotations

import json
import math
import re

import pytest

from fmtt_testing import workflows as wt

SIGS = json.loads(wt.SNAPSHOT.read_text())["nodes"]
PATHS = wt.workflow_paths()
OUR_NODES = json.loads(wt.SNAPSHOT.read_text())["pack_nodes"]


def test_there_are_example_workflows():
    assert len(PATHS) >= 5, f"expected the five documented workflows in {wt.WORKFLOWS}, found {PATHS}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_workflow_structure(path):
    workflow = wt.load_workflow(path)
    assert {"nodes", "links", "version"} <= set(workflow), "not a UI-format workflow (what ComfyUI's Save writes)"
    assert wt.check_workflow(workflow, SIGS) == []
    prompt = wt.to_api(workflow, SIGS)
    assert any(SIGS[n["class_type"]]["output_node"] for n in prompt.values()), "no output node: nothing would run"
    assert any(n["class_type"] in OUR_NODES for n in prompt.values()), "the workflow uses none of the pack's nodes"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_workflow_is_documented_in_the_readme(path):
    readme = (wt.ROOT / "README.md").read_text()
    if "## Example workflows" not in readme:
        pytest.skip("README has no 'Example workflows' section yet")
    assert path.name in readme, f"{path.name} is not listed in the README's workflow table"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_workflow_opens_with_no_node_over_another(path):
    assert wt.layout_problems(wt.load_workflow(path)) == []


def test_layout_check_catches_overlaps_and_undersized_nodes():
    original = wt.load_workflow(PATHS[0])
    moved = json.loads(json.dumps(original))
    a, b = moved["nodes"][0], moved["nodes"][1]
    b["pos"] = [a["pos"][0] + 10, a["pos"][1] + a["size"][1] + 5]  # only b's title bar reaches into a
    assert any(f"nodes {a['id']} ({a['type']}) and {b['id']}" in p for p in wt.layout_problems(moved))
    shrunk = json.loads(json.dumps(original))
    node = max(shrunk["nodes"], key=lambda n: len(n.get("widgets_values") or []))
    node["size"][1] = 60
    assert any(f"node {node['id']} ({node['type']}): height 60" in p for p in wt.layout_problems(shrunk))


def test_checker_catches_broken_workflows():
    """The checks must be able to fail: break a real workflow in each way and expect a complaint."""
    original = wt.load_workflow(PATHS[0])
    broken = json.loads(json.dumps(original))
    node = next(n for n in broken["nodes"] if n["type"] in OUR_NODES and n.get("widgets_values"))
    node["widgets_values"].append(123)
    assert any("widget values" in p for p in wt.check_workflow(broken, SIGS))

    broken = json.loads(json.dumps(original))
    broken["nodes"][0]["type"] = "NoSuchNode"
    assert any("unknown node type" in p for p in wt.check_workflow(broken, SIGS))

    broken = json.loads(json.dumps(original))
    link = broken["links"][0]
    link[5] = "NOT_A_TYPE"
    assert any("types differ" in p for p in wt.check_workflow(broken, SIGS))

    broken = json.loads(json.dumps(original))
    target = next(n for n in broken["nodes"] for i in n.get("inputs", []) if i.get("link") is not None)
    slot = next(i for i in target["inputs"] if i.get("link") is not None)
    broken["links"] = [lk for lk in broken["links"] if lk[0] != slot["link"]]
    slot["link"] = None
    assert any("not connected" in p for p in wt.check_workflow(broken, SIGS)) or \
        SIGS[target["type"]]["inputs"][0]["optional"]


def test_snapshot_covers_every_pack_node_with_tooltips():
    for name in OUR_NODES:
        sig = SIGS[name]
        missing = [i["name"] for i in sig["inputs"] if not i["tooltip"]] + \
                  [o["name"] for o in sig["outputs"] if not o["tooltip"]]
        assert not missing, f"{name}: inputs / outputs without a tooltip: {missing}"


FLOW_MAP_LORA_WORKFLOWS = [p for p in PATHS if "flowmap_lora" in p.stem]


def _nodes(workflow, kind):
    return [n for n in workflow["nodes"] if n["type"] == kind]


def flux_shift_sigmas(steps, max_shift, base_shift, width, height):
    """FMRG's (diffusers FluxPipeline) sigmas: linspace(1, 1/steps) time-shifted by mu, mu linear in the image's
    token count between 256 (base_shift) and 4096 (max_shift) tokens; then 0."""
    tokens = (width // 16) * (height // 16)
    mu = base_shift + (max_shift - base_shift) * (tokens - 256) / (4096 - 256)
    grid = [1 - k * (1 - 1 / steps) / (steps - 1) for k in range(steps)]
    return [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in grid] + [0.0]


def test_fmrg_sigmas_at_512_px_are_the_ones_the_issue_measured():
    assert [round(s, 3) for s in flux_shift_sigmas(4, 1.15, 0.5, 512, 512)] == [1.0, 0.849, 0.652, 0.385, 0.0]


@pytest.mark.parametrize("path", FLOW_MAP_LORA_WORKFLOWS, ids=[p.stem for p in FLOW_MAP_LORA_WORKFLOWS])
def test_flow_map_lora_workflows_shift_the_schedule_as_fmrg_does(path):
    """The LoRA was trained on FMRG's shifted sigmas: ModelSamplingFlux at the latent's size feeds the scheduler,
    the guider and the look-ahead (the real ComfyUI's sigmas: tests/integration/test_workflow_sigmas.py)."""
    workflow = wt.load_workflow(path)
    (shift,) = _nodes(workflow, "ModelSamplingFlux")
    (latent,) = _nodes(workflow, "EmptySD3LatentImage")
    assert shift["widgets_values"] == [1.15, 0.5, *latent["widgets_values"][:2]] == [1.15, 0.5, 512, 512]
    prompt = wt.to_api(workflow, SIGS)
    fed = {n["class_type"] for n in prompt.values() if n["inputs"].get("model") == [str(shift["id"]), 0]}
    assert fed == {"BasicScheduler", "BasicGuider", "FMTTFluxFlowMapLookahead"}, fed
    (scheduler,) = _nodes(workflow, "BasicScheduler")
    assert scheduler["widgets_values"][0] == "simple"


def _note(workflow) -> str:
    return " ".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("Note", "MarkdownNote"))


def note_problems(workflow) -> list[str]:
    """Claims the note makes about the widgets that do not hold: weight rule, candidates, steps."""
    note, prompt, problems = _note(workflow), wt.to_api(workflow, SIGS), []
    samplers = [n["inputs"] for n in prompt.values() if n["class_type"] in ("FMTTSampler", "FMTTKSampler")]
    claimed = re.findall(r"uses (eulerian|twisted|advective) weights", note, re.IGNORECASE)
    claimed += re.findall(r"weights widget is (\w+)", note)
    problems += [f"the note says weights {c}, the sampler's widget is {s['weights']}"
                 for c in claimed for s in samplers if s["weights"] != c.lower()]
    candidates = [n["inputs"]["candidates"] for n in prompt.values() if n["class_type"] == "FMTTFlowMapSampler"]
    problems += [f"the note says best of {c}, the widget is {candidates}"
                 for c in re.findall(r"best of (\d+) candidates", note) if [int(c)] != candidates]
    steps = [n["inputs"].get("steps") for n in prompt.values()]
    problems += [f"the note says {c} steps, the widgets say {steps}"
                 for c in re.findall(r"^\*\*[^*]* in (\d+) steps", note) if int(c) not in steps]
    return problems


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_workflow_notes_say_what_the_widgets_do(path):
    assert note_problems(wt.load_workflow(path)) == []


def test_the_note_check_can_fail():
    workflow = wt.load_workflow(next(p for p in PATHS if p.stem.endswith("flowmap_lora_pickscore")))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "FMTTSampler")
    sampler["widgets_values"][wt.widget_names(SIGS["FMTTSampler"]).index("weights")] = "eulerian"
    assert note_problems(workflow) == ["the note says weights twisted, the sampler's widget is eulerian"]
    note = next(n for n in workflow["nodes"] if n["type"] == "MarkdownNote")
    note["widgets_values"][0] = note["widgets_values"][0].replace("weights widget is twisted", "sampler uses Eulerian "
                                                                  "weights")
    assert note_problems(workflow) == []  # now the note and the widget agree

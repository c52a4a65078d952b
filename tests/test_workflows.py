"""Every example workflow in workflows/ opens in the frontend with no node drawn over another, and is structurally
sound, checked without ComfyUI against a snapshot of the node schemas (tests/data/object_info.json): node types
exist (this pack's or core ComfyUI's), links join equal types, required sockets are connected, widget counts
match the schemas. The integration suite checks that the
snapshot matches a live ComfyUI with the pack loaded, and runs every workflow there with tiny models."""
from __future__ import annotations

import json

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

"""Reading ComfyUI workflows without ComfyUI: node signatures from /object_info, structure checks of UI-format
workflows (what the frontend's "Save" writes) and their conversion to the API format POST /prompt runs.

Used by tests/test_workflows.py and tests/integration: `from fmtt_testing import workflows`.
"""
from __future__ import annotations

import json
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
WORKFLOWS = ROOT / "workflows"
SNAPSHOT = TESTS / "data" / "object_info.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def signature(info: dict) -> dict:
    """The parts of one /object_info entry that a workflow's structure depends on (no file lists)."""
    inputs = []
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(spec)):
            kind, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {}) or {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            widget = (is_combo or kind in WIDGET_TYPES) and not opts.get("forceInput", False)
            inputs.append({"name": name, "type": "COMBO" if is_combo else kind, "widget": widget,
                           "optional": section == "optional",
                           "control": bool(opts.get("control_after_generate", False)),
                           "upload": bool(opts.get("image_upload", False)),
                           "tooltip": bool(opts.get("tooltip"))})
    tips = info.get("output_tooltips") or [None] * len(info["output"])
    outputs = [{"name": n, "type": t, "tooltip": bool(tip)}
               for n, t, tip in zip(info["output_name"], info["output"], tips)]
    return {"inputs": inputs, "outputs": outputs, "output_node": bool(info.get("output_node"))}


def signatures(object_info: dict, types=None) -> dict:
    return {k: signature(v) for k, v in sorted(object_info.items()) if types is None or k in types}


def widget_names(sig: dict) -> list[str | None]:
    """The names behind widgets_values, in order. None marks values the frontend adds: 'control after generate'
    right after its number, and an image-upload button's value after all the node's widgets."""
    names, uploads = [], []
    for inp in sig["inputs"]:
        if inp["widget"]:
            names.append(inp["name"])
            if inp["control"]:
                names.append(None)
            if inp["upload"]:
                uploads.append(None)
    return names + uploads


def load_workflow(path) -> dict:
    return json.loads(Path(path).read_text())


def workflow_paths() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.json"))


def _links(workflow):
    return {link[0]: link for link in workflow.get("links", [])}


def check_workflow(workflow: dict, sigs: dict) -> list[str]:
    """Problems with a UI-format workflow against node signatures: unknown node types, links between unequal
    types or to missing slots, unlinked required sockets, widget counts that differ from the schemas."""
    problems = []
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    for node in nodes.values():
        kind, where = node["type"], f"node {node['id']} ({node['type']})"
        if kind in FRONTEND_ONLY:
            continue
        if kind not in sigs:
            problems.append(f"{where}: unknown node type (neither this pack's nor core ComfyUI's)")
            continue
        sig = sigs[kind]
        by_name = {i["name"]: i for i in sig["inputs"]}
        for slot in node.get("inputs", []):
            spec = by_name.get(slot["name"])
            if spec is None:
                problems.append(f"{where}: input '{slot['name']}' is not in the node's schema")
            elif slot.get("type") not in (spec["type"], "*") and not (spec["type"] == "COMBO"):
                problems.append(f"{where}: input '{slot['name']}' has type {slot.get('type')}, schema {spec['type']}")
        linked = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        for spec in sig["inputs"]:
            if not spec["widget"] and not spec["optional"] and spec["name"] not in linked:
                problems.append(f"{where}: required input '{spec['name']}' is not connected")
        expected = len(widget_names(sig))
        got = len(node.get("widgets_values") or [])
        if got != expected:
            problems.append(f"{where}: {got} widget values, the schema has {expected} ({widget_names(sig)})")
        for j, out in enumerate(node.get("outputs", [])):
            if j >= len(sig["outputs"]) or out["type"] != sig["outputs"][j]["type"]:
                problems.append(f"{where}: output {j} '{out.get('name')}' of type {out.get('type')} does not match "
                                "the schema")
    for lid, src, src_slot, dst, dst_slot, ltype in links.values():
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: connects a missing node")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] in FRONTEND_ONLY or d["type"] in FRONTEND_ONLY:
            continue
        if s["type"] not in sigs or d["type"] not in sigs:
            continue
        outs = sigs[s["type"]]["outputs"]
        if src_slot >= len(outs):
            problems.append(f"link {lid}: node {src} ({s['type']}) has no output slot {src_slot}")
            continue
        if dst_slot >= len(d.get("inputs", [])):
            problems.append(f"link {lid}: node {dst} ({d['type']}) has no input slot {dst_slot}")
            continue
        target = d["inputs"][dst_slot]
        spec = {i["name"]: i for i in sigs[d["type"]]["inputs"]}.get(target["name"])
        out_type = outs[src_slot]["type"]
        if spec is None:
            continue
        if not (out_type == ltype and spec["type"] in (out_type, "*")):
            problems.append(f"link {lid}: {s['type']}.{outs[src_slot]['name']} ({out_type}) -> {d['type']}."
                            f"{target['name']} ({spec['type']}), link type {ltype}: types differ")
        if target.get("link") != lid:
            problems.append(f"link {lid}: node {dst} input '{target['name']}' does not point back to it")
    return problems


def to_api(workflow: dict, sigs: dict) -> dict:
    """UI format -> API format ({id: {class_type, inputs}}), as the frontend's "queue prompt" does."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)
    prompt = {}
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        sig = sigs[node["type"]]
        inputs = {}
        for name, value in zip(widget_names(sig), node.get("widgets_values") or []):
            if name is not None:
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(src), src_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def pack_nodes(object_info: dict, module_suffix: str = "comfyui-fmtt") -> list[str]:
    return sorted(k for k, v in object_info.items() if str(v.get("python_module", "")).endswith(module_suffix))


def make_snapshot(object_info: dict, comfyui_version: str, module_suffix: str = "comfyui-fmtt") -> dict:
    """Signatures of the pack's nodes and of every node type the example workflows use."""
    ours = pack_nodes(object_info, module_suffix)
    used = {n["type"] for p in workflow_paths() for n in load_workflow(p)["nodes"]} - FRONTEND_ONLY
    return {"comfyui_version": comfyui_version, "pack_nodes": ours,
            "nodes": signatures(object_info, set(ours) | used)}


# ---------------------------------------------------------------- layout as the frontend draws it

# LiteGraph's geometry in ComfyUI's frontend: the title bar sits above `pos`; each socket row and each widget
# row takes a fixed height. Measured against the frontend bundled with ComfyUI 0.28.2, a node's smallest
# height is 20 * max(socket inputs, outputs) + 24 * widgets + 6 (plus 8 more for most); a node stored smaller
# is drawn larger than the JSON says and can spill onto its neighbours.
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, BODY_PADDING = 30, 20, 24, 6


def min_node_height(node: dict) -> int:
    sockets = sum(1 for i in node.get("inputs", []) if "widget" not in i)
    widgets = len(node.get("widgets_values") or [])
    return SLOT_HEIGHT * max(sockets, len(node.get("outputs", []))) + WIDGET_HEIGHT * widgets + BODY_PADDING


def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) on the canvas, title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    if node.get("flags", {}).get("collapsed"):
        h = 0
    return x, y - TITLE_HEIGHT, x + w, y + h


def layout_problems(workflow: dict) -> list[str]:
    """Nodes drawn over each other when the workflow opens, and nodes stored smaller than they are drawn."""
    problems = []
    nodes = workflow["nodes"]
    for n in nodes:
        need = min_node_height(n)
        if not n.get("flags", {}).get("collapsed") and n["size"][1] < need:
            problems.append(f"node {n['id']} ({n['type']}): height {n['size'][1]} < {need}, the least the frontend "
                            "draws for its sockets and widgets")
    for i, a in enumerate(nodes):
        ax0, ay0, ax1, ay1 = node_rect(a)
        for b in nodes[i + 1:]:
            bx0, by0, bx1, by1 = node_rect(b)
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                problems.append(f"nodes {a['id']} ({a['type']}) and {b['id']} ({b['type']}) overlap: "
                                f"{[ax0, ay0, ax1, ay1]} and {[bx0, by0, bx1, by1]} (title bar included)")
    return problems

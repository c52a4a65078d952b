"""Every example workflow opens in ComfyUI's real frontend (headless chromium, see frontend_load.py): every node
type is known to it, nothing throws, and the widgets hold the values the workflow stores (a stale widget order
would shift them)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fmtt_testing import workflows as wt

pytestmark = pytest.mark.integration
HERE = Path(__file__).resolve().parent


def test_every_workflow_loads_in_the_real_frontend(comfy):
    chromium = os.environ.get("FMTT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("no chromium: set FMTT_CHROMIUM to a chromium binary to load the workflows in the frontend")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    paths = [str(p) for p in wt.workflow_paths()]
    run = subprocess.run([python, str(HERE / "frontend_load.py"), comfy.url, chromium, *paths],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    for path in paths:
        workflow, seen = wt.load_workflow(path), loaded[path]
        assert seen["errors"] == [], (path, seen["errors"])
        assert sorted(n["id"] for n in seen["nodes"]) == sorted(n["id"] for n in workflow["nodes"]), path
        assert all(n["known"] for n in seen["nodes"]), [n["type"] for n in seen["nodes"] if not n["known"]]
        stored = {n["id"]: n.get("widgets_values") or [] for n in workflow["nodes"]}
        compared = 0
        for node in seen["nodes"]:
            values = [v for _, v in node["widgets"]]
            # The frontend's own extra widgets (control_after_generate, upload buttons) come with stored values too.
            assert values[:len(stored[node["id"]])] == stored[node["id"]][:len(values)], (path, node)
            compared += min(len(values), len(stored[node["id"]]))
            if node["type"] == "ModelSamplingFlux":
                assert values == [1.15, 0.5, 512, 512], (path, node)
        assert compared >= 0.9 * sum(len(v) for v in stored.values()), (path, compared)

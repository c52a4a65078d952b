"""The pack imported inside a real ComfyUI, for a bench's worker process (run with ComfyUI's python).

ComfyUI imports a custom node pack as a package named after its folder; the benches do the same through a symlink
(`comfyui_fmtt`), and put the test suite's tiny-model builders (tests/integration, tests) on the path.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def enter_comfyui(device: str) -> None:
    """ComfyUI (COMFYUI_PATH) on the path with its device chosen before comfy.model_management is imported, the
    pack importable as `comfyui_fmtt`, and the test helpers (tiny_models, tiny_unets, fmtt_testing) importable."""
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.cli_args
    comfy.cli_args.args.cpu = device == "cpu"
    sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]
    links = Path(tempfile.mkdtemp())
    os.symlink(ROOT, links / "comfyui_fmtt")  # the pack as a package, as ComfyUI imports it
    sys.path.insert(0, str(links))

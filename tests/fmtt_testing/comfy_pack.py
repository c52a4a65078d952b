"""Inside the test ComfyUI server: reach the FMTT pack's modules as ComfyUI loaded them.

ComfyUI imports a custom node pack under a module name derived from its path, so the test-only nodes
(tests/integration/*_test_nodes.py, loaded by ComfyUI) find the pack's modules by their name's ending.
"""
import sys

PACK_DIR_NAME = "comfyui-fmtt"


def pack_module(name: str):
    """A module of the FMTT pack as ComfyUI loaded it, e.g. pack_module("nodes.settings")."""
    for key, module in sys.modules.items():
        if key.endswith(f"{PACK_DIR_NAME}.{name}"):
            return module
    raise RuntimeError(f"FMTT pack module {name} is not loaded")

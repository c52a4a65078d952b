import os

import pytest
import torch

# The test tensors are small: one thread is faster than two, and it keeps timings stable when the
# machine is shared.
torch.set_num_threads(1)

_INTEGRATION_NOT_RUN = pytest.StashKey[int]()


def pytest_collection_modifyitems(config, items):
    """Without a ComfyUI (COMFYUI_PATH) the integration suite cannot run: its tests are deselected and
    summarised in one line, instead of one SKIPPED line each."""
    if os.environ.get("COMFYUI_PATH"):
        return
    integration = [item for item in items if item.get_closest_marker("integration")]
    if integration:
        config.hook.pytest_deselected(items=integration)
        items[:] = [item for item in items if not item.get_closest_marker("integration")]
    config.stash[_INTEGRATION_NOT_RUN] = len(integration)


def pytest_terminal_summary(terminalreporter, config):
    n = config.stash.get(_INTEGRATION_NOT_RUN, 0)
    if n:
        terminalreporter.write_line(
            f"integration suite not run ({n} tests): set COMFYUI_PATH to a ComfyUI checkout and COMFYUI_PYTHON to "
            "its python to run it against a real ComfyUI server")

"""A real ComfyUI, headless on 127.0.0.1, with the pack installed and tiny random models built for it.

Configure with COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (a python that runs it, default: this one);
COMFYUI_PORT chooses the server's port (default: a free one). Without COMFYUI_PATH every test here is skipped
with that reason. Timeouts scale with the machine: machine_factor() is measured once at start-up and multiplies
every one (a loaded 2-core machine gets proportionally longer). The server runs with
FMTT_MEMORY_BUDGET_MB=MEMORY_BUDGET_MB, so the memory guard's decisions do not depend on the machine's free
memory. The server gets a temporary --base-directory whose custom_nodes/ holds a link to this checkout (the pack)
and the test-only nodes (comfy_test_nodes.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from fmtt_testing import workflows

HERE = Path(__file__).resolve().parent
PACK = HERE.parents[1]
PACK_DIR_NAME = "comfyui-fmtt"  # the test-only nodes find the pack's modules by this name


MEMORY_BUDGET_MB = 1500  # every normal test prompt fits well within it
# The timeouts below were set on 2 idle CPU cores, where machine_factor()'s workload takes this long; a slower or
# busier machine scales them all by its measured factor (measured once, when the server starts).
REFERENCE_SECONDS = 0.1


def machine_factor() -> float:
    """How much slower this machine is now than the one the timeouts were set on (>= 1): a fixed single-thread
    torch workload (matrix products, as the tiny models run), best of 3."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            b = a
            for _ in range(40):
                b = torch.tanh(b @ a / 20)
            best = min(best, time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return max(1.0, best / REFERENCE_SECONDS)


def _port() -> int:
    """COMFYUI_PORT when set (some machines allow only a range of ports), else a free one."""
    chosen = os.environ.get("COMFYUI_PORT")
    if chosen:
        return int(chosen)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Comfy:
    """Minimal client of ComfyUI's HTTP API."""

    def __init__(self, url: str, log: Path, proc, factor: float = 1.0):
        self.url, self.log, self.proc = url, log, proc
        self.client_id = uuid.uuid4().hex
        self.factor = factor  # every wait's timeout is scaled by it (machine_factor)

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def submit(self, prompt):
        """POST /prompt -> (http status, response); validation errors come back as 400."""
        return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id, timeout=240.0):
        """The prompt's history entry once it finished; `timeout` is in seconds of the reference machine."""
        timeout *= self.factor
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited; log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s (machine factor {self.factor:.2f})")

    def run(self, prompt, timeout=240.0):
        status, body = self.submit(prompt)
        assert status == 200, f"prompt rejected: {json.dumps(body)[:3000]}"
        return self.wait(body["prompt_id"], timeout)

    def free(self):
        """Drop ComfyUI's output cache so an identical prompt runs again."""
        self.post("/free", {"free_memory": True})


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    comfy_path = os.environ.get("COMFYUI_PATH")
    if not comfy_path:
        pytest.skip("no ComfyUI configured: set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to the "
                    "python of its environment) to run the integration suite")
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    if not (Path(comfy_path) / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={comfy_path} has no main.py; point it at a ComfyUI checkout")
    factor = machine_factor()
    base = tmp_path_factory.mktemp("comfy_base")
    nodes_dir = base / "custom_nodes"
    (nodes_dir / "fmtt_test_nodes").mkdir(parents=True)
    os.symlink(PACK, nodes_dir / PACK_DIR_NAME)
    shutil.copy(HERE / "comfy_test_nodes.py", nodes_dir / "fmtt_test_nodes" / "__init__.py")
    # tiny_models.py runs in ComfyUI's python and builds its transformers folders with fmtt_testing.hf_models.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    subprocess.run([python, str(HERE / "tiny_models.py"), comfy_path, str(base)], check=True,
                   capture_output=True, timeout=300 * factor, env=env)
    port = _port()
    log = base / "comfyui.log"
    # The test-only nodes import fmtt_testing (tests/ on PYTHONPATH) in the server's python too.
    env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "FMTT_MEMORY_BUDGET_MB": str(MEMORY_BUDGET_MB)}
    with open(log, "w") as out:
        proc = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                                 "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
                                 "--preview-method", "latent2rgb"],
                                cwd=comfy_path, stdout=out, stderr=subprocess.STDOUT, env=env)
    client = Comfy(f"http://127.0.0.1:{port}", log, proc, factor)
    try:
        deadline = time.time() + 180 * factor
        while True:
            try:
                client.get("/object_info/KSampler")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ComfyUI did not start; log:\n{log.read_text()[-5000:]}") from None
                time.sleep(0.5)
        client.base = base
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def object_info(comfy):
    return comfy.get("/object_info")


@pytest.fixture(scope="session")
def sigs(object_info):
    return workflows.signatures(object_info)

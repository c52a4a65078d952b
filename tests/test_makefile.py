"""The Makefile's torch choice: the CPU build where wanted and reachable, PyPI's otherwise; a changed choice
rebuilds the venv. `make -n` shows what make would run without running it (no network, no venv built)."""
from __future__ import annotations

import http.server
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import torch_index  # noqa: E402

PIN = "torch==2.14.1 torchvision==0.29.1"


@pytest.fixture
def local_index(tmp_path):
    """A local HTTP server that answers for torch/ like PyTorch's wheel index."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<a href='torch-2.14.1+cpu.whl'>torch</a>")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def closed_port_url() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there once the socket is closed


def test_cpu_build_when_no_gpu_and_the_index_answers(local_index):
    kind, why = torch_index.choose("auto", local_index, 5, linux=True, gpu=False)
    assert kind == "cpu" and "answered" in why


def test_pypi_build_quickly_when_the_index_does_not_answer():
    start = time.perf_counter()
    kind, why = torch_index.choose("auto", closed_port_url(), 5, linux=True, gpu=False)
    assert kind == "pypi" and "did not answer" in why
    assert time.perf_counter() - start < 5


def test_gpu_machines_and_other_platforms_keep_pypi(local_index):
    assert torch_index.choose("auto", local_index, 5, linux=True, gpu=True)[0] == "pypi"
    assert torch_index.choose("auto", local_index, 5, linux=False, gpu=False)[0] == "pypi"
    assert torch_index.choose("cpu", closed_port_url(), 5, linux=True, gpu=True)[0] == "cpu"  # asked for


def test_script_prints_pip_arguments_and_says_which_build(local_index):
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "scripts" / "torch_index.py"), *args],  # noqa: E731
                                       capture_output=True, text=True, check=True)
    cpu = run("--build", "cpu", "--index", local_index)
    assert cpu.stdout.strip() == f"--index-url {local_index}" and "CPU build" in cpu.stderr
    pypi = run("--build", "pypi")
    assert pypi.stdout.strip() == "" and "PyPI build" in pypi.stderr


def dry_run(venv: Path, *args: str) -> str:
    """`make -n demo` for a venv at `venv`: the commands make would run."""
    done = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", *args, "demo"],
                          capture_output=True, text=True, check=True)
    return done.stdout


def built_venv(tmp_path: Path, choice: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".torch-choice").write_text(choice + "\n")
    time.sleep(0.01)
    (venv / "bin" / ".ready").touch()  # newer than the stamp and than pyproject.toml
    return venv


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_venv_is_rebuilt_only_when_the_torch_choice_changes(tmp_path):
    venv = built_venv(tmp_path, f"{PIN} [auto]")
    same = dry_run(venv)
    assert "rm -rf" not in same and "pip install" not in same and "fmtt demo" in same
    other_pin = dry_run(venv, "TORCH_PIN=torch==2.5.1 torchvision==0.20.1")
    assert f"rm -rf {venv}" in other_pin and "torch==2.5.1 torchvision==0.20.1" in other_pin
    assert "echo 'torch==2.5.1 torchvision==0.20.1 [auto]'" in other_pin
    other_build = dry_run(venv, "TORCH_BUILD=pypi")
    assert f"rm -rf {venv}" in other_build and "--build pypi" in other_build


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_fresh_clone_builds_the_venv_with_the_probe(tmp_path):
    plan = dry_run(tmp_path / "none")
    assert "-m venv" in plan and "scripts/torch_index.py --build auto" in plan and "--timeout 5" in plan
    assert plan.index("torch_index.py") < plan.index('pip install -q -e ".[test]"')

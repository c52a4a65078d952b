"""Which index `make` installs torch from: PyTorch's CPU-only wheels where they are wanted and reachable.

PyPI's Linux torch is the CUDA build (several GB of CUDA libraries). On a Linux machine without an NVIDIA
GPU the CPU build from PyTorch's own index is a few hundred MB and runs the same code, so `make` takes it
when that index answers within --timeout seconds, and PyPI's build otherwise (a machine that reaches only
PyPI still gets a working torch). Elsewhere (macOS, Windows) PyPI's torch has no CUDA libraries to spare.

Prints the pip arguments that choose the index (nothing for PyPI) on stdout and one line saying which
build it chose, and why, on stderr. Standard library only: it runs before the venv exists.

    python3 scripts/torch_index.py [--build auto|cpu|pypi] [--index URL] [--timeout S]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def has_nvidia_gpu() -> bool:
    """An NVIDIA driver is installed: the CUDA build is the one to have."""
    return shutil.which("nvidia-smi") is not None or os.path.exists("/proc/driver/nvidia")


def reachable(index: str, timeout: float) -> bool:
    """The index answers for torch (its simple-API page) within `timeout` seconds."""
    try:
        with urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):  # URLError, timeouts and refused connections are OSErrors
        return False


def choose(build: str, index: str, timeout: float, *, linux: bool, gpu: bool) -> tuple[str, str]:
    """("cpu" or "pypi", the reason)."""
    if build == "pypi":
        return "pypi", "TORCH_BUILD=pypi"
    if build == "cpu":
        return "cpu", "TORCH_BUILD=cpu"
    if not linux:
        return "pypi", f"PyPI's torch on {platform.system()} has no CUDA libraries"
    if gpu:
        return "pypi", "an NVIDIA GPU driver is installed: PyPI's CUDA build"
    if reachable(index, timeout):
        return "cpu", f"no NVIDIA GPU, and {index} answered"
    return "pypi", (f"no NVIDIA GPU, but {index} did not answer within {timeout:g} s: PyPI's build, which on "
                    "Linux carries the (unused) CUDA libraries")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", choices=("auto", "cpu", "pypi"), default="auto",
                        help="auto: the CPU build on Linux without an NVIDIA GPU when its index is reachable (default)")
    parser.add_argument("--index", default=CPU_INDEX, help=f"PyTorch's CPU wheel index (default {CPU_INDEX})")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the index (default 5)")
    args = parser.parse_args(argv)
    kind, why = choose(args.build, args.index, args.timeout, linux=sys.platform.startswith("linux"),
                       gpu=has_nvidia_gpu())
    print(f"torch: {'CPU build from ' + args.index if kind == 'cpu' else 'PyPI build'} ({why})", file=sys.stderr)
    if kind == "cpu":
        print(f"--index-url {args.index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

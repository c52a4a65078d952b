"""Launch a real gloo process group on this machine: one Python process per rank, as torchrun would.

`launch(scenario, world, tmp_path)` runs `tests/fmtt_testing/dist_worker.py SCENARIO` in `world` processes that
rendezvous over TCP on localhost; each rank saves what it computed (torch.save, read back with
weights_only=True) or the text of the error it ended with. The launcher kills only the processes it
started, and only when they outlive `timeout`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: int | None       # None: still running at the deadline (then killed)
    seconds: float               # from launch until this rank exited (or the deadline)
    result: dict | None          # what the rank saved on success
    error: str | None            # the error text it saved on failure
    stderr: str


def launch(scenario: str, world: int, tmp_path: Path, args: dict | None = None, timeout: float = 90.0,
           dist_timeout: float = 20.0, wait_for: set[int] | None = None) -> list[RankResult]:
    """Run the scenario on `world` ranks; stop waiting when the ranks in `wait_for` (default: all)
    have exited or after `timeout` seconds, then kill whatever still runs."""
    out = Path(tmp_path) / f"{scenario}-w{world}-{time.monotonic_ns()}"
    out.mkdir(parents=True)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "FMTT_DIST_TIMEOUT": str(dist_timeout)}
    start = time.monotonic()
    procs = []
    for rank in range(world):
        err = open(out / f"rank{rank}.stderr", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), scenario, str(out), json.dumps(args or {})],
                                       env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                       stdout=err, stderr=subprocess.STDOUT), err))
    ended = [None] * world
    wait_for = set(range(world)) if wait_for is None else wait_for
    while any(ended[r] is None for r in wait_for) and time.monotonic() - start < timeout:
        for r, (p, _) in enumerate(procs):
            if ended[r] is None and p.poll() is not None:
                ended[r] = time.monotonic() - start
        time.sleep(0.05)
    results = []
    for r, (p, err) in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
        err.close()
        res = out / f"rank{r}.pt"
        msg = out / f"rank{r}.err"
        results.append(RankResult(
            r, p.returncode if ended[r] is not None else None, ended[r] if ended[r] is not None else timeout,
            torch.load(res, weights_only=True) if res.exists() else None,
            msg.read_text() if msg.exists() else None, (out / f"rank{r}.stderr").read_text()))
    return results


def results_of(ranks: list[RankResult]) -> list[dict]:
    """Every rank's saved result; fails with the ranks' output if one did not finish cleanly."""
    bad = [r for r in ranks if r.returncode != 0 or r.result is None]
    if bad:
        raise AssertionError("\n\n".join(
            f"rank {r.rank}: returncode {r.returncode}, error {r.error}\n{r.stderr[-3000:]}" for r in bad))
    return [r.result for r in ranks]

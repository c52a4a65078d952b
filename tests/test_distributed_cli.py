"""`torchrun --nproc-per-node K -m fmtt_demo.cli demo` shards every method's population over K gloo
processes and prints the table one process prints (wall time aside); only rank 0 prints and writes.
The analytic model's runs are equal bit for bit (test_distributed_sampler.py); the demo's networks are
equal to float32 round-off, with the same resampling events."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARGS = ["demo", "--particles", "10", "--steps", "8", "--samples", "4", "--seed", "3", "--no-progress"]


def _table(stdout: str) -> list[str]:
    """The table's rows without the wall-time column (the last one) and without the 'wrote' line."""
    lines = [line for line in stdout.splitlines() if line.strip() and not line.startswith("wrote")]
    return [line.rsplit(None, 1)[0] if line[:1].isalpha() and "  " in line else line for line in lines]


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_torchrun_demo_prints_the_one_process_table(tmp_path):
    one = _run([sys.executable, "-m", "fmtt_demo.cli"] + ARGS, tmp_path / "one")
    three = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                  "-m", "fmtt_demo.cli"] + ARGS, tmp_path / "three")
    assert "sharded over 3 processes" in three
    assert _table(one)[1:] == _table(three)[1:]  # the first line names the sharding
    assert three.count("FMTT exact, flow map") == 1  # printed once, by rank 0
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "three" / "results.json").read_text())
    assert a["settings"] == {k: v for k, v in b["settings"].items() if k != "processes"}
    assert len(a["methods"]) == len(b["methods"]) == 7
    for ma, mb in zip(a["methods"], b["methods"]):
        ma.pop("seconds"), mb.pop("seconds")
        assert (ma["key"], ma["particles"], ma["nfe"], ma["resamples"]) == \
            (mb["key"], mb["particles"], mb["nfe"], mb["resamples"])
        assert [s["resampled"] for s in ma["trace"]] == [s["resampled"] for s in mb["trace"]], ma["key"]
        # The demo's networks round differently for a batch of 10 and one of 3 or 4 (float32 kernels chosen
        # by batch size, as with chunk_size in one process): values agree to round-off, not bit for bit
        # (the advective weights' differences r_{t+h} - r_t amplify it to ~1e-5 relative).
        assert _floats(ma) == pytest.approx(_floats(mb), rel=1e-3, abs=1e-5, nan_ok=True), ma["key"]


def _floats(tree) -> list[float]:
    if isinstance(tree, dict):
        return [v for k in sorted(tree) for v in _floats(tree[k])]
    if isinstance(tree, list):
        return [v for item in tree for v in _floats(item)]
    return [float(tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []

"""bench/bench_distributed.py --quick runs end to end: one process and torchrun with 2 processes, same
resampling steps, and the table it prints."""
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_distributed.py"


def test_quick_bench_runs_and_sharded_runs_match_one_process():
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--procs", "2"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| digits") or line.startswith("| heavy")]
    assert len(rows) == 4
    assert all(row.rstrip().endswith("| yes |") for row in rows), done.stdout
    processes = [row.split("|")[3].strip() for row in rows]
    assert processes == ["1 (no group)", "2", "1 (no group)", "2"]

"""Sharded FMTT on torch.distributed: wall time and the share spent in communication against the
number of processes, next to one process (no process group) in the same run.

    python bench/bench_distributed.py              # digits demo + heavy synthetic model; 1, 2, 3 processes
    python bench/bench_distributed.py --quick      # smoke test (small populations, few steps)

K-process rows are launched with torchrun (torch.distributed.run, gloo on the CPU, one thread per rank);
the one-process row runs FMTT with no process group at all. "comm s" is the time rank 0 spent inside
collectives (gathering log-weights / rewards, moving resampled particles, collecting the result),
waiting for slower ranks included. "max diff" is the largest difference of a final particle's
coordinate or normalised weight from the one-process run: 0 when the model's outputs per row do not
depend on the batch size; float32 round-off otherwise (a shard is a smaller batch).
Writes bench/results/distributed.{json,md} (not with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fmtt_core as fc

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------- workloads
def _digits(quick: bool):
    from fmtt_demo.models import load_digit_models
    from fmtt_demo.rewards import make_reward

    models = load_digit_models()
    n, steps = (16, 10) if quick else (64, 40)
    x = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    cfg = fc.FMTTConfig(mode="exact", reward_scale=4.0, seed=0)
    run = dict(denoiser=models.denoiser, reward=make_reward("classifier", models, 3), config=cfg,
               lookahead=fc.FlowMapLookahead(models.flow_map))
    return x, fc.time_grid(steps), run


class HeavyDenoiser(torch.nn.Module):
    """A synthetic denoiser that costs like a real one: a wide MLP (4096 units, 3 layers), 1024-dim latent."""

    def __init__(self, dim: int, width: int, depth: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.layers = torch.nn.ModuleList()
        sizes = [dim + 1] + [width] * depth + [dim]
        for a, b in zip(sizes[:-1], sizes[1:]):
            layer = torch.nn.Linear(a, b)
            with torch.no_grad():
                layer.weight.copy_(torch.randn((b, a), generator=g) / a ** 0.5)
                layer.bias.zero_()
            self.layers.append(layer)

    def forward(self, x, t):
        h = torch.cat([x, t[:, None].to(x.dtype)], 1)
        for layer in self.layers[:-1]:
            h = torch.nn.functional.silu(layer(h))
        return t[:, None] * x + 0.1 * self.layers[-1](h)


def _heavy(quick: bool):
    dim, width, depth, n, steps = (256, 512, 2, 8, 4) if quick else (1024, 4096, 3, 32, 16)
    model = HeavyDenoiser(dim, width, depth).requires_grad_(False)
    target = torch.linspace(-1, 1, dim)
    reward = lambda x: -((x - target) ** 2).mean(1)  # noqa: E731
    x = torch.randn((n, dim), generator=torch.Generator().manual_seed(0))
    cfg = fc.FMTTConfig(mode="exact", reward_scale=200.0, ess_threshold=0.7, seed=0)
    return x, fc.time_grid(steps), dict(denoiser=model, reward=reward, config=cfg)


WORKLOADS = {"digits": _digits, "heavy": _heavy}


def run(workload: str, quick: bool, population=None):
    x, times, kw = WORKLOADS[workload](quick)
    if population is not None:
        x = population.local(x)
    start = time.perf_counter()
    res = fc.fmtt_sample(kw.pop("denoiser"), x, times, population=population, **kw)
    return res, time.perf_counter() - start, x.shape[0]


# ----------------------------------------------------------------------------------- one rank
def worker(workload: str, quick: bool, out: Path) -> None:
    import torch.distributed as dist

    from fmtt_core import distributed as fd

    torch.set_num_threads(1)
    fd.init_from_env("gloo", timeout_s=300)
    x, _, _ = WORKLOADS[workload](quick)
    pop = fd.DistributedPopulation(x.shape[0], 0)
    dist.barrier()
    res, seconds, _ = run(workload, quick, pop)
    wall = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        torch.save({"samples": res.samples, "log_weights": res.log_weights,
                    "resampled": torch.tensor([s.resampled for s in res.trace])}, out / "result.pt")
        (out / "stats.json").write_text(json.dumps({
            "wall_s": float(wall), "comm_s": pop.stats.seconds, "bytes_sent": pop.stats.bytes_sent,
            "rows_received": pop.stats.rows_received, "resamples": res.n_resamples}))
    fd.leave(0)


# ----------------------------------------------------------------------------------- driver
def launch(workload: str, procs: int, quick: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               __file__, "--worker", workload, "--out", tmp] + (["--quick"] if quick else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun with {procs} processes failed:\n{done.stderr[-3000:]}")
        stats = json.loads((Path(tmp) / "stats.json").read_text())
        stats["result"] = torch.load(Path(tmp) / "result.pt", weights_only=True)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--procs", default="2,3", help="process counts to launch (default 2,3)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick, args.out)
        return 0

    torch.set_num_threads(1)
    procs = [int(p) for p in args.procs.split(",")]
    rows = []
    for workload in WORKLOADS:
        res, seconds, n = run(workload, args.quick)
        rows.append({"workload": workload, "particles": n, "processes": "1 (no group)", "wall_s": seconds,
                     "speedup": 1.0, "comm_s": 0.0, "comm_share": 0.0, "rows_received": 0, "bytes_sent": 0,
                     "resamples": res.n_resamples, "max_diff": 0.0, "same_events": True})
        for k in procs:
            s = launch(workload, k, args.quick)
            diff = max(float((s["result"]["samples"] - res.samples).abs().max()),
                       float((s["result"]["log_weights"].exp() - res.weights).abs().max()))
            events = torch.equal(s["result"]["resampled"], torch.tensor([t.resampled for t in res.trace]))
            rows.append({"workload": workload, "particles": n, "processes": str(k), "wall_s": s["wall_s"],
                         "speedup": seconds / s["wall_s"], "comm_s": s["comm_s"],
                         "comm_share": s["comm_s"] / s["wall_s"], "rows_received": s["rows_received"],
                         "bytes_sent": s["bytes_sent"], "resamples": s["resamples"], "max_diff": diff,
                         "same_events": events})
    table = ["| workload | N | processes | wall s | speed-up | comm s (rank 0) | comm share | rows moved | "
             "MB sent (rank 0) | resamplings | max diff vs 1 process | same resampling steps |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        table.append(f"| {r['workload']} | {r['particles']} | {r['processes']} | {r['wall_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['comm_s']:.3f} | {r['comm_share']:.1%} | {r['rows_received']} | "
                     f"{r['bytes_sent'] / 1e6:.2f} | {r['resamples']} | {r['max_diff']:.1e} | "
                     f"{'yes' if r['same_events'] else 'NO'} |")
    note = (f"Machine: {os.cpu_count()} CPU cores, one thread per process, gloo over localhost; with more "
            "processes than cores the ranks share cores and the speed-up is capped by the machine, not the method.")
    print("\n".join(table) + "\n\n" + note)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "distributed.json").write_text(json.dumps({"rows": rows, "note": note}, indent=1))
        (RESULTS / "distributed.md").write_text("\n".join(table) + "\n\n" + note + "\n")
    return 0 if all(r["same_events"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""One rank of a test process group (started by tests/dist_tools.launch): `dist_worker.py SCENARIO OUT ARGS`.

Each scenario computes on its shard and saves a dict of tensors to OUT/rank{r}.pt; the test compares
them with what one process computes. An error is saved as text to OUT/rank{r}.err (exit code 3).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from fmtt_core import distributed as fd  # noqa: E402
from fmtt_core import smc  # noqa: E402

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


def population(n: int, seed: int, tail=(3, 2)):
    """A population every rank can rebuild: particles and log-weights (some zero-weight) from the seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *tail), generator=g)
    log_w = 3 * torch.randn(n, generator=g, dtype=torch.float64)
    log_w[torch.rand(n, generator=g) < 0.2] = -math.inf
    log_w[0] = 0.0
    return x, log_w


@scenario
def collectives(args):
    """Gathered normalisation / ESS / ancestors / moves for many random populations and all schemes."""
    n, trials = args["n"], args["trials"]
    sh = fd.shards_for(n)
    stats = fd.CommStats()
    out = {"sizes": torch.tensor(sh.sizes)}
    for trial in range(trials):
        x, log_w = population(n, 100 + trial)
        lw_local = sh.local(log_w)
        full = fd.gather(lw_local, sh, stats=stats)
        out[f"gathered{trial}"] = full
        out[f"lse{trial}"] = fd.global_log_sum_exp(lw_local, stats=stats).reshape(1)
        out[f"ess{trial}"] = torch.tensor([smc.ess(full)], dtype=torch.float64)
        for scheme in smc.SCHEMES:
            gen = torch.Generator().manual_seed(7 + trial)
            anc = smc.resample_indices(full, scheme, gen)
            plan = fd.plan_moves(anc, sh)
            x_new, lw_new = fd.move_particles([sh.local(x), lw_local], plan, sh, stats=stats)
            out[f"anc{trial}{scheme}"] = anc
            out[f"x{trial}{scheme}"] = x_new
            out[f"lw{trial}{scheme}"] = lw_new
            out[f"moved{trial}{scheme}"] = torch.tensor([plan.moved])
            out[f"gen{trial}{scheme}"] = torch.rand(2, generator=gen, dtype=torch.float64)
        out[f"noise{trial}"] = fd.shard_of_full_draw(torch.Generator().manual_seed(trial), n, (3, 2), sh)
    out["bytes"] = torch.tensor([stats.bytes_sent])
    return out


@scenario
def disagree(args):
    """Rank 1 passes another seed: every rank must stop with a clear error."""
    sh = fd.shards_for(args["n"])
    fd.check_agree({"seed": 1 if sh.rank == 1 else 0}, sh, what="the sampler settings")
    return {}


@scenario
def die(args):
    """Rank `victim` dies (or hangs) at step `at`; the others keep calling collectives."""
    sh = fd.shards_for(args["n"])
    for step in range(args["steps"]):
        if sh.rank == args["victim"] and step == args["at"]:
            if args["how"] == "hang":
                time.sleep(3600)
            os._exit(17)
        fd.gather(torch.zeros(sh.size), sh, what=f"gather at step {step}")
    return {}


def main():
    name, out, args = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    fd.init_from_env("gloo", timeout_s=float(os.environ.get("FMTT_DIST_TIMEOUT", 20)))
    rank = dist.get_rank()
    try:
        result = SCENARIOS[name](args)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}")
        os._exit(3)  # no teardown: a peer may be gone, and destroying the group could wait on it
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

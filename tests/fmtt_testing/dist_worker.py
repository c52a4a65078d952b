"""One rank of a test process group (started by fmtt_testing.dist_tools.launch): `dist_worker.py SCENARIO OUT ARGS`.

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


def sampler_problem(args):
    """A real sampling problem every rank (and the test) rebuilds: a ring of 8 Gaussians in 2-D with
    its closed-form denoiser and flow map, a quadratic reward off the ring, noise from the seed."""
    from fmtt_core import FlowMapLookahead, FMTTConfig, time_grid
    from fmtt_core.analytic import quadratic_reward, ring_mixture

    gm = ring_mixture(8, 4.0, 0.5)
    x_init = torch.randn((args["n"], 2), generator=torch.Generator().manual_seed(args.get("seed", 0)),
                         dtype=torch.float64)
    reward = quadratic_reward(torch.tensor([4.0, 0.0], dtype=torch.float64), 0.5)
    if args.get("holes"):  # non-finite rewards on the far side of the ring: those particles get weight zero
        smooth = reward
        reward = lambda x: torch.where(x[:, 0] < -3.0, torch.nan, smooth(x))  # noqa: E731
    cfg = FMTTConfig(mode=args.get("mode", "exact"), reward_scale=args.get("beta", 2.0),
                     ess_threshold=args.get("ess_threshold", 0.9), resampling=args.get("resampling", "systematic"),
                     chunk_size=args.get("chunk"), search_steps=3, defect_probe=args.get("probe", 0),
                     sde_step=args.get("sde_step", "euler"), seed=args.get("seed", 0))
    lookahead = FlowMapLookahead(lambda x, s, t: gm.flow_map(x, s, t, 8))
    return gm, x_init, time_grid(args.get("steps", 10)), reward, cfg, lookahead


def run_method(args, population=None, x_init=None):
    """One sampler of fmtt_core on the problem; population=None is the single-process run."""
    import fmtt_core as fc

    gm, x_full, times, reward, cfg, lookahead = sampler_problem(args)
    x = x_full if x_init is None else x_init
    kw = {"reward": reward, "config": cfg, "population": population}
    method = args.get("method", "fmtt")
    if method == "fmtt":
        return fc.fmtt_sample(gm.denoiser, x, times, lookahead=lookahead, **kw)
    if method == "fk":
        return fc.fk_steering(gm.denoiser, x, times, potential=args.get("potential", "diff"), **kw)
    if method == "guidance":
        return fc.guidance_sample(gm.denoiser, x, times, **kw)
    return fc.best_of_n(gm.denoiser, x, times, **kw)


def result_dict(res) -> dict:
    out = {"samples": res.samples, "log_weights": res.log_weights, "rewards": res.rewards,
           "thermo": torch.tensor([res.thermodynamic_length], dtype=torch.float64)}
    for name in ("ess", "resampled", "reward_mean", "reward_max", "valid", "defect", "tamed"):
        out[f"trace_{name}"] = torch.tensor([float(getattr(s, name)) for s in res.trace], dtype=torch.float64)
    out["nfe"] = torch.tensor(list(res.nfe.as_dict().values()))
    return out


@scenario
def samplers(args):
    """Each of args["runs"] (a sampler and its settings) on a DistributedPopulation of this group."""
    out = {}
    for i, run in enumerate(args["runs"]):
        pop = fd.DistributedPopulation(run["n"], run.get("seed", 0))
        _, x_full, *_ = sampler_problem(run)
        res = run_method(run, pop, pop.local(x_full))
        out.update({f"{i}/{k}": v for k, v in result_dict(res).items()})
        out[f"{i}/rows_received"] = torch.tensor([pop.stats.rows_received])
        out[f"{i}/nfe_total"] = torch.tensor(list(fd.total_nfe(res.nfe).as_dict().values()))
    return out


@scenario
def distill(args):
    """The flow-map trainer on the closed-form toy, data-parallel: losses, weights and EMA after the run."""
    from distill_toy import Student, data, settings, teacher

    from fmtt_core.flow_maps import FlowMapTrainer

    module = Student()
    trainer = FlowMapTrainer(module, teacher, data, settings(**args))
    losses = trainer.run()
    return {"losses": torch.tensor(losses, dtype=torch.float64),
            **{f"model.{k}": v for k, v in module.state_dict().items()},
            **{f"ema.{k}": v for k, v in trainer.ema.state_dict().items()}}


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
    fd.leave(0)  # barrier, destroy, exit without finalization (gloo's teardown can abort there)


if __name__ == "__main__":
    main()

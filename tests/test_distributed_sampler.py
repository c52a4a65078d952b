"""FMTT and the baselines on a population sharded over 2 and 3 gloo processes give the particles,
weights, rewards and resampling events of the single-process run with the same seed: uneven
shards, every resampling scheme, resampling that moves particles across ranks, chunked model
calls, search and zero-order modes, particles with non-finite rewards, the Eulerian-defect probe."""

import pytest
import torch

from fmtt_testing import dist_tools
from fmtt_testing import dist_worker as worker


def same(a, b) -> bool:
    """Bit-for-bit equal, NaN where NaN (a trace field that was not measured)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


RUNS = {
    2: [dict(method="fmtt", mode="exact", n=9, resampling="systematic"),
        dict(method="fmtt", mode="zero_order", n=7, resampling="stratified", steps=8),
        dict(method="guidance", n=5, beta=0.5, steps=6),
        dict(method="best_of_n", n=6, steps=6)],
    3: [dict(method="fmtt", mode="exact", n=10, resampling="multinomial", chunk=2),
        dict(method="fmtt", mode="search", n=11, steps=12, holes=True),
        dict(method="fmtt", mode="exact", n=10, steps=8, holes=True, probe=3, ess_threshold=0.7),
        dict(method="fk", potential="max", n=8, resampling="residual", beta=1.0, ess_threshold=1.0),
        dict(method="fmtt", mode="exact", n=3, resampling="residual", ess_threshold=1.0, steps=6)],
}


@pytest.mark.filterwarnings("ignore:FMTT.*non-finite reward:RuntimeWarning")
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_samplers_equal_one_process(tmp_path, world):
    ranks = dist_tools.results_of(dist_tools.launch("samplers", world, tmp_path, {"runs": RUNS[world]},
                                                    timeout=240))
    for i, run in enumerate(RUNS[world]):
        one = worker.result_dict(worker.run_method(run))
        for key, ref in one.items():
            if key == "nfe":
                # Each rank counts its own shard's model calls; together they are one process's.
                assert all(torch.equal(r[f"{i}/nfe_total"], ref) for r in ranks), (run, key)
                assert torch.equal(sum(r[f"{i}/nfe"] for r in ranks), ref), (run, key)
                continue
            for r in ranks:  # every rank holds the whole final population
                assert same(r[f"{i}/{key}"], ref), (run, key, r[f"{i}/{key}"], ref)
        events = int(one["trace_resampled"].sum())
        if run["method"] != "best_of_n" and run["method"] != "guidance":
            assert events > 0, run  # the case exercises resampling / selection
            if run["n"] > world:
                assert sum(int(r[f"{i}/rows_received"]) for r in ranks) > 0, run  # and particles crossed ranks

"""fmtt_core.distributed on a real gloo process group (2 and 3 processes on this CPU): the sharded
collectives reproduce one process's normalisation, ESS, ancestors and resampled particles exactly,
and a rank that dies, hangs or disagrees ends every rank with a clear error in bounded time."""
import math

import pytest
import torch

import fmtt_core.distributed as fd
from fmtt_core import smc
from fmtt_core.errors import FMTTInputError
from fmtt_testing import dist_tools
from fmtt_testing import dist_worker as worker


def test_shards_cover_every_slot_once_and_uneven():
    for n, w in [(7, 3), (8, 3), (5, 5), (64, 3), (1, 1)]:
        shards = [fd.Shards(n, w, r) for r in range(w)]
        slots = torch.cat([torch.arange(s.start, s.stop) for s in shards])
        assert torch.equal(slots, torch.arange(n))
        assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
        owner = shards[0].owner(torch.arange(n))
        assert all((owner[s.start:s.stop] == s.rank).all() for s in shards)
    with pytest.raises(FMTTInputError, match="at least one"):
        fd.Shards(2, 3, 0)


def test_move_plan_without_a_group_matches_indexing():
    """The plan alone (no communication): pooling local rows and the rows each rank would send
    rebuilds x[ancestors] on every rank, and each ancestor crosses to a rank at most once."""
    n, w = 11, 3
    x, log_w = worker.population(n, 5)
    anc = smc.resample_indices(log_w, "multinomial", torch.Generator().manual_seed(3))
    shards = [fd.Shards(n, w, r) for r in range(w)]
    plans = [fd.plan_moves(anc, s) for s in shards]
    for s, plan in zip(shards, plans):
        received = []
        for src in sorted(plan.recvs):
            sent = plans[src].sends[s.rank] + shards[src].start  # what src sends, as global slots
            assert torch.equal(sent, plan.recvs[src])
            assert sent.unique().numel() == sent.numel()
            received.append(x[sent])
        pool = torch.cat([s.local(x)] + received)
        assert torch.equal(pool[plan.take], s.local(x[anc]))


@pytest.mark.parametrize("world,n", [(2, 9), (3, 10)])
def test_collectives_equal_one_process(tmp_path, world, n):
    trials = 4
    ranks = dist_tools.results_of(dist_tools.launch("collectives", world, tmp_path, {"n": n, "trials": trials}))
    assert [int(s) for s in ranks[0]["sizes"]] == fd.Shards(n, world, 0).sizes
    moved_any = 0
    for trial in range(trials):
        x, log_w = worker.population(n, 100 + trial)
        noise = torch.randn((n, 3, 2), generator=torch.Generator().manual_seed(trial))
        assert torch.equal(torch.cat([r[f"noise{trial}"] for r in ranks]), noise)
        for r in ranks:
            assert torch.equal(r[f"gathered{trial}"], log_w)
            assert r[f"ess{trial}"].item() == smc.ess(log_w)
            # The O(1)-traffic logsumexp agrees to round-off (it sums in another order).
            assert r[f"lse{trial}"].item() == pytest.approx(torch.logsumexp(log_w, 0).item(), abs=1e-12)
        for scheme in smc.SCHEMES:
            gen = torch.Generator().manual_seed(7 + trial)
            anc = smc.resample_indices(log_w, scheme, gen)
            after = torch.rand(2, generator=gen, dtype=torch.float64)
            assert not torch.isinf(log_w[anc]).any()  # zero-weight particles are never ancestors
            for r in ranks:
                assert torch.equal(r[f"anc{trial}{scheme}"], anc)
                assert torch.equal(r[f"gen{trial}{scheme}"], after)  # generators stay in lock-step
            assert torch.equal(torch.cat([r[f"x{trial}{scheme}"] for r in ranks]), x[anc])
            assert torch.equal(torch.cat([r[f"lw{trial}{scheme}"] for r in ranks]), log_w[anc])
            moved_any += sum(int(r[f"moved{trial}{scheme}"]) for r in ranks)
    assert moved_any > 0  # resampling did carry particles across ranks


def test_ranks_that_disagree_all_stop(tmp_path):
    ranks = dist_tools.launch("disagree", 3, tmp_path, {"n": 6}, timeout=60)
    for r in ranks:
        assert r.returncode == 3, r.stderr
        assert "ranks disagree on the sampler settings" in r.error and "[1]" in r.error


@pytest.mark.parametrize("how", ["die", "hang"])
def test_a_failed_rank_ends_the_others_with_a_clear_error(tmp_path, how):
    timeout = 4.0
    ranks = dist_tools.launch("die", 3, tmp_path, {"n": 6, "steps": 50, "victim": 1, "at": 5, "how": how},
                              timeout=60, dist_timeout=timeout, wait_for={0, 2})
    for r in (ranks[0], ranks[2]):
        assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
        assert "FMTTDistributedError" in r.error and "gather at step 5" in r.error, r.error
        assert "Another rank most likely crashed or hung" in r.error
        assert r.seconds < 45  # process start (~5 s on a busy machine) + the 4 s collective timeout
    if how == "die":
        assert ranks[1].returncode == 17
    else:
        assert ranks[1].returncode is None  # still asleep: killed by the launcher once the others ended
    assert math.isfinite(ranks[0].seconds)

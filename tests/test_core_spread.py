"""The core's SPREAD hook (what the ComfyUI pack's MultiGPU support plugs into) and split_rows.

A spread evaluates row blocks of the population with other copies of the models, on other threads, and hands the
outputs back in particle order; the sampler must then give the one-worker run bit for bit. Tested here with
worker threads on the CPU and a closed-form problem, so it runs without ComfyUI (the real MultiGPU path is tested
in tests/integration/test_multigpu.py).
"""
from __future__ import annotations

import itertools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fmtt_core as fc
from fmtt_core.particles import SPREAD, ParticleLoop, split_rows
from fmtt_testing import dist_worker as worker

# ------------------------------------------------------------------ split_rows


@pytest.mark.parametrize("n,chunk,speeds", itertools.product(
    [1, 2, 5, 9, 16, 33], [None, 1, 2, 3, 8, 64], [[1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 3.0],
                                                   [1.5, 1.0, 1.0, 0.25]]))
def test_split_rows_gives_whole_chunks_in_proportion_to_speed(n, chunk, speeds):
    rows = split_rows(n, chunk, speeds)
    assert len(rows) == len(speeds) and sum(rows) == n and min(rows) >= 0
    size = min(chunk or 1, n)
    chunks = math.ceil(n / size)
    # Every block starts on a one-worker chunk boundary, so each worker runs the batches one worker would run.
    starts = [sum(rows[:i]) for i in range(len(rows))]
    assert all(s % size == 0 for s, r in zip(starts, rows) if r)
    counts = [math.ceil(r / size) for r in rows]
    assert sum(counts) == chunks
    for c, s in zip(counts, speeds):  # largest-remainder rounding: within one chunk of the exact share
        assert abs(c - chunks * s / sum(speeds)) < 1, (rows, counts)
        if s == 0:
            assert c == 0


def test_split_rows_gives_extra_chunks_to_the_largest_remainders_and_keeps_ties_in_order():
    # 3 chunks over speeds 1:1 -> shares 1.5, 1.5: the tie goes to the first worker, like ComfyUI's round_preserved.
    assert split_rows(6, 2, [1.0, 1.0]) == [4, 2]
    # 4 chunks over 1:2 -> shares 1.33, 2.67: the second worker has the larger remainder.
    assert split_rows(4, 1, [1.0, 2.0]) == [1, 3]


@pytest.mark.parametrize("n,speeds", [(0, [1.0]), (3, []), (3, [0.0, 0.0]), (3, [1.0, -1.0]), (3, [math.nan])])
def test_split_rows_rejects_what_cannot_be_split(n, speeds):
    with pytest.raises(fc.FMTTInputError, match="cannot split"):
        split_rows(n, 2, speeds)


# ------------------------------------------------------------------ the SPREAD hook


class ThreadSpread:
    """A spread over worker threads, each with its own copies of the models (counting their rows)."""

    def __init__(self, speeds, models):
        self.speeds, self.models = speeds, models  # models(i) -> (denoiser, reward, lookahead) of worker i
        self.rows, self.threads = [0] * len(speeds), [set() for _ in speeds]
        self.pool = ThreadPoolExecutor(max_workers=len(speeds))

    def __call__(self, loop, x, fn):
        rows = split_rows(x.shape[0], loop.chunk_size, self.speeds)
        blocks = x.split(rows)
        loops = [loop] + [ParticleLoop(*self.models(i)[:2], None, self.models(i)[2], loop.chunk_size, loop.grad_clip)
                          for i in range(1, len(rows))]

        def work(i):
            self.rows[i] += rows[i]
            self.threads[i].add(threading.current_thread().name)
            return fn(loops[i], blocks[i])

        futures = {i: self.pool.submit(work, i) for i in range(1, len(rows)) if rows[i]}
        outputs = {0: work(0)} if rows[0] else {}
        outputs.update({i: f.result() for i, f in futures.items()})
        for i in range(1, len(rows)):
            for key, value in vars(loops[i].nfe).items():
                loop.nfe.add(key, value)
        parts = [outputs[i] for i in sorted(outputs)]
        return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def _problem(args):
    gm, x, times, reward, cfg, lookahead = worker.sampler_problem(args)
    calls = {}

    def counted(i, f, what):
        def call(*a):
            calls[(i, what)] = calls.get((i, what), 0) + a[0].shape[0]
            return f(*a)
        return call

    def models(i):
        return (counted(i, gm.denoiser, "denoiser"), counted(i, reward, "reward"),
                fc.FlowMapLookahead(counted(i, lambda z, s, t: gm.flow_map(z, s, t, 8), "flow map")))

    return gm, x, times, cfg, models, calls


def _run(args, spread_speeds=None):
    gm, x, times, cfg, models, calls = _problem(args)
    denoiser, reward, lookahead = models(0)
    spread = ThreadSpread(spread_speeds, models) if spread_speeds else None
    token = SPREAD.set(spread)
    try:
        res = fc.fmtt_sample(denoiser, x, times, reward=reward, lookahead=lookahead, config=cfg)
    finally:
        SPREAD.reset(token)
    return worker.result_dict(res), spread, calls


@pytest.mark.parametrize("args,speeds", [
    (dict(mode="exact", n=9, chunk=2), [1.0, 1.0]),
    (dict(mode="exact", n=10, chunk=None, holes=True), [1.0, 2.0, 1.0]),
    (dict(mode="search", n=11, steps=12, chunk=3), [1.0, 1.0, 1.0]),
    (dict(mode="zero_order", n=7, chunk=1, resampling="stratified"), [2.0, 1.0]),
    (dict(mode="exact", n=8, chunk=2, probe=3), [1.0, 1.0]),  # the defect probe's look-ahead rewards are spread
])
@pytest.mark.filterwarnings("ignore:FMTT.*non-finite reward:RuntimeWarning")
def test_a_spread_run_equals_the_one_worker_run(args, speeds):
    one, _, _ = _run(args)
    spread_result, spread, calls = _run(args, speeds)
    for key, ref in one.items():
        got = spread_result[key]
        assert got.shape == ref.shape and bool(((got == ref) | (got.isnan() & ref.isnan())).all()), key
    # Every worker computed its blocks, with its own models, on its own thread.
    assert all(r > 0 for r in spread.rows), spread.rows
    main_thread = spread.threads[0]
    for i in range(1, len(speeds)):
        assert calls.get((i, "flow map"), 0) > 0 and calls.get((i, "reward"), 0) > 0, calls
        assert not spread.threads[i] & main_thread, spread.threads
    # All denoiser calls went through the spread, and the NFE counters (compared above) add up the workers'.
    assert sum(v for (i, what), v in calls.items() if what == "denoiser") == int(one["nfe"][0])

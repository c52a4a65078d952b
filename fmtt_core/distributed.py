"""A particle population sharded over torch.distributed ranks: the few collectives SMC needs.

Layout: N particles in contiguous blocks of global slots; rank r holds slots [start_r, stop_r), the
first N mod W ranks one particle more (uneven shards are fine; every rank holds at least one).

Everything population-wide (normalising log-weights, ESS, resampling, top-k selection, the final
pick) is a function of N scalars per step. Gathering those N scalars on every rank costs less than
sending one particle, and applying the single-process function of `fmtt_core.smc` to the gathered
vector gives, bit for bit, the result of one process on every rank: the same ancestors, the same
generator state afterwards, so the next noise draw agrees too. Only the particles (and per-particle
state) stay sharded; they move only when resampling gives a slot an ancestor held on another rank,
and then each ancestor crosses to a given rank once, however many copies that rank keeps.

Every collective goes through `_collective`, which turns a dead or hung peer (connection reset, or
the process group's timeout) into an `FMTTDistributedError` that names the rank and the operation.
Works with gloo (CPU tensors) and NCCL (CUDA tensors): buffers travel on the backend's device.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import FMTTInputError
from .nfe import NFE
from .population import Population

DEFAULT_TIMEOUT_S = 120.0


class FMTTDistributedError(RuntimeError):
    """A collective failed: another rank crashed, hung past the timeout, or runs a different job."""


# ---------------------------------------------------------------------------------------------------
# process group

def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...); returns None when the process was not started by a launcher (one process).

    backend: None picks NCCL when this rank has a GPU, gloo otherwise. `timeout_s` bounds every
    collective: a rank that hangs makes the others fail after that long instead of waiting forever.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    if dist.is_initialized():
        return dist.group.WORLD
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        # Without this NCCL would wait forever on a dead peer; with it, the timeout raises.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def leave(exit_code: int = 0):
    """End a torchrun process cleanly and exit: every rank meets at a barrier (so no peer is still
    talking), the group is destroyed, and the process ends without Python's interpreter finalization.

    Why not a plain return: gloo's worker threads can still be torn down during finalization, and then
    the process aborts (SIGABRT, "terminate called without an active exception") after all its work
    was done and written; torchrun would report a finished job as failed. Output is flushed first.
    """
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def comm_device(group=None) -> torch.device:
    """Where a backend's buffers must live: CUDA for NCCL, the CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# sharding

@dataclass(frozen=True)
class Shards:
    """Contiguous block sharding of N global particle slots over `world` ranks."""

    n: int
    world: int
    rank: int

    def __post_init__(self):
        if self.n < self.world:
            raise FMTTInputError(f"{self.n} particles cannot be spread over {self.world} ranks: each rank needs "
                                 f"at least one. Use at least {self.world} particles or fewer processes.")
        if not 0 <= self.rank < self.world:
            raise FMTTInputError(f"rank {self.rank} is outside a world of {self.world}.")

    @property
    def sizes(self) -> list[int]:
        base, extra = divmod(self.n, self.world)
        return [base + (r < extra) for r in range(self.world)]

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for s in self.sizes:
            out.append(acc)
            acc += s
        return out

    @property
    def start(self) -> int:
        return self.offsets[self.rank]

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]

    def owner(self, slots: torch.Tensor) -> torch.Tensor:
        """Rank holding each global slot."""
        bounds = torch.tensor(self.offsets[1:], dtype=torch.int64)
        return torch.bucketize(slots.cpu().long(), bounds, right=True)

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a population-wide tensor."""
        return full[self.start:self.stop]


def shards_for(n: int, group=None) -> Shards:
    return Shards(n, dist.get_world_size(group), dist.get_rank(group))


# ---------------------------------------------------------------------------------------------------
# timing and error handling

@dataclass
class CommStats:
    """Seconds spent inside collectives (including waiting for slower ranks) and bytes sent."""

    seconds: float = 0.0
    bytes_sent: int = 0
    rows_received: int = 0   # particle rows that came from another rank (resampling)
    calls: dict = field(default_factory=dict)


@contextmanager
def _collective(what: str, group, stats: CommStats | None):
    start = time.perf_counter()
    try:
        yield
    except (RuntimeError, dist.DistError) as e:  # DistBackendError, gloo/NCCL timeouts, reset peers
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise FMTTDistributedError(
            f"rank {rank} of {world}: the collective '{what}' failed ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no message'}). Another rank most likely "
            "crashed or hung (see its own output); the run stops here instead of waiting. The wait is bounded "
            "by the process group's timeout (init_process_group(timeout=...), `fmtt demo --dist-timeout`)."
        ) from e
    finally:
        if stats is not None:
            stats.seconds += time.perf_counter() - start
            stats.calls[what] = stats.calls.get(what, 0) + 1


def _global_rank(group, r: int) -> int:
    return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)


# ---------------------------------------------------------------------------------------------------
# collectives over per-particle values

def gather(local: torch.Tensor, sh: Shards, group=None, what: str = "gather",
           stats: CommStats | None = None) -> torch.Tensor:
    """The population-wide tensor [N, ...] from every rank's shard [size_r, ...], in slot order, on
    every rank (on `local`'s device). Shards are padded to the largest so all_gather sees equal sizes."""
    if local.shape[0] != sh.size:
        raise FMTTInputError(f"rank {sh.rank} holds {local.shape[0]} rows but its shard has {sh.size}.")
    dev = comm_device(group)
    width = max(sh.sizes)
    buf = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[:sh.size] = local.to(dev)
    parts = [torch.empty_like(buf) for _ in range(sh.world)]
    with _collective(what, group, stats):
        dist.all_gather(parts, buf, group=group)
    if stats is not None:
        stats.bytes_sent += buf.numel() * buf.element_size()
    return torch.cat([p[:s] for p, s in zip(parts, sh.sizes)]).to(local.device)


def gather_varying(local: torch.Tensor, sh: Shards, group=None, what: str = "gather",
                   stats: CommStats | None = None) -> torch.Tensor:
    """Like `gather`, for any subset of each shard's rows (at most its size): the row count travels in
    the same message, as float64 (which holds float16/32/64, bool and integers below 2^53 exactly)."""
    if local.shape[0] > sh.size:
        raise FMTTInputError(f"rank {sh.rank} sends {local.shape[0]} rows, more than its shard's {sh.size}.")
    dev = comm_device(group)
    row = math.prod(local.shape[1:])
    flat = local.detach().reshape(local.shape[0], row).to(dev, torch.float64)
    buf = torch.zeros(1 + max(sh.sizes) * row, dtype=torch.float64, device=dev)
    buf[0] = local.shape[0]
    buf[1:1 + flat.numel()] = flat.reshape(-1)
    parts = [torch.empty_like(buf) for _ in range(sh.world)]
    with _collective(what, group, stats):
        dist.all_gather(parts, buf, group=group)
    if stats is not None:
        stats.bytes_sent += buf.numel() * buf.element_size()
    rows = [p[1:1 + int(p[0]) * row] for p in parts]
    return torch.cat(rows).reshape(-1, *local.shape[1:]).to(local.device, local.dtype)


def check_agree(value, sh: Shards, group=None, what: str = "settings", stats: CommStats | None = None) -> None:
    """Raise on every rank unless all ranks pass the same `value` (its repr is fingerprinted): catches
    ranks started with different seeds, particle counts or settings, which would otherwise run on
    and produce a population that no single process would."""
    digest = hashlib.sha256(repr(value).encode()).digest()
    fp = torch.tensor([int.from_bytes(digest[:7], "little")], dtype=torch.int64)
    seen = gather(fp.expand(sh.size).clone(), sh, group, f"check {what}", stats)
    if not (seen == seen[0]).all():
        ranks = sorted({r for r, s in zip(range(sh.world), sh.offsets) if seen[s] != seen[0]})
        raise FMTTDistributedError(f"ranks disagree on {what}: rank(s) {ranks} differ from rank 0. Every rank "
                                   "must run the same call with the same seed, particle count and settings.")


def global_log_sum_exp(local_log_w: torch.Tensor, group=None, stats: CommStats | None = None) -> torch.Tensor:
    """logsumexp over all ranks' log-weights with two scalar all-reduces (max, then sum of exp):
    O(1) traffic for any N. Equal to one process's up to round-off (the sum runs in another order);
    the sampler uses the gathered vector instead, which is exact."""
    dev = comm_device(group)
    lw = local_log_w.detach().double().to(dev)
    m = lw.max() if lw.numel() else torch.tensor(-torch.inf, dtype=torch.float64, device=dev)
    m = m.reshape(1).clone()
    with _collective("log-sum-exp max", group, stats):
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    if not torch.isfinite(m).all():
        return m[0].cpu()
    s = torch.exp(lw - m).sum().reshape(1)
    with _collective("log-sum-exp sum", group, stats):
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return (m + s.log())[0].cpu()


# ---------------------------------------------------------------------------------------------------
# moving resampled particles

@dataclass(frozen=True)
class MovePlan:
    """Who sends which old particles where, from the global ancestor vector (known on every rank).

    sends[dst]: this rank's local rows that rank dst needs (each once); recvs[src]: global slots
    this rank receives from src, in the order src sends them; take: for each of this rank's new
    slots, its row in the pool [local rows, then the received blocks in rank order].
    """

    sends: dict
    recvs: dict
    take: torch.Tensor

    @property
    def moved(self) -> int:
        return sum(v.numel() for v in self.recvs.values())


def plan_moves(ancestors: torch.Tensor, sh: Shards) -> MovePlan:
    anc = ancestors.cpu().long()
    if anc.shape != (sh.n,):
        raise FMTTInputError(f"ancestors must be a vector of the {sh.n} global slots, got {tuple(anc.shape)}.")
    owner = sh.owner(anc)
    dest = sh.owner(torch.arange(sh.n))
    sends = {}
    for dst in range(sh.world):
        if dst != sh.rank:
            need = torch.unique(anc[(dest == dst) & (owner == sh.rank)])  # sorted, each once
            if need.numel():
                sends[dst] = need - sh.start
    mine, mine_owner = sh.local(anc), sh.local(owner)
    recvs, take = {}, mine - sh.start
    base = sh.size
    for src in range(sh.world):
        if src != sh.rank:
            need = torch.unique(mine[mine_owner == src])
            if need.numel():
                recvs[src] = need
                hit = mine_owner == src
                take = torch.where(hit, base + torch.searchsorted(need, mine), take)
                base += need.numel()
    return MovePlan(sends, recvs, take)


def move_particles(tensors: Sequence[torch.Tensor], plan: MovePlan, sh: Shards, group=None,
                   stats: CommStats | None = None) -> list[torch.Tensor]:
    """Apply a resampling to sharded per-particle tensors: returns this rank's new shards.

    Point-to-point (isend / irecv) only between ranks that exchange something; the rows a rank
    already holds are copied locally. Every rank passes the same tensors in the same order.
    """
    dev = comm_device(group)
    ops, inbox, bytes_sent = [], [], 0
    for t in tensors:
        if t.shape[0] != sh.size:
            raise FMTTInputError(f"rank {sh.rank}: a per-particle tensor has {t.shape[0]} rows, its shard {sh.size}.")
        for dst, rows in plan.sends.items():
            buf = t[rows.to(t.device)].to(dev).contiguous()
            bytes_sent += buf.numel() * buf.element_size()
            ops.append(dist.P2POp(dist.isend, buf, _global_rank(group, dst), group))
        bufs = {}
        for src, slots in plan.recvs.items():
            bufs[src] = torch.empty((slots.numel(), *t.shape[1:]), dtype=t.dtype, device=dev)
            ops.append(dist.P2POp(dist.irecv, bufs[src], _global_rank(group, src), group))
        inbox.append(bufs)
    if ops:
        with _collective("move resampled particles", group, stats):
            for req in dist.batch_isend_irecv(ops):
                req.wait()
    if stats is not None:
        stats.bytes_sent += bytes_sent
        stats.rows_received += plan.moved * len(tensors)
    out = []
    for t, bufs in zip(tensors, inbox):
        pool = torch.cat([t] + [bufs[src].to(t.device) for src in sorted(bufs)]) if bufs else t
        out.append(pool[plan.take.to(t.device)])
    return out


# ---------------------------------------------------------------------------------------------------
# noise that does not depend on the sharding

def shard_of_full_draw(generator: torch.Generator, n: int, tail: Sequence[int], sh: Shards,
                       dtype=torch.float32) -> torch.Tensor:
    """This rank's rows of `torch.randn((n, *tail), generator=generator)`: every rank draws the whole
    population's noise from the shared generator and keeps its rows. Costs the RNG work of N rows per
    rank (small next to a model call) and keeps every rank's generator in lock-step with one process's."""
    return sh.local(torch.randn((n, *tail), generator=generator, dtype=dtype))


# ---------------------------------------------------------------------------------------------------
# the population object of the samplers, sharded

class DistributedPopulation(Population):
    """`Population` with this rank's shard of the particles: pass it as `population=` to fmtt_sample or
    a baseline, with x_init holding this rank's rows (`pop.local(x_full)`, or built from `pop.start`).

    Randomness is already sharding-free in `Population` (noise from (seed, step, global index),
    resampling uniforms from (seed, step)). Per-particle scalars (log-weights, rewards) are gathered,
    so normalisation, ESS, ancestors and top-k are those of one process, bit for bit; particles move
    only when resampling sends them. Every rank gets the whole final population (`gather`).
    """

    def __init__(self, size: int, seed: int = 0, group=None, check: bool = True):
        super().__init__(size, seed)
        self.group = group
        self.shards = shards_for(self.size, group)
        self.start, self.count = self.shards.start, self.shards.size
        self.stats = CommStats()
        self._ancestors = None  # (local rows, whole vector, plan) of the last resampling
        if check:
            check_agree((self.size, self.seed), self.shards, group, "the particle count and seed", self.stats)

    @property
    def rank(self) -> int:
        return self.shards.rank

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-population tensor (e.g. x_init)."""
        return self.shards.local(full)

    def _all(self, t: torch.Tensor, what: str) -> torch.Tensor:
        return gather(t, self.shards, self.group, what, self.stats)

    # --- reductions: per-particle scalars are gathered and reduced in slot order (one process's sum);
    # wider tensors are all-reduced (equal up to round-off).
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1:  # any subset of the shard's rows (e.g. the defect probe's), in slot order
            return gather_varying(t, self.shards, self.group, "sum", self.stats).sum(0)
        out = t.sum(0).to(comm_device(self.group)).clone()
        with _collective("sum", self.group, self.stats):
            dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        # The rows may be any subset of the shard (e.g. its finite rewards), possibly none.
        dev = comm_device(self.group)
        m = t.max(0).values if t.shape[0] else torch.full(t.shape[1:], -torch.inf, dtype=t.dtype)
        m = m.to(dev).clone()
        with _collective("max", self.group, self.stats):
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m.to(t.device)

    # --- weights
    def normalize(self, log_w: torch.Tensor) -> torch.Tensor:
        return self.local(super().normalize(self._all(log_w, "normalise log-weights")))

    def ess(self, log_w: torch.Tensor) -> float:
        return super().ess(self._all(log_w, "effective sample size"))

    # --- moving particles
    def ancestors(self, log_w: torch.Tensor, scheme: str, step: int) -> torch.Tensor:
        whole = super().ancestors(self._all(log_w, "resampling weights"), scheme, step)
        return self._remember(whole)

    def select_top(self, r: torch.Tensor, keep: int) -> torch.Tensor:
        return self._remember(super().select_top(self._all(r, "search selection rewards"), keep))

    def _remember(self, whole: torch.Tensor) -> torch.Tensor:
        mine = self.local(whole)
        self._ancestors = (mine, whole, plan_moves(whole, self.shards))
        return mine

    def take(self, t: torch.Tensor | None, ancestors: torch.Tensor) -> torch.Tensor | None:
        if t is None:
            return None
        if self._ancestors is not None and ancestors is self._ancestors[0]:
            plan = self._ancestors[2]
        else:  # ancestors computed elsewhere: every rank needs the whole vector to know what to send
            plan = plan_moves(self._all(ancestors.long(), "ancestors"), self.shards)
        return move_particles([t], plan, self.shards, self.group, self.stats)[0]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return self._all(t, "collect the final population")


def total_nfe(nfe: NFE, group=None, stats: CommStats | None = None) -> NFE:
    """Every rank's evaluation counters summed: each rank counts the model calls of its own shard,
    the sum is what one process holding all the particles would have counted."""
    counts = torch.tensor([getattr(nfe, k) for k in NFE.__dataclass_fields__], dtype=torch.int64)
    counts = counts.to(comm_device(group))
    with _collective("sum the NFE counters", group, stats):
        dist.all_reduce(counts, group=group)
    return NFE(*[int(c) for c in counts.cpu()])


def sharded(sampler, group=None):
    """`sampler` (fmtt_sample or a baseline) with its population spread over the group's ranks.

    Every rank calls the result with the same arguments, x_init being the WHOLE population; each rank
    then evaluates only its shard, and every rank returns the one-process result (NFE summed over
    the ranks). The population's seed is the config's, as in one process.
    """
    def run(denoiser, x_init, times, *, config=None, **kw):
        pop = DistributedPopulation(x_init.shape[0], config.seed if config is not None else 0, group)
        res = sampler(denoiser, pop.local(x_init), times, config=config, population=pop, **kw)
        res.nfe = total_nfe(res.nfe, group, pop.stats)
        return res
    return run

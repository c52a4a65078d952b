"""How many particles to push through the networks at once, from what one particle costs and what is free.

A sampling step keeps the whole population's state (particles, denoised predictions, gradients, noise) and
runs the networks on one chunk of particles at a time; with the reward gradient, a chunk's forward pass keeps
its activations for the backward pass. So

    memory = particles * state_per_particle + chunk * pass_per_particle  <=  budget,

and the largest chunk that fits is chunk = (budget - particles * state_per_particle) // pass_per_particle.
A run in which not even one particle's pass fits is refused before it starts, with the setting to lower.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import FMTTInputError

MiB = 1024 * 1024
PAGE = 4096  # the smallest block an allocator maps (CPU pages; CUDA's caching allocator rounds to 512 bytes)


class FMTTMemoryError(FMTTInputError):
    """The requested run cannot fit in the memory that is free."""


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MiB:,.0f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    chunk_size: int            # particles per forward / backward pass
    particles: int
    pass_per_particle: int     # bytes of one particle's pass through the networks (with backward if any)
    state_per_particle: int    # bytes of one particle's state between passes
    budget: int                # bytes the run may use
    automatic: bool            # chosen from the budget (True) or given by the user

    @property
    def peak(self) -> int:
        return self.particles * self.state_per_particle + self.chunk_size * self.pass_per_particle

    def __str__(self) -> str:
        how = "automatic" if self.automatic else "as set"
        return (f"chunk size {self.chunk_size} of {self.particles} particles ({how}); estimated "
                f"{mib(self.pass_per_particle)} per particle pass, {mib(self.peak)} peak of {mib(self.budget)} free")


def plan_chunks(particles: int, pass_per_particle: float, state_per_particle: float, budget: float,
                chunk_size: int | None = None, lower: str = "") -> MemoryPlan:
    """The chunk size for a run (chunk_size None: the largest that fits), or FMTTMemoryError naming what to lower.

    `lower` is appended to the messages: what else makes one particle cheaper in the caller's terms.
    """
    if particles < 1:
        raise FMTTInputError(f"particles must be >= 1, got {particles}.")
    pass_b, state_b, budget = max(int(pass_per_particle), 1), max(int(state_per_particle), 0), int(budget)
    state = particles * state_b
    room = budget - state
    if room < pass_b:
        most = max(0, (budget - pass_b) // max(state_b, 1))
        if most >= 1:
            fix = f"lower particles to at most {most}"
        else:
            fix = "lower the image size" + (f", {lower}" if lower else "")
        raise FMTTMemoryError(
            f"not enough memory: {particles} particles need about {mib(state)} for their state plus "
            f"{mib(pass_b)} for one particle's pass through the networks, but only {mib(budget)} is free. "
            f"To fit: {fix}, or free memory (close other programs, unload other models).")
    fit = room // pass_b
    if chunk_size is None:
        return MemoryPlan(int(min(particles, fit)), particles, pass_b, state_b, budget, True)
    if chunk_size < 1:
        raise FMTTInputError(f"chunk_size must be >= 1 (or None for automatic), got {chunk_size}.")
    chunk = min(chunk_size, particles)
    if chunk > fit:
        raise FMTTMemoryError(
            f"not enough memory for chunk_size {chunk_size}: a pass of {chunk} particles needs about "
            f"{mib(chunk * pass_b)} besides the population's {mib(state)}, but only {mib(budget)} is free. "
            f"Lower chunk_size to at most {fit}, or let it be chosen automatically (chunk_size 0 in the nodes).")
    return MemoryPlan(chunk, particles, pass_b, state_b, budget, False)


@dataclass(frozen=True)
class HeldCalls:
    """How one particle's backward pass holds a look-ahead's network calls (fmtt_core.lookahead).

    kept        calls whose activations stay from the forward pass into the backward pass
    recomputed  1 when the backward pass recomputes checkpointed calls (one at a time; by then the decoder's and
                the reward's backward passes are done and their activations freed)
    inputs      latent-sized tensors checkpointed calls keep instead of their activations
    """
    kept: int
    recomputed: int
    inputs: int


def held_calls(calls: int, reuses_denoised: bool, checkpoint: bool) -> HeldCalls:
    """HeldCalls of a look-ahead that makes `calls` network calls per particle, counting the sampler's D(x, t) when
    it builds on it (the denoiser look-ahead is D; the ODE look-ahead's first step reuses D, whose graph the sampler
    keeps). With checkpoint on, every other call keeps only its inputs: at most 3 latent-sized tensors with its
    solver step (x, the next x, the prediction)."""
    if not checkpoint:
        return HeldCalls(calls, 0, 0)
    reused = 1 if reuses_denoised else 0
    own = calls - reused
    return HeldCalls(reused, 1 if own > 0 else 0, 3 * calls if own > 0 else 0)


def particle_pass(call: int, held: HeldCalls, latent: int, decode: int, reward: int) -> int:
    """Peak bytes of one particle's pass with the reward gradient, from the measured bytes of one network call, the
    decoder and the reward: at the start of the backward pass the kept calls, the checkpointed inputs, the decoder
    and the reward are all held; later, while a checkpointed call is recomputed, the decoder and the reward are done.
    """
    return held.kept * call + held.inputs * latent + max(decode + reward, held.recomputed * call)


@dataclass(frozen=True)
class PassMemory:
    """What one forward + backward pass holds above the weights, read off autograd while it runs.

    The forward pass keeps every tensor saved for the backward pass (`saved`, counted as the copies the pack's
    autograd keeps: nodes.autograd copies saved activations, because DiT blocks update them in place) and its
    outputs; the inputs' gradients stay after it (`kept`). Beside those, the op at work holds at most
    OP_TENSORS tensors no larger than the largest saved activation (`largest`): in the forward pass its input,
    its output and the output's saved copy; in the backward pass the gradient flowing in, the one flowing out and
    the op's temporary. The weights are resident before the pass and are not counted (copies of them made for an
    op, casts to the compute dtype, are counted where they are saved). Every tensor takes whole pages.
    """
    saved: int
    kept: int
    largest: int

    OP_TENSORS = 4
    # The graph's own bookkeeping (autograd nodes, the interpreter's objects, small blocks the allocator cannot
    # hand back): measured at 0.2 - 0.4 MiB above the tensors for the pack's tiny DiTs on the CPU (bench/).
    BOOKKEEPING = MiB

    @property
    def peak(self) -> int:
        return self.saved + self.kept + self.OP_TENSORS * self.largest + self.BOOKKEEPING


def is_weight(t) -> bool:
    """A model weight (nn.Parameter) or a view of one (a linear layer saves its weight transposed)."""
    import torch
    return isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)


def measure_pass(fn, *inputs, blocks=()) -> PassMemory:
    """Run fn(*inputs) forward and backward once (the inputs that require a gradient get one) and return what
    the pass held: every tensor autograd saves, counted at its own size and saved as a copy, the way the pack runs
    models with gradients. Weights (and views of them) are saved by reference there and here, and not counted.

    `blocks` (torch modules called by fn, one after another) are counted as block checkpointing runs them: each
    keeps only its inputs, and the backward pass recomputes one block at a time, holding that block's saves.
    """
    import torch

    saved, largest = 0, 0
    block_saves, block_inputs, since = [], 0, []

    def pack(t: torch.Tensor):
        nonlocal saved, largest
        if is_weight(t):
            return t
        size = t.numel() * t.element_size()
        saved += -(-size // PAGE) * PAGE  # the allocator hands out whole pages
        if t.requires_grad:  # an activation; a saved constant (a weight cast for the op, a mask) has no gradient
            largest = max(largest, size)
        return t.clone()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))

    def enter(_module, args, kwargs):
        nonlocal block_inputs
        block_inputs += nbytes(list(args) + list(kwargs.values()))
        since.append(saved)

    def leave(_module, _args, _kwargs, _out):
        block_saves.append(saved - since.pop())

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(enter, with_kwargs=True),
                                         b.register_forward_hook(leave, with_kwargs=True))]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(*inputs)
    finally:
        for h in hooks:
            h.remove()
    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o) and o.requires_grad]
    if outs:
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    kept = nbytes(outs) + nbytes([t for t in inputs if torch.is_tensor(t) and t.requires_grad])
    largest = max([largest] + [nbytes([o]) for o in outs])
    if block_saves:  # block inputs instead of block activations, plus the one block being recomputed
        saved = saved - sum(block_saves) + block_inputs + max(block_saves)
    return PassMemory(saved, kept, largest)

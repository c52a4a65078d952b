"""The memory estimate of one particle's pass (fmtt_core.memory.measure_pass) against what a real torch model's
forward + backward pass holds: an upper bound within 2x of the peak measured in a fresh process (the
bench/bench_memory_estimate.py measurement), and it scales as activations must with the batch and the image size."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fmtt_core.memory import is_weight, measure_pass

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memory_estimate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_memory_estimate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def estimate(bench, side=64, batch=1, blocks=False):
    net, (x,) = bench.convnet("cpu", side, batch)
    return measure_pass(net, x.requires_grad_(), blocks=[net.mid, net.attn] if blocks else ())


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the peak resident set is read from Linux /proc")
def test_estimate_is_an_upper_bound_within_2x_of_the_measured_peak(bench):
    out = subprocess.run([sys.executable, str(BENCH), "--child", "torch_convnet", "measure"], capture_output=True,
                         text=True, check=True, env={**bench.CHILD_ENV, "OMP_NUM_THREADS": "1"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    peak = estimate(bench).peak
    assert measured > 8 * 2**20, measured  # the pass really holds tens of MiB: the comparison means something
    assert measured <= peak <= 2 * measured, (peak / 2**20, measured / 2**20)


def test_estimate_scales_with_particles_and_image_size(bench):
    one, four = estimate(bench), estimate(bench, batch=4)
    assert four.saved == pytest.approx(4 * one.saved, rel=0.01) and four.largest == 4 * one.largest
    # 4x the pixels, 4x the activations: torch's fused attention keeps its output and log-sum-exp, never the
    # tokens x tokens matrix
    double = estimate(bench, side=128)
    assert double.saved == pytest.approx(4 * one.saved, rel=0.01) and double.kept == 4 * one.kept


def test_block_checkpointing_keeps_inputs_and_one_block():
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True).eval().requires_grad_(False)
              for _ in range(4)]
    net = torch.nn.Sequential(*layers)
    x = torch.randn(1, 256, 64, requires_grad=True)
    full, blocks = measure_pass(net, x), measure_pass(net, x, blocks=layers)
    one_block = measure_pass(layers[0], x).saved
    assert full.saved == pytest.approx(4 * one_block, rel=0.01)
    # four blocks' inputs and one block's saves, instead of four blocks' saves
    assert blocks.saved == pytest.approx(4 * x.numel() * 4 + one_block, rel=0.01)
    assert blocks.kept == full.kept and blocks.saved < full.saved / 2


def test_weights_are_not_counted_nor_copied():
    lin = torch.nn.Linear(256, 256).requires_grad_(False)
    x = torch.randn(1, 256, requires_grad=True)
    got = measure_pass(lambda x: torch.tanh(lin(x)), x)
    assert got.saved == 4096  # tanh's output (1 KiB, one page): linear keeps a view of its weight, not counted
    assert is_weight(lin.weight.t()) and not is_weight(x)


@pytest.mark.parametrize("lookahead, calls, reuses", [
    ("denoiser", 1, True), ("ode", 3, True), ("heun", 5, True), ("flow_map", 2, False)])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_held_calls_is_what_autograd_holds_for_each_lookahead(bench, lookahead, calls, reuses, checkpoint):
    """One particle's chain as the sampler runs it (D with its graph when the look-ahead builds on it, then the
    look-ahead), on a real conv net: autograd keeps the saves of held_calls' kept calls (with checkpoint on only the
    reused D's: the one call recomputed at a time in the backward pass is torch.utils.checkpoint's, unseen by the
    saved-tensor hooks) plus at most the checkpointed inputs it counts."""
    from fmtt_core.lookahead import DenoiserLookahead, FlowMapLookahead, ODELookahead
    from fmtt_core.memory import held_calls

    net, (x,) = bench.convnet("cpu", 32)
    denoiser = lambda x, t: net(x)  # noqa: E731
    look = {"denoiser": lambda: DenoiserLookahead(denoiser),
            "ode": lambda: ODELookahead(denoiser, steps=3, checkpoint=checkpoint),
            "heun": lambda: ODELookahead(denoiser, steps=3, solver="heun", checkpoint=checkpoint),
            "flow_map": lambda: FlowMapLookahead(lambda x, s, t: net(x), jumps=2, checkpoint=checkpoint)}[lookahead]()
    t = torch.full((1,), 0.3)

    def chain(x):
        with torch.set_grad_enabled(look.uses_denoised):
            d = denoiser(x, t)
        return look(x, t, denoised=d)

    one = measure_pass(lambda x: net(x), x.clone().requires_grad_()).saved
    got = measure_pass(chain, x.clone().requires_grad_()).saved
    held = held_calls(calls, reuses, checkpoint)
    pages = -(-x.numel() * x.element_size() // 4096) * 4096
    assert held.kept * one * 0.97 <= got <= held.kept * one * 1.03 + held.inputs * pages, (got, one, held)
    own = calls - (1 if reuses else 0)
    assert held.recomputed == (1 if checkpoint and own else 0) and (checkpoint or held.inputs == 0)

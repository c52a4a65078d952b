"""The pair task: constraints as rewards, the shipped pair models, and `fmtt demo --task pairs`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fmtt_core import base_sample, time_grid
from fmtt_demo.cli import main
from fmtt_demo.data import split_digits
from fmtt_demo.methods import METHODS, Setup, make_x_init
from fmtt_demo.pairs.constraints import PRESETS, PairConstraintReward, constraint_table, judge_success
from fmtt_demo.pairs.data import CANVAS_SHAPE, halves, random_pairs
from fmtt_demo.pairs.models import PAIR_WEIGHTS_DIR, load_pair_models
from fmtt_demo.pairs.task import PAIR_METHODS

# The pairs each preset admits, listed by hand (a = left digit, b = right digit).
EXPECTED = {
    "sum10": {(a, 10 - a) for a in range(1, 10)},
    "same": {(a, a) for a in range(10)},
    "pair38": {(3, 8)},
    "left_larger5": {(a, b) for a in range(10) for b in range(10) if a >= b + 5},
}


@pytest.fixture(scope="module")
def models():
    return load_pair_models()


@pytest.fixture(scope="module")
def test_pairs():
    return random_pairs(*split_digits(0)["test"], 2000, torch.Generator().manual_seed(11))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_admit_exactly_their_pairs(name):
    table = constraint_table(name)
    assert {(a, b) for a in range(10) for b in range(10) if table[a, b]} == EXPECTED[name]
    # The base rates for uniform, independent digits: 9%, 10%, 1%, 15%.
    assert PairConstraintReward(lambda x: torch.zeros(x.shape[0], 10), name).base_rate() == len(EXPECTED[name]) / 100


def test_expressions_are_interpreted_not_executed():
    assert constraint_table("a % 2 == 0 and not b % 2 == 0").sum() == 25
    assert constraint_table("1 <= a - b <= 2").sum() == 17
    for bad, hint in (("__import__('os')", "not understood"), ("a +", "not understood"), ("c == 1", "not understood"),
                      ("a > 9", "holds for no pair")):
        with pytest.raises(ValueError, match=hint):
            constraint_table(bad)


def test_reward_is_the_log_probability_of_the_constraint(models, test_pairs):
    """exp(r) = sum over admitted (a, b) of p(a | left) p(b | right), by brute force; and it has a gradient."""
    x = test_pairs[0][:32].clone().requires_grad_(True)
    reward = PairConstraintReward(models.classifier, "sum10")
    r = reward(x)
    left, right = (models.classifier(h).softmax(1) for h in halves(x.detach()))
    brute = sum(left[:, a] * right[:, b] for a, b in EXPECTED["sum10"])
    torch.testing.assert_close(r.detach().exp(), brute, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(r.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_judge_reads_held_out_real_pairs(models, test_pairs):
    """Pairs of test-split digits (never seen by any model): the judge reads both digits right > 95%."""
    images, labels = test_pairs
    calls = torch.stack([models.judge(h).argmax(1) for h in halves(images)], dim=1)
    assert float((calls == labels).all(1).float().mean()) > 0.95
    assert json.loads((PAIR_WEIGHTS_DIR / "metrics.json").read_text())["held_out_real_pairs"][
        "judge_pair_accuracy"] > 0.95


def test_base_sampler_hits_the_recorded_base_rate(models):
    """The sampler the bench uses (SDE, eta 1, 40 steps) against the rate metrics.json records from the
    fine ODE: same law, so within a 4-sigma binomial band plus 3 points for the two discretisations."""
    recorded = json.loads((PAIR_WEIGHTS_DIR / "metrics.json").read_text())["base_samples"]["constraint_rates"]
    n = 1500
    reward = PairConstraintReward(models.classifier, "sum10")
    setup = Setup(models, reward)
    result = base_sample(models.denoiser, make_x_init(n, 5, CANVAS_SHAPE), time_grid(40), config=setup.config(5))
    rate = float(judge_success(models.judge, reward.table, result.samples).float().mean())
    p = recorded["sum10"]
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.03, (rate, p)


def test_demo_task_pairs_end_to_end(tmp_path, capsys):
    out = tmp_path / "pairs"
    assert main(["demo", "--task", "pairs", "--constraint", "a + b == 10", "--particles", "8", "--steps", "6",
                 "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "a + b == 10" in table
    results = json.loads((out / "results.json").read_text())
    assert [m["key"] for m in results["methods"]] == list(PAIR_METHODS)
    for m in results["methods"]:
        assert 0 <= m["judge_accuracy"] <= 1 and len(m["trace"]) == 6
    assert (out / "samples.png").stat().st_size > 1000


def test_demo_task_pairs_rejects_a_bad_constraint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--task", "pairs", "--constraint", "a + b == 30", "--out", str(tmp_path), "--no-progress"])
    assert exc.value.code == 2
    assert "holds for no pair" in capsys.readouterr().err


def test_every_pair_method_is_a_demo_method():
    assert set(PAIR_METHODS) <= set(METHODS)

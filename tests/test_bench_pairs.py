"""CI run of bench/bench_pairs.py --quick: structure of its tables and sanity of its numbers."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_pairs.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("bench_pairs", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path_factory.mktemp("pairs")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return bench, out


def test_quick_bench_writes_every_method_at_matched_budget(quick):
    bench, out = quick
    rows = json.loads((out / "pairs_accuracy.json").read_text())
    q = bench.QUICK
    assert len(rows) == len(q["constraints"]) * len(q["budgets"]) * len(q["seeds"]) * len(bench.PAIR_METHODS)
    for row in rows:
        assert 0 <= row["judge_accuracy"] <= 1 and 0 <= row["reward_classifier_accuracy"] <= 1
    for constraint in q["constraints"]:
        for seed in q["seeds"]:
            sel = {r["method"]: r for r in rows if r["constraint"] == constraint and r["seed"] == seed}
            assert set(sel) == set(bench.PAIR_METHODS)
            # FMTT exact is charged an upper bound; every method spends at most that (+10% for rounding).
            charged = 5 * sel["fmtt_exact"]["particles"] * q["steps"]
            assert all(r["passes"] <= 1.1 * charged for r in sel.values())
            assert sel["fk"]["final_ess"] is not None and sel["best_of_n"]["final_ess"] is None
    md = (out / "pairs_accuracy.md").read_text()
    assert "FMTT exact (flow map) minus FK steering (diff)" in md
    assert (out / "pairs_accuracy.png").stat().st_size > 10_000


def test_quick_base_success_is_near_the_measured_base_rate(quick):
    """Base sampling's judge success, pooled over the quick runs, against the base model's rate recorded in
    metrics.json: within a 4-sigma binomial band (16 samples per run) plus 3 points for discretisation."""
    bench, out = quick
    rows = [r for r in json.loads((out / "pairs_accuracy.json").read_text()) if r["method"] == "base"]
    metrics = json.loads((bench.load_pair_models.__globals__["PAIR_WEIGHTS_DIR"] / "metrics.json").read_text())
    rates = metrics["base_samples"]["constraint_rates"]
    p = sum(rates[r["constraint"]] for r in rows) / len(rows)
    observed = sum(r["judge_accuracy"] for r in rows) / len(rows)
    n = bench.N_OUT * len(rows)
    assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.03, (observed, p)


def test_quick_lookahead_figure(quick):
    bench, out = quick
    every = json.loads((out / "pairs_lookahead.json").read_text())
    assert {r["dynamics"] for r in every} == {"ODE", "SDE"}
    rows = [r for r in every if r["dynamics"] == "ODE"]
    names = {r["lookahead"] for r in rows}
    assert names == {"denoiser", "ODE(1)", "ODE(2)", "ODE(4)", "flow map"}
    by = {(r["lookahead"], r["t"]): r for r in rows}
    for (name, t), r in by.items():
        assert 0 <= r["pair_agreement"] <= 1 and -1 <= r["corr_mean"] <= 1
        # One Euler step from t to 1 lands on the denoiser's prediction: the two rows agree.
        assert r["rms_error"] == pytest.approx(by[("denoiser", t)]["rms_error"], rel=1e-4) or name != "ODE(1)"
    late = max(t for _, t in by)
    # Close to the data every look-ahead is near exact; more ODE steps are never much worse early.
    assert all(by[(n, late)]["pair_agreement"] > 0.9 for n in names)
    early = min(t for _, t in by)
    assert by[("ODE(4)", early)]["rms_error"] < by[("denoiser", early)]["rms_error"]
    assert (out / "pairs_lookahead.png").stat().st_size > 10_000


def test_gated_tilt_is_the_closed_form_law():
    """tilt_gated against brute-force quadrature of p(x) exp(r(x)) on a fine 2-D grid."""
    import torch

    from fmtt_core.analytic import GaussianMixture, gated_reward, tilt_gated

    mixture = GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.5], [1.5, -1.0]]),
                              torch.tensor([[0.3, 0.2], [0.25, 0.4]]))
    centres = torch.tensor([[1.5, -0.5], [-2.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    law = tilt_gated(mixture, centres, 0.1, 1e-2)
    grid = torch.linspace(-6, 6, 801, dtype=torch.float64)
    pts = torch.cartesian_prod(grid, grid)
    brute = (mixture.log_prob(pts) + gated_reward(centres, 0.1, 1e-2)(pts)).exp()
    brute = brute / brute.sum()
    closed = law.log_prob(pts).exp()
    closed = closed / closed.sum()
    assert float((brute - closed).abs().sum()) / 2 < 1e-6


def test_quick_gated_case(quick):
    bench, out = quick
    md = (out / "pairs_gated.md").read_text()
    rows = json.loads((out / "pairs_gated.json").read_text())
    assert {r["method"] for r in rows} == set(bench.GATED_METHODS) | {"i.i.d. exact (MC floor)"}
    assert all(0 <= r["success"] <= 1 for r in rows)
    assert "exact tilted law's success" in md
    assert (out / "pairs_gated.png").stat().st_size > 10_000

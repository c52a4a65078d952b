"""`fmtt demo` end to end on the shipped weights: files, budget matching, and that FMTT steers."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from fmtt_demo.cli import main, run_demo
from fmtt_demo.methods import DEFAULT_METHODS, METHODS, expectation


def test_demo_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--particles", "8", "--steps", "8", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    for key in DEFAULT_METHODS:
        assert METHODS[key].label in table
    results = json.loads((out / "results.json").read_text())
    assert [m["key"] for m in results["methods"]] == list(DEFAULT_METHODS)
    for m in results["methods"]:
        assert 0 <= m["judge_accuracy"] <= 1 and len(m["trace"]) == 8
        assert m["nfe"]["denoiser"] == 8 * m["particles"]
    assert "| FMTT exact, flow map | 8 |" in (out / "results.md").read_text()
    for name in ("samples.png", "traces.png"):
        with Image.open(out / name) as image:
            assert image.width > 200 and image.height > 200


def test_weighted_shares_stay_probabilities_under_round_off():
    # Weights normalised first can sum to 1 + 2e-16, which made a run whose samples were all the target digit
    # report an accuracy above 1 (seen on an AMD EPYC). 16 of these 200 draws do that; none may leak through.
    g = torch.Generator().manual_seed(0)
    overshoots = 0
    for _ in range(200):
        w = torch.rand(8, generator=g, dtype=torch.float64)
        overshoots += float((w / w.sum()).sum()) > 1
        assert expectation(w, torch.ones(8, dtype=torch.bool)) == 1.0
        share = expectation(w, torch.rand(8, generator=g) < 0.5)
        assert 0.0 <= share <= 1.0
    assert overshoots > 0  # the draws do exercise the round-off


def test_every_method_spends_the_same_network_budget():
    """FMTT exact is charged an upper bound (a look-ahead forward on every step, which auto / advective
    weights may spend; the default twisted weights spend none); the baselines spend that charged budget and
    FMTT exact no more."""
    runs, settings = run_demo(particles=16, steps=12, progress=False)
    reference = next(r for r in runs if r.method.key == "fmtt_exact")
    charged = (1 + 4 * settings["jumps"]) * reference.particles * settings["steps"]
    assert reference.passes <= charged
    for run in runs:
        assert run.passes <= 1.1 * charged, (run.method.key, run.passes, charged)
        if run.method.key not in ("fmtt_exact", "fmtt_denoiser"):
            # Rounding of particle counts and FMTT's gradient-free last step: within 10%.
            assert abs(run.passes - charged) <= 0.1 * charged, (run.method.key, run.passes, charged)


def test_fmtt_exact_beats_base_sampling_at_the_default_budget():
    """Default budget (64 particles, 40 steps, beta 4), target 3, seeds 0-2, judged by the independent CNN.

    Measured on the shipped weights, seeds 0-9: FMTT exact 94.4%-99.9% (mean 97.4%), base 8.2%-13.3%
    (mean 11.4%; the data has 10% threes). Base draws 256 i.i.d. samples a seed, so its 3-seed mean has a
    standard error near 1.1%: 25% is > 10 standard errors away. The FMTT threshold (80%) sits 14 points
    under the worst seed measured, for platform float differences.
    """
    fmtt, base = [], []
    for seed in range(3):
        runs, _ = run_demo(seed=seed, methods="base,fmtt_exact", progress=False)
        acc = {r.method.key: r.metrics["judge_accuracy"] for r in runs}
        fmtt.append(acc["fmtt_exact"])
        base.append(acc["base"])
    assert sum(base) / 3 < 0.25
    assert sum(fmtt) / 3 > 0.80
    assert min(f - b for f, b in zip(fmtt, base)) > 0.5


def test_symmetry_reward_is_pluggable_and_steered(tmp_path):
    out = tmp_path / "sym"
    assert main(["demo", "--reward", "symmetry", "--methods", "base,fmtt_exact", "--particles", "32",
                 "--steps", "16", "--out", str(out), "--no-progress"]) == 0
    results = {m["key"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
    assert "judge_accuracy" not in results["base"]
    assert results["fmtt_exact"]["mean_reward"] > results["base"]["mean_reward"] + 0.02


def test_single_mode_runs_base_against_that_mode(tmp_path):
    runs, settings = run_demo(mode="search", particles=8, steps=6, progress=False)
    assert [r.method.key for r in runs] == ["base", "fmtt_search"]
    assert runs[1].metrics["resamples"] >= 1  # search selections happened


def test_bad_options_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--target-class", "12"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "base,magic", "--out", str(tmp_path), "--no-progress"])
    assert "unknown method(s) magic; choose from base, best_of_n" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # fmtt_core's own check, surfaced as a usage error
        main(["demo", "--methods", "fk", "--eta", "0", "--particles", "4", "--steps", "3", "--out", str(tmp_path),
              "--no-progress"])
    assert "FK steering needs a stochastic sampler" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--particles", "0"])
    assert "must be a whole number >= 1, got 0" in capsys.readouterr().err

"""Smoke test of bench/bench_analytic.py: every method runs, is scored and lands in the table."""
import importlib.util
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_analytic.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_analytic", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(bench):
    cfg = bench.quick_config()
    cfg.particles, cfg.seeds, cfg.reference_samples = (16, 24), 2, 200
    cfg.setting = replace(cfg.setting, steps=6, flow_map_rk4_steps=4)
    records, references = bench.run_benchmark(cfg, log=lambda msg: None)
    return cfg, records, references, bench.summarise(records, references)


def test_every_method_has_a_finite_row_per_target_and_budget(bench, tiny_run):
    cfg, _, _references, rows = tiny_run
    expected = {(t.name, m, n) for t in cfg.targets for m in [bench.IID] + [m.name for m in bench.METHODS]
                for n in cfg.particles}
    by_key = {(r["target"], r["method"], r["N"]): r for r in rows}
    assert set(by_key) == expected
    methods = {m.name: m for m in bench.METHODS}
    for (target, name, n), row in by_key.items():
        method = methods.get(name)
        required = ["total_model_nfe", "reward"]
        if name == bench.IID or method.scored:
            required += ["mean_err", "cov_err", "energy", "bias_z"]
        if method is not None and method.weighted:
            required += ["ess_frac"]
        if name.startswith(("FMTT", "FK")):
            required += ["resamples"]
        for key in required:
            value = row[key][0] if isinstance(row[key], tuple) else row[key]
            assert math.isfinite(value), (target, name, n, key, value)
        if "ess_frac" in row:
            assert 0 < row["ess_frac"][0] <= 1 + 1e-9
        if "energy" in row:
            assert row["energy"][0] >= -1e-9  # a V-statistic energy distance is never negative


def test_nfe_accounting_follows_the_lookahead(bench, tiny_run):
    """Per-particle model calls as charged by the samplers' own counters: K steps of one denoiser
    call, plus one flow-map jump, or k - 1 extra ODE calls (the first reuses D), per step."""
    cfg, _, _, rows = tiny_run
    steps = cfg.setting.steps
    nfe = {r["method"]: r["nfe_model"][0] for r in rows if r["N"] == cfg.particles[0] and "nfe_model" in r}
    assert nfe["best-of-N"] == nfe["FK steering diff"] == nfe["FMTT denoiser, eulerian w"] == steps
    assert nfe["FMTT denoiser, twisted w"] == steps
    assert nfe["FMTT flow map, eulerian w"] == nfe["FMTT zero-order flow map"] == 2 * steps
    # The default (twisted since issue 19; auto before) re-evaluates the look-ahead only on the steps a rule
    # makes advective, never on the last: between none and all but one.
    assert steps <= nfe["FMTT denoiser"] <= 2 * steps - 1
    assert 2 * steps <= nfe["FMTT flow map"] <= 3 * steps - 1
    for k in (2, 4):  # an advective step's ODE look-ahead makes k calls (no D to reuse at x + h b)
        assert k * steps <= nfe[f"FMTT ODE({k})"] <= k * steps + k * (steps - 1)
    # Advective weights re-evaluate the look-ahead after each step except the last (which scores x1).
    assert nfe["FMTT denoiser, advective w"] == 2 * steps - 1


def test_table_and_plot_are_written(bench, tiny_run, tmp_path):
    cfg, records, references, rows = tiny_run
    table = bench.markdown_table(rows, references, cfg.setting, records)
    for target in cfg.targets:
        assert f"### {target.name}" in table
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(body) == len(rows)
    assert "nan" not in table.lower()
    bench.write_outputs(tmp_path, "analytic_test", "test", 0.0, rows, records, table)
    assert (tmp_path / "analytic_test.png").stat().st_size > 10_000
    assert (tmp_path / "analytic_test.md").read_text().count("| FMTT flow map |") == len(cfg.targets) * 2

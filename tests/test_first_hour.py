"""The first hour of a newcomer who follows the README: each friction found on a fresh machine has a check here.

- `fmtt demo` without the "demo" extra stops at once and names the extra to install;
- a bad `--out` (an existing file, a place that cannot be written) fails before any work;
- `--samples` above `--particles` is refused;
- `--mode search` draws a traces.png without an empty ESS panel or a matplotlib warning;
- the demo page's examples are the ones `fmtt demo --help` shows, and their output folders are git-ignored;
- `bench/bench_digits.py --quick` never writes over the committed full results;
- the library page's example runs and prints;
- bad demo arguments are refused before any sampling, with `fmtt demo`'s usage; --help shows every default;
- results.json is strict JSON; methods without a look-ahead are not drawn as a flat line in traces.png;
- the README links only pages that exist (or that other branches are adding) and pictures that exist.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

import fmtt_demo.cli as cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_PAGE = (ROOT / "docs" / "demo.md").read_text()
LIBRARY_PAGE = (ROOT / "docs" / "library.md").read_text()


def demo_examples(text: str) -> set[str]:
    """The `fmtt demo ...` command lines in a text, comments stripped."""
    return {re.sub(r"\s+", " ", m.split("#")[0]).strip()
            for m in re.findall(r"^\s*(fmtt demo\b.*)$", text, flags=re.M)}


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the demo starts working (loading its models)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the demo started working before its inputs were checked")
    monkeypatch.setattr(cli, "load_digit_models", refuse)


@pytest.mark.parametrize("module", ["tqdm", "matplotlib", "PIL"])
def test_demo_without_the_extra_names_it(module, tmp_path, monkeypatch, capsys, no_work):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert cli.DEMO_EXTRA[module] in err and 'pip install "comfyui-fmtt[demo]"' in err
    assert not out.exists()


def test_the_demo_extra_lists_what_the_demo_imports():
    extra = re.search(r'^demo = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    for package in cli.DEMO_EXTRA.values():
        assert f'"{package}"' in extra


@pytest.mark.parametrize("kind", ["existing file", "unwritable"])
def test_bad_out_fails_before_any_work(kind, tmp_path, capsys, no_work):
    if kind == "existing file":
        out = tmp_path / "results.txt"
        out.write_text("keep me")
        expected = "is an existing file"
    else:
        out = Path("/proc/fmtt_forbidden")  # procfs refuses new entries, even to root
        expected = "cannot be written"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    assert f"--out {out} {expected}" in capsys.readouterr().err
    if kind == "existing file":
        assert out.read_text() == "keep me"


def test_more_samples_than_particles_is_refused(tmp_path, capsys, no_work):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--particles", "8", "--samples", "16", "--out", str(tmp_path), "--no-progress"])
    assert "--samples 16 is more than --particles 8" in capsys.readouterr().err


def test_default_samples_adapt_to_few_particles():
    _, settings = cli.run_demo(particles=4, steps=3, methods="base", progress=False)
    assert settings["samples_handed_on"] == 4


def test_search_mode_traces_have_no_empty_panel(tmp_path):
    """Search hands on its best particles, not weights: no ESS panel, and no matplotlib warning."""
    from fmtt_demo.report import write_results
    runs, settings = cli.run_demo(mode="search", particles=8, samples=4, steps=6, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        paths = write_results(runs, settings, tmp_path / "search")
    with Image.open(paths["traces"]) as search_plot:
        runs_exact, settings_exact = cli.run_demo(mode="exact", particles=8, samples=4, steps=6, progress=False)
        with Image.open(write_results(runs_exact, settings_exact, tmp_path / "exact")["traces"]) as exact_plot:
            # One panel against two (reward and ESS), at the same height.
            assert search_plot.height == exact_plot.height
            assert search_plot.width < 0.7 * exact_plot.width


def test_demo_page_and_help_give_the_same_demo_examples():
    assert demo_examples(DEMO_PAGE) == demo_examples(cli.__doc__)
    assert len(demo_examples(cli.__doc__)) >= 4


def ignored_prefixes() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".gitignore").read_text().splitlines()]
    return [ln.strip("/") for ln in lines if ln and not ln.startswith("#") and ln.endswith("/")]


def test_every_documented_output_folder_is_git_ignored():
    outs = {m.group(1) for line in demo_examples(README + DEMO_PAGE) if (m := re.search(r"--out (\S+)", line))}
    outs.add(str(cli.build_parser().parse_args(["demo"]).out))  # the default
    import bench_digits
    outs.add(str(bench_digits.QUICK_RESULTS.relative_to(ROOT)))
    ignored = ignored_prefixes()
    for out in outs:
        assert any(out == p or out.startswith(p + "/") for p in ignored), f"{out} is not in .gitignore"


def test_bench_digits_quick_never_writes_the_committed_results(capsys):
    import bench_digits
    assert bench_digits.output_folder(None, quick=False) == bench_digits.RESULTS
    quick = bench_digits.output_folder(None, quick=True)
    assert quick != bench_digits.RESULTS and bench_digits.RESULTS in quick.parents
    with pytest.raises(SystemExit):  # asked explicitly: refused before any run
        bench_digits.main(["--quick", "--out", str(bench_digits.RESULTS)])
    assert "--quick would overwrite the committed full results" in capsys.readouterr().err


def test_library_page_example_runs_and_prints():
    code = re.search(r"```python\n(.*?)```", LIBRARY_PAGE, flags=re.S).group(1)
    assert "torch.set_num_threads(1)" in code  # the example sets its threads itself (the page says why)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout
    weighted = [float(v) for v in re.search(r"weighted mean \[([^\]]*)\]", printed).group(1).split(",")]
    exact = [float(v) for v in re.search(r"exact \[([^\]]*)\]", printed).group(1).split(",")]
    # What the README promises: the weighted mean within Monte-Carlo error of the exact tilted mean.
    assert max(abs(w - e) for w, e in zip(weighted, exact)) < 0.2, printed
    assert "ESS" in printed and "denoiser" in printed


@pytest.mark.parametrize("args, message", [
    (["--steps", "1"], "argument --steps: must be a whole number >= 3, got 1"),
    (["--eta", "-1"], "argument --eta: must be a number >= 0, got -1"),
    (["--eta", "nan"], "argument --eta: must be a number >= 0, got nan"),
    (["--particles", "2.5"], "argument --particles: must be a whole number >= 1, got '2.5'"),
    (["--particles", "0"], "argument --particles: must be a whole number >= 1, got 0"),
    (["--reward-scale", "-4"], "argument --reward-scale: must be a number >= 0, got -4"),
    (["--methods", "base,magic"], "unknown method(s) magic"),
])
def test_bad_arguments_are_refused_before_sampling_with_the_demo_usage(args, message, tmp_path, capsys, no_work):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", *args, "--out", str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: fmtt demo ")  # the demo's usage, not the top-level `fmtt {demo}` one


def test_run_demo_refuses_too_few_steps_before_loading_models(no_work):
    with pytest.raises(ValueError, match="--steps 2 is fewer than 3"):
        cli.run_demo(steps=2, progress=False)


def test_help_gives_every_option_a_text_and_its_default():
    demo = cli.build_parser().demo_parser
    formatter = demo._get_formatter()
    for action in demo._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{action.option_strings} has no help text"
        if action.default not in (None, False):
            text = formatter._expand_help(action)  # the help as --help prints it
            assert f"(default {action.default}" in text, (action.option_strings, text)


def test_results_json_is_strict_and_unmeasured_traces_are_null(tmp_path):
    from fmtt_demo.report import write_results
    runs, settings = cli.run_demo(methods="base,best_of_n,fmtt_exact", particles=8, samples=4, steps=6,
                                  progress=False)
    paths = write_results(runs, settings, tmp_path)

    def refuse(constant):
        raise ValueError(f"bare {constant} in results.json")
    results = json.loads(paths["results"].read_text(), parse_constant=refuse)
    traces = {m["key"]: m["trace"] for m in results["methods"]}
    # No look-ahead: nothing measured, written as null (never 0.0, which would read as the best reward).
    for key in ("base", "best_of_n"):
        assert all(step["reward_mean"] is None for step in traces[key]), key
    assert all(isinstance(step["reward_mean"], float) for step in traces["fmtt_exact"])


def test_traces_plot_draws_no_flat_line_for_methods_without_a_look_ahead(tmp_path):
    from fmtt_demo.report import save_traces_plot
    runs, _ = cli.run_demo(methods="base,best_of_n,fk,fmtt_exact", particles=8, samples=4, steps=6, progress=False)
    for run in runs:  # the core records NaN, not 0.0, where it measured nothing
        rewards = [s.reward_mean for s in run.result.trace]
        if run.method.key in ("base", "best_of_n"):
            assert all(math.isnan(r) for r in rewards), run.method.key
        else:
            assert all(math.isfinite(r) and r < 0 for r in rewards), run.method.key  # log p(3 | x) < 0
    drawn = save_traces_plot(runs, tmp_path / "traces.png")
    assert drawn["reward"] == ["FK steering, diff", "FMTT exact, flow map"]
    # The default twisted weights measure no Eulerian defect (no defect_probe), so no empty panel is drawn.
    assert "defect" not in drawn


def test_the_readme_links_pages_and_pictures_that_exist():
    # Pages that other branches add at the same release (they land together with this README).
    landing = {"docs/weights.md", "docs/training.md", "docs/training-comfyui.md", "docs/few-step-loras.md",
               "docs/limits.md", "docs/benchmark-pairs.md"}
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", README) if not t.startswith("http")}
    assert {"docs/images/workflow.png", "docs/images/digits_samples.png", "docs/images/digits_diagnostics.png",
            "docs/make_pictures.py"} <= targets
    missing = sorted(t for t in targets - landing if not (ROOT / t).exists())
    assert not missing, missing
    assert not re.search(r"\b(issue|review)s? ?#?\d", README, flags=re.I)  # nothing a reader cannot see

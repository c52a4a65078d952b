"""`fmtt distill` on the bundled digits teacher, kept short for CI: the folder it writes, a falling loss, a stopped
run resumed from --out equal to the uninterrupted one, FMTT running on the result, refusals, and torchrun.
The full-quality run is a documented command whose figures are recorded in docs/training.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fmtt_demo.cli import main, run_demo
from fmtt_demo.models import WEIGHT_FILES, WEIGHTS_DIR, load_digit_models

SHORT = ["--batch", "32", "--save-every", "10", "--log-every", "10", "--eval-trajectories", "16"]


def _losses(out):
    with safe_open(str(out / "state.safetensors"), "pt") as f:
        return json.loads(f.metadata()["fmtt.trainer_state"])["losses"]


def test_distill_writes_a_resumable_run_fmtt_can_use(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), "--steps", "40", *SHORT]) == 0
    printed = capsys.readouterr().out
    assert "step 40/40" in printed and "| 0 |" in printed and f"fmtt demo --weights {out}" in printed
    for name in (*WEIGHT_FILES.values(), "state.safetensors", "metrics.json"):
        assert (out / name).is_file(), name
    losses = _losses(out)
    assert len(losses) == 40 and sum(losses[-10:]) < sum(losses[:10])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["lookahead_error"]) == {"distilled", "bundled"}
    assert metrics["lookahead_error"]["distilled"]["trajectories"] == 16
    # The shipped weights are untouched, and the distilled map differs from the shipped one.
    shipped = load_file(str(WEIGHTS_DIR / WEIGHT_FILES["flow_map"]))
    ours = load_file(str(out / WEIGHT_FILES["flow_map"]))
    assert shipped.keys() == ours.keys() and any(not torch.equal(shipped[k], ours[k]) for k in ours)
    # FMTT runs with it.
    models = load_digit_models(out)
    assert torch.equal(models.flow_map.net.inp.weight, ours["net.inp.weight"])
    runs, _ = run_demo(particles=4, steps=4, methods="fmtt_exact", weights=out, progress=False)
    assert runs[0].metrics["judge_accuracy"] >= 0


def test_stopped_run_resumed_from_out_equals_the_uninterrupted_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["distill", "--out", str(straight), "--steps", "30", *SHORT]) == 0
    assert main(["distill", "--out", str(split), "--steps", "10", *SHORT]) == 0
    assert main(["distill", "--out", str(split), "--steps", "30", "--resume", *SHORT]) == 0
    assert _losses(split) == _losses(straight)
    a, b = (load_file(str(d / WEIGHT_FILES["flow_map"])) for d in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulated_run_equals_the_one_pass_run_and_resumes_exactly(tmp_path, capsys):
    """--accumulate 4 splits the batch of 32 into 4 passes of 8: the same run to float tolerance; a stopped
    accumulated run resumed from --out is the uninterrupted accumulated run, loss for loss."""
    whole, micro, split = tmp_path / "whole", tmp_path / "micro", tmp_path / "split"
    assert main(["distill", "--out", str(whole), "--steps", "20", *SHORT]) == 0
    assert main(["distill", "--out", str(micro), "--steps", "20", "--accumulate", "4", *SHORT]) == 0
    assert _losses(micro) == pytest.approx(_losses(whole), rel=1e-4)
    a, b = (load_file(str(d / WEIGHT_FILES["flow_map"])) for d in (whole, micro))
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    assert main(["distill", "--out", str(split), "--steps", "10", "--accumulate", "4", *SHORT]) == 0
    assert main(["distill", "--out", str(split), "--steps", "20", "--accumulate", "4", "--resume", *SHORT]) == 0
    assert _losses(split) == _losses(micro)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(tmp_path / "odd"), "--steps", "2", *SHORT, "--accumulate", "5"])
    assert "batch 32 does not split" in capsys.readouterr().err


def test_distill_refuses_the_shipped_folder_an_existing_run_and_a_missing_resume(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(WEIGHTS_DIR), "--steps", "2"])
    assert "shipped weights folder" in capsys.readouterr().err
    out = tmp_path / "run"
    assert main(["distill", "--out", str(out), "--steps", "2", *SHORT]) == 0
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(out), "--steps", "2", *SHORT])
    assert "pass --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(tmp_path / "none"), "--resume", "--steps", "2"])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "--out", str(out), "--resume", "--steps", "4", "--lr", "1e-3", *SHORT])
    assert "other settings (lr=0.0005)" in capsys.readouterr().err


def test_torchrun_distill_equals_one_process(tmp_path):
    args = ["-m", "fmtt_demo.cli", "distill", "--steps", "6", *SHORT]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd, out in (([sys.executable], "one"),
                     ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"], "two")):
        done = subprocess.run(cmd + args + ["--out", str(tmp_path / out)], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["processes"] == 2
    assert _losses(tmp_path / "one") == pytest.approx(_losses(tmp_path / "two"), rel=1e-5)
    a, b = (load_file(str(tmp_path / d / WEIGHT_FILES["flow_map"])) for d in ("one", "two"))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)

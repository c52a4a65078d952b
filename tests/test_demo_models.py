"""The shipped digits models: they load, behave, match their model card, and the training is reproducible."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from fmtt_demo.data import split_digits
from fmtt_demo.models import WEIGHT_FILES, WEIGHTS_DIR, load_digit_models, load_model
from fmtt_demo.ode import heun_trajectory
from fmtt_demo.rewards import ClassifierReward, SymmetryReward, make_reward
from fmtt_demo.train import main as train_main


@pytest.fixture(scope="module")
def models():
    return load_digit_models()


def noise(n, seed=0):
    return torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_shipped_weights_load_and_give_finite_outputs_of_the_right_shapes(models):
    x, t = noise(5), torch.linspace(0, 1, 5)
    for out in (models.velocity(x, t), models.denoiser(x, t), models.flow_map(x, t * 0.5, t)):
        assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    for logits in (models.classifier(x), models.judge(x)):
        assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    assert all(not p.requires_grad for m in (models.velocity, models.flow_map, models.judge) for p in m.parameters())


def test_denoiser_and_flow_map_boundary_conditions(models):
    x = noise(4)
    one = torch.ones(4)
    torch.testing.assert_close(models.denoiser(x, one), x)           # D(x, 1) = x: at t = 1 x is data
    s = torch.rand(4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(models.flow_map(x, s, s), x)           # X(x, s, s) = x


def test_rewards_are_differentiable_per_particle(models):
    x = noise(6).requires_grad_(True)
    for reward in (make_reward("classifier", models, 3), make_reward("symmetry", models)):
        r = reward(x)
        assert r.shape == (6,) and torch.isfinite(r).all() and (r <= 0).all()
        (g,) = torch.autograd.grad(r.sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # r = log p(class | x): the ten classes' exponentials sum to one.
    total = sum(ClassifierReward(models.classifier, c)(x).exp() for c in range(10))
    torch.testing.assert_close(total, torch.ones(6), rtol=1e-5, atol=1e-5)


def test_symmetry_reward_is_zero_exactly_for_mirror_images():
    x = noise(3)
    symmetric = x + x.flip(-1)
    assert torch.equal(SymmetryReward()(symmetric), torch.zeros(3))
    assert (SymmetryReward()(x) < 0).all()


def test_bad_reward_and_weights_errors_name_the_fix(models, tmp_path):
    with pytest.raises(ValueError, match="digit 0..9"):
        ClassifierReward(models.classifier, 12)
    with pytest.raises(ValueError, match="classifier, symmetry"):
        make_reward("aesthetic", models)
    with pytest.raises(FileNotFoundError, match="fmtt_demo.train"):
        load_model("velocity", tmp_path)


def test_model_card_metrics_match_the_shipped_files():
    metrics = json.loads((WEIGHTS_DIR / "metrics.json").read_text())
    total = 0
    for name in WEIGHT_FILES.values():
        data = (WEIGHTS_DIR / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == metrics["files"][name]["sha256"], name
    assert total < 20e6
    card = (WEIGHTS_DIR.parent / "MODEL_CARD.md").read_text()
    assert metrics["files"]["velocity.safetensors"]["sha256"][:16] in card
    assert "python -m fmtt_demo.train --out fmtt_demo/weights --seed 0" in card


def test_classifiers_are_accurate_on_held_out_digits(models):
    images, labels = split_digits(0)["test"]
    with torch.no_grad():
        assert (models.classifier(images).argmax(1) == labels).float().mean() > 0.95
        assert (models.judge(images).argmax(1) == labels).float().mean() > 0.95


def test_flow_map_beats_the_denoiser_as_a_look_ahead_at_small_t(models):
    """The paper's figure-2 claim on the shipped weights: predict where the teacher's ODE lands."""
    times, states = heun_trajectory(models.velocity, noise(256, seed=7), steps=64)
    end = states[-1]
    for k in (0, 6, 16):  # t = 0, ~0.1, 0.25
        x, t = states[k], float(times[k])
        with torch.no_grad():
            err_flow = (models.flow_map(x, t, 1.0) - end).flatten(1).norm(dim=1).mean()
            err_den = (models.denoiser(x, t) - end).flatten(1).norm(dim=1).mean()
        assert err_flow < 0.5 * err_den, (t, float(err_flow), float(err_den))


def test_base_model_covers_every_digit(models):
    _, states = heun_trajectory(models.velocity, noise(500, seed=3), steps=32, keep_every=32)
    counts = torch.bincount(models.judge_predict(states[-1]), minlength=10).float() / 500
    # Each class is ~10% of the data; a collapsed or broken generator would miss some.
    assert counts.min() > 0.04 and counts.max() < 0.2, counts


def test_training_script_is_deterministic_and_writes_loadable_weights(tmp_path):
    for run in ("a", "b"):
        assert train_main(["--quick", "--out", str(tmp_path / run)]) == 0
    hashes = [json.loads((tmp_path / run / "metrics.json").read_text())["files"] for run in ("a", "b")]
    assert hashes[0] == hashes[1]
    models = load_digit_models(tmp_path / "a")
    assert models.flow_map(noise(2), 0.0, 1.0).shape == (2, 1, 8, 8)


def test_training_writes_a_new_folder_by_default_and_leaves_the_shipped_weights(tmp_path, monkeypatch, capsys):
    before = {name: (WEIGHTS_DIR / name).read_bytes() for name in WEIGHT_FILES.values()}
    monkeypatch.chdir(tmp_path)
    assert train_main(["--quick"]) == 0
    assert "the shipped weights in" in capsys.readouterr().out
    written = tmp_path / "runs" / "digits-weights"
    assert {p.name for p in written.iterdir()} >= set(WEIGHT_FILES.values()) | {"metrics.json"}
    assert {name: (WEIGHTS_DIR / name).read_bytes() for name in WEIGHT_FILES.values()} == before


def test_compare_with_shipped_names_each_file():
    from fmtt_demo.train import compare_with_shipped
    shipped = json.loads((WEIGHTS_DIR / "metrics.json").read_text())["files"]
    mine = {**shipped, "judge.safetensors": {"sha256": "0" * 64, "bytes": 1}}
    lines = "\n".join(compare_with_shipped(mine, shipped))
    assert "velocity.safetensors: " in lines and "same as shipped" in lines
    ref = shipped["judge.safetensors"]["sha256"][:12]
    assert f"judge.safetensors: 000000000000... differs from shipped ({ref}" in lines

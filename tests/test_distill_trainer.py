"""The flow-map distillation loop (fmtt_core.flow_maps.trainer): it learns the closed-form toy's flow map, a run
stopped and resumed from its saved state is bit for bit the uninterrupted run, bad resume files are refused,
gradient accumulation over micro-batches equals one pass over the global batch, and 2 gloo processes equal one
process at the same global batch."""
import json

import pytest
import torch

from fmtt_core import FMTTInputError, FMTTNumericalError
from fmtt_core.flow_maps import FlowMapTrainer, flow_map_from_student
from fmtt_testing.dist_tools import launch, results_of
from fmtt_testing.distill_toy import Student, data, exact_map, settings, teacher


def _one_jump_error(module, n=512):
    """RMS of X_{0,1}(x0) against the exact map, on held-out noise."""
    g = torch.Generator().manual_seed(123)
    x0 = torch.randn(n, 2, generator=g)
    zero, one = torch.zeros(n), torch.ones(n)
    with torch.no_grad():
        return float((flow_map_from_student(module)(x0, zero, one) - exact_map(x0, zero, one)).pow(2).mean().sqrt())


@pytest.mark.parametrize("objective", ["lsd", "psd"])
def test_trainer_learns_the_exact_flow_map(objective):
    module = Student()
    before = _one_jump_error(module)
    trainer = FlowMapTrainer(module, teacher, data, settings(objective=objective, steps=400, batch=64, lr=3e-3,
                                                             ema_decay=0.0, lr_warmup_steps=20,
                                                             derivative_warmup_steps=50))
    losses = trainer.run()
    after = _one_jump_error(module)
    assert len(losses) == 400
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    # The exact map moves x0 by ~1.6 RMS; the trained student lands within a fraction of that.
    assert after < 0.25 * before and after < 0.15, (before, after)


def _state(trainer):
    opt = trainer.optimizer.state_dict()["state"]
    return ([v.clone() for v in trainer.module.state_dict().values()],
            [v.clone() for v in trainer.ema.state_dict().values()],
            [opt[i][k].clone() for i in sorted(opt) for k in sorted(opt[i])],
            trainer.generator.get_state(), torch.get_rng_state())


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("objective,accumulate", [("lsd", 1), ("psd", 1), ("lsd", 4), ("psd", 2)])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path, objective, accumulate):
    cfg = settings(objective=objective, steps=12, accumulate=accumulate)
    torch.manual_seed(99)
    straight = FlowMapTrainer(Student(dropout=0.1), teacher, data, cfg, out_dir=tmp_path / "a")
    straight.run()
    reference = _state(straight)

    torch.manual_seed(99)
    first = FlowMapTrainer(Student(dropout=0.1), teacher, data, cfg, out_dir=tmp_path / "b")
    first.run(should_stop=lambda: first.step >= 5)  # a Cancel after 5 steps saves the state
    assert first.step == 5 and (tmp_path / "b" / "state.safetensors").is_file()
    torch.manual_seed(0)  # the process's RNG moves on; resume restores it
    second = FlowMapTrainer(Student(dropout=0.1, seed=7), teacher, data, cfg, out_dir=tmp_path / "b")
    second.resume(tmp_path / "b")
    assert second.step == 5
    second.run()
    assert second.losses == straight.losses  # the whole loss curve, float for float
    module, ema, opt, gen, rng = _state(second)
    assert _equal(module, reference[0]) and _equal(ema, reference[1]) and _equal(opt, reference[2])
    assert torch.equal(gen, reference[3]) and torch.equal(rng, reference[4])


def _sgd_run(objective, accumulate, calls):
    """5 steps of plain SGD (no clipping): unlike Adam, its update scales with the gradient, so a wrongly scaled
    accumulated gradient shows. `calls` records the rows of every student call."""
    module = Student()

    def student(x, s, t):
        calls.append(x.shape[0])
        return module(x, s, t)

    trainer = FlowMapTrainer(module, teacher, data, settings(objective=objective, steps=5, batch=8, grad_clip=0.0,
                                                             accumulate=accumulate),
                             student=student, optimizer=torch.optim.SGD(module.parameters(), lr=0.05))
    return trainer, trainer.run()


@pytest.mark.parametrize("objective", ["lsd", "psd"])
@pytest.mark.parametrize("accumulate", [2, 4, 8])
def test_accumulated_run_equals_the_unaccumulated_run_at_the_same_global_batch(objective, accumulate):
    whole_calls, micro_calls = [], []
    whole, whole_losses = _sgd_run(objective, 1, whole_calls)
    micro, micro_losses = _sgd_run(objective, accumulate, micro_calls)
    # Each forward saw one micro-batch (that is what lowers the memory), and the micro-batches cover the batch.
    assert set(whole_calls) == {8} and set(micro_calls) == {8 // accumulate}
    assert len(micro_calls) == accumulate * len(whole_calls)
    assert torch.allclose(torch.tensor(micro_losses), torch.tensor(whole_losses), rtol=1e-5, atol=1e-7)
    for k, v in whole.module.state_dict().items():
        assert torch.allclose(micro.module.state_dict()[k], v, rtol=1e-5, atol=1e-7), k
    for k, v in whole.ema.state_dict().items():
        assert torch.allclose(micro.ema.state_dict()[k], v, rtol=1e-5, atol=1e-7), k
    # The weights did move (else equality would say nothing about the gradients).
    assert not torch.allclose(whole.module.state_dict()["net.0.weight"], Student().state_dict()["net.0.weight"])


def test_micro_batches_partition_the_global_batch():
    trainer = FlowMapTrainer(Student(), teacher, data, settings(objective="psd", batch=12, accumulate=3))
    batch = trainer.draw_batch()
    parts = trainer.micro_batches(batch)
    assert [p["x_s"].shape[0] for p in parts] == [4, 4, 4]
    for k in ("x_s", "s", "t", "r"):
        assert torch.equal(torch.cat([p[k] for p in parts]), batch[k])


def test_resume_may_change_the_accumulation(tmp_path):
    straight = FlowMapTrainer(Student(), teacher, data, settings(steps=6), out_dir=tmp_path / "a")
    straight.run()
    first = FlowMapTrainer(Student(), teacher, data, settings(steps=6), out_dir=tmp_path / "b")
    first.run(should_stop=lambda: first.step >= 3)
    second = FlowMapTrainer(Student(), teacher, data, settings(steps=6, accumulate=4), out_dir=tmp_path / "b")
    second.resume(tmp_path / "b")
    second.run()
    assert second.losses[:3] == straight.losses[:3]
    assert torch.allclose(torch.tensor(second.losses), torch.tensor(straight.losses), rtol=1e-5, atol=1e-7)


def test_state_file_is_safetensors_with_a_json_header(tmp_path):
    from safetensors import safe_open

    trainer = FlowMapTrainer(Student(), teacher, data, settings(steps=3, save_every=2), out_dir=tmp_path)
    seen = []
    trainer.save = (lambda save: lambda path=None: (seen.append(trainer.step), save(path))[1])(trainer.save)
    trainer.run()
    assert seen == [2, 3]  # every save_every steps, and at the end
    with safe_open(str(tmp_path / "state.safetensors"), "pt") as f:
        header = json.loads(f.metadata()["fmtt.trainer_state"])
        keys = set(f.keys())
    assert header["step"] == 3 and len(header["losses"]) == 3 and header["settings"]["objective"] == "lsd"
    assert {"rng.generator", "rng.torch"} <= keys and any(k.startswith("optimizer.") for k in keys)
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("model.") for k in keys)


def test_resume_refuses_another_model_other_settings_and_other_files(tmp_path):
    FlowMapTrainer(Student(), teacher, data, settings(steps=2), out_dir=tmp_path).run()
    with pytest.raises(FMTTInputError, match="another model"):
        FlowMapTrainer(Student(width=32), teacher, data, settings()).resume(tmp_path)
    with pytest.raises(FMTTInputError, match=r"other settings \(lr=0.003\)"):
        FlowMapTrainer(Student(), teacher, data, settings(lr=1e-3)).resume(tmp_path)
    with pytest.raises(FMTTInputError, match="saved while distilling"):
        FlowMapTrainer(Student(), teacher, data, settings(), identity={"base_model": "abc"}).resume(tmp_path)
    longer = FlowMapTrainer(Student(), teacher, data, settings(steps=4))  # more steps: allowed
    longer.resume(tmp_path)
    assert longer.run() and longer.step == 4
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FMTTInputError, match="not a flow-map trainer state"):
        FlowMapTrainer(Student(), teacher, data, settings()).resume(tmp_path / "other.safetensors")
    with pytest.raises(FMTTInputError, match="does not exist"):
        FlowMapTrainer(Student(), teacher, data, settings()).resume(tmp_path / "missing.safetensors")


def test_log_records_and_previews():
    records, previews = [], []
    trainer = FlowMapTrainer(Student(), teacher, data, settings(steps=6, log_every=2, preview_every=3),
                             on_log=records.append, on_preview=lambda tr: previews.append(tr.step))
    trainer.run()
    assert [r["step"] for r in records] == [2, 4, 6] and previews == [3, 6]
    assert records[0]["loss"] == pytest.approx(sum(trainer.losses[:2]) / 2)
    assert records[0]["derivative_weight"] == pytest.approx((0 + 0.25) / 2)  # the warmup over 4 steps


def test_a_diverging_run_stops_before_the_step_with_the_weights_intact(tmp_path):
    module = Student()
    trainer = FlowMapTrainer(module, lambda x, t: x * float("nan"), data, settings(steps=3))
    before = [p.clone() for p in module.parameters()]
    with pytest.raises(FMTTNumericalError, match="lower lr"):
        trainer.run()
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_bad_settings_are_refused():
    with pytest.raises(FMTTInputError, match="objective"):
        FlowMapTrainer(Student(), teacher, data, settings(objective="esd"))
    with pytest.raises(FMTTInputError, match=r"batch 6 does not split into 1 process\(es\) x 4 micro-batch\(es\); "
                                             "use a multiple of 4"):
        FlowMapTrainer(Student(), teacher, data, settings(batch=6, accumulate=4))
    with pytest.raises(FMTTInputError, match="accumulate must be an integer >= 1"):
        FlowMapTrainer(Student(), teacher, data, settings(accumulate=0))
    with pytest.raises(FMTTInputError, match="no trainable parameters"):
        FlowMapTrainer(Student().requires_grad_(False), teacher, data, settings())


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(tmp_path, accumulate):
    args = {"steps": 6, "batch": 8, "accumulate": accumulate}
    ranks = results_of(launch("distill", 2, tmp_path, args=args, timeout=120))
    module = Student()
    trainer = FlowMapTrainer(module, teacher, data, settings(**{**args, "accumulate": 1}))
    one = torch.tensor(trainer.run(), dtype=torch.float64)
    for r in ranks:
        assert torch.allclose(r["losses"], one, rtol=1e-5, atol=1e-7), (r["losses"], one)
        for k, v in module.state_dict().items():
            assert torch.allclose(r[f"model.{k}"], v, rtol=1e-4, atol=1e-6)
            assert torch.allclose(r[f"ema.{k}"], trainer.ema.state_dict()[k], rtol=1e-4, atol=1e-6)
    # Every rank holds exactly the same weights (they apply the same averaged gradients).
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_held_out_summary_is_the_mean_with_its_standard_error_and_the_paired_change():
    """The held-out objective's estimate is the mean over the held-out samples with the standard error sd / sqrt(N);
    its change against an earlier evaluation of the same samples is the paired difference (its own standard error,
    small when the samples' values move together); the median is beside them."""
    from fmtt_core.flow_maps.trainer import held_out_summary
    before = torch.tensor([0.1, 0.2, 1.0, 2.0, 4.0])
    after = before - torch.tensor([0.05, 0.0, 0.1, 0.15, 0.2])
    out = held_out_summary(after, before)
    n, values, change = 5, after.double().tolist(), [-0.05, 0.0, -0.1, -0.15, -0.2]
    mean = sum(values) / n
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    assert out["pairs"] == n and out["mean"] == pytest.approx(mean) and out["se"] == pytest.approx(sd / n ** 0.5)
    assert out["median"] == pytest.approx(sorted(values)[2])
    c_mean = sum(change) / n
    c_sd = (sum((c - c_mean) ** 2 for c in change) / (n - 1)) ** 0.5
    assert out["change"] == pytest.approx(c_mean) and out["change_se"] == pytest.approx(c_sd / n ** 0.5)
    assert out["change_se"] < out["se"] / 10  # paired: the spread between samples cancels
    assert "change" not in held_out_summary(before)


def test_a_state_saved_before_a_setting_existed_resumes_with_its_default(tmp_path):
    """A state whose header lacks a setting added since (t_min) was saved with that setting's default: it resumes
    where the default is kept and is refused where it is not."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    FlowMapTrainer(Student(), teacher, data, settings(steps=2), out_dir=tmp_path).run()
    path = tmp_path / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["fmtt.trainer_state"])
    del header["settings"]["t_min"]
    save_file(load_file(str(path)), str(path), {"fmtt.trainer_state": json.dumps(header)})
    resumed = FlowMapTrainer(Student(), teacher, data, settings(steps=3))
    resumed.resume(tmp_path)
    assert resumed.step == 2
    with pytest.raises(FMTTInputError, match=r"other settings \(t_min=0.0\)"):
        FlowMapTrainer(Student(), teacher, data, settings(t_min=0.1)).resume(tmp_path)

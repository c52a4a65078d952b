"""MODEL_CARD.md, written from metrics.json by the training script (so the card always matches the weights)."""
from __future__ import annotations

from pathlib import Path

LOOKAHEADS = [("denoiser", "denoiser D (1 Euler step)"), ("euler_4", "Euler, 4 steps"),
              ("flow_map_1", "flow map, 1 jump"), ("flow_map_2", "flow map, 2 jumps"),
              ("flow_map_4", "flow map, 4 jumps")]


def lookahead_table(errors: dict, key: str, fmt: str) -> str:
    times = list(errors["table"])
    lines = ["| look-ahead X_{t,1} | " + " | ".join(f"t = {t}" for t in times) + " |",
             "|---|" + "---:|" * len(times)]
    for name, label in LOOKAHEADS:
        cells = [format(errors["table"][t][name][key], fmt) for t in times]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_model_card(m: dict, path: Path) -> None:
    cfg, err, base = m["config"], m["lookahead_error"], m["base_samples"]
    files = "\n".join(f"| `weights/{name}` | {info['bytes'] / 1e6:.2f} MB | `{info['sha256'][:16]}…` |"
                      for name, info in m["files"].items())
    total_mb = sum(info["bytes"] for info in m["files"].values()) / 1e6
    hist = " · ".join(f"{d}: {p:.1%}" for d, p in enumerate(base["judge_class_histogram"]))
    t = m["timings"]
    text = f"""# Model card: FMTT digits demo models

Small models that let `fmtt demo` run Flow Map Trajectory Tilting for real on a CPU, with nothing to
download. They are a test bed for the sampler, not useful digit models.

## How they were made

    {m.get("command", "python -m fmtt_demo.train --out fmtt_demo/weights --seed 0")}

Seed {cfg["seed"]}, {cfg["threads"]} CPU thread(s), torch {m["environment"]["torch"]}, Python
{m["environment"]["python"]} ({m["environment"]["machine"]}); {t.get("total_s", "?")} s in all (velocity {t["velocity_s"]} s,
flow map {t["flow_map_s"]} s, classifiers {t["classifiers_s"]} s, metrics {t["metrics_s"]} s). Every random draw comes
from a seeded generator and `torch.use_deterministic_algorithms(True)` is on, so a rerun on one machine
reproduces its own files bit for bit. `python -m fmtt_demo.train --seed 0` writes to `runs/digits-weights/`
(never over these files unless `--out fmtt_demo/weights` is given) and ends by comparing each file's sha256
with the table below.

**Which files a rerun reproduces.** `velocity.safetensors` and `flow_map.safetensors`: the same bytes (checked
with torch 2.14.1, Python 3.11.7, 1 thread, an AVX-512 x86-64 CPU). `classifier.safetensors` and
`judge.safetensors`: not the same bytes. Their training is deterministic on one machine (two runs of the judge gave
one hash) but its floating-point rounding depends on the CPU kernels torch and MKL choose: on that machine the
judge came out as four different files with torch's AVX-512 kernels (the default there), its AVX2 kernels
(`ATEN_CPU_CAPABILITY=avx2`), its generic kernels (`ATEN_CPU_CAPABILITY=default`) and MKL's compatible path
(`MKL_CBWR=COMPATIBLE`), none of them the shipped one, which came from a CPU whose kernels we could not select.
A retrained classifier and judge score the same held-out accuracies as the shipped ones (classifier
{m["classifier"]["accuracy_test"]:.2%}, judge {m["judge"]["accuracy_test"]:.2%} on the test split), but their weights differ
(judge: up to 0.1 in a parameter), so scores computed with them may differ slightly from the tables recorded with
these files. Whether the velocity and the flow map depend on the kernels too was not measured: with that
machine's default kernels they match the shipped bytes.

**Data.** scikit-learn's `load_digits` (1,797 greyscale 8x8 images of handwritten digits, ink levels
0..16, the UCI "Optical Recognition of Handwritten Digits" test set; it ships inside the scikit-learn
wheel). Pixels x = level / 8 - 1 in [-1, 1], no upsampling. Stratified split fixed by the seed:
train {m["splits"]["train"]} (generator and reward classifier), judge {m["splits"]["judge"]} (judge only),
test {m["splits"]["test"]} (held out from everything).

| file | size | sha256 |
|---|---:|---|
{files}

Total {total_mb:.1f} MB.

## The models

- **velocity** `VelocityNet`: residual MLP (width 256, 3 FiLM blocks on sin/cos time features),
  v(x, t) for x_t = (1 - t) x0 + t x1 (t = 0 noise, t = 1 data). Flow matching, target x1 - x0,
  t ~ U(0, 1), images dequantised within one ink level; AdamW, {cfg["velocity_steps"]} steps of
  {cfg["velocity_batch"]}, peak lr {cfg["velocity_lr"]}, cosine decay; the shipped weights are the EMA
  (decay {cfg["ema_decay"]}). Denoiser D(x, t) = x + (1 - t) v(x, t). Flow-matching loss: train
  {m["velocity"]["flow_matching_loss_train"]}, test {m["velocity"]["flow_matching_loss_test"]}.
- **flow_map** `FlowMapNet`: X(x, s, t) = x + (t - s) u(x, s, t), same trunk with (s, t - s) features,
  initialised at u(x, s, t) = v(x, s). Distilled from the velocity by trajectory regression: a pool of
  {cfg["trajectories"]} teacher solves (Heun, {cfg["teacher_steps"]} steps, from N(0, I)); pairs
  (x_s, x_t) on a trajectory, half with t = 1, teach u(x_s, s, t) = (x_t - x_s) / (t - s). AdamW,
  {cfg["flow_steps"]} steps of {cfg["flow_batch"]}, peak lr {cfg["flow_lr"]}, EMA.
- **classifier** `MLPClassifier` (the reward): MLP 64-128-128-10, train split, Gaussian-noise
  augmentation, label smoothing 0.05. Accuracy: test {m["classifier"]["accuracy_test"]:.1%},
  judge split {m["classifier"]["accuracy_judge_split"]:.1%}.
- **judge** `CNNJudge` (evaluation only): 3 conv layers + MLP head, trained on the judge split (which
  the reward never saw) with another seed, +-1 pixel shifts and noise. Accuracy: test
  {m["judge"]["accuracy_test"]:.1%}, train split {m["judge"]["accuracy_train_split"]:.1%}.

## Look-ahead error (the paper's figure-2 claim, measured)

{err["trajectories"]} fresh trajectories of the teacher ODE (Heun, {cfg["teacher_steps"]} steps, from
noise). At time t each look-ahead predicts the trajectory's end X_(t,1)(x_t); the error is the RMS pixel
difference to the teacher's own end point (pixels in [-1, 1]; the reference's own discretisation error,
Heun {cfg["teacher_steps"]} against {2 * cfg["teacher_steps"]} steps, is {err["teacher_self_error"]:.1e}).

{lookahead_table(err, "rms", ".3f")}

Fraction of predictions the judge puts in the same class as the teacher's end point:

{lookahead_table(err, "agreement", ".1%")}

At small t the denoiser predicts the blurry conditional mean, which is not a sample and often not even
the right digit; the flow map predicts the sample the ODE actually reaches. That is why FMTT's reward
look-ahead uses the flow map.

## Base samples

{base["samples"]} samples from the velocity's ODE ({base["sampler"]}): judge class histogram
{hist}. Mean judge confidence {base["judge_confidence_samples"]:.2f} (real test images:
{base["judge_confidence_real_test"]:.2f}); reward classifier and judge agree on
{base["classifier_judge_agreement"]:.1%} of them. Copying check: the median RMS distance from a sample to
its nearest training image is {base["nearest_train_rms_samples"]:.3f}, against
{base["nearest_train_rms_heldout_real"]:.3f} for real images the model never saw (a model that copied its
training set would sit near 0).

## Limits

8x8 digits from about a thousand training images: the generator is small and imperfect, and the reward
classifier can be fooled by adversarial pixels (that is what the separate judge is for). Use these
models to see how FMTT behaves, not as evidence about large image models.
"""
    Path(path).write_text(text)

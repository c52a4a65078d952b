"""Train the pair task's base velocity and flow map, deterministically, on a CPU in a few minutes.

    python -m fmtt_demo.pairs.train                       # -> runs/pairs-weights (a new folder)
    python -m fmtt_demo.pairs.train --out fmtt_demo/pairs/weights   # replace the shipped files

The recipe is the digits demo's (fmtt_demo.train), on 8x16 canvases of two digits drawn independently
from the "train" split: flow matching with an EMA for the velocity, then the flow map distilled by
regression on the velocity's own fine Heun trajectories. The reward classifier and the judge are the
digits demo's, applied to each half. Metrics (the judge's and the classifier's accuracy on held-out real
pairs, the base model's pair histogram under the judge) go to metrics.json next to the weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..data import split_digits
from ..models import FlowMapNet, VelocityNet, load_model, save_model
from ..ode import heun_trajectory
from ..train import TrainConfig, distill_flow_map, flow_matching_loss, set_determinism, sha256, train_velocity
from .constraints import PRESETS, constraint_table, judge_calls
from .data import CANVAS_SHAPE, random_pairs

DEFAULT_OUT = Path("runs/pairs-weights")
WIDTH, DEPTH = 192, 3   # stored as float16: ~1 MB per network, the two files near 2 MB in all
PAIR_FILES = ("velocity.safetensors", "flow_map.safetensors")


@dataclass
class PairTrainConfig(TrainConfig):
    train_pairs: int = 65536       # random pairs of train-split digits the velocity learns from
    velocity_steps: int = 8000
    trajectories: int = 4096
    eval_pairs: int = 4000


QUICK = dict(velocity_steps=60, trajectories=64, teacher_steps=8, flow_steps=40, train_pairs=512, eval_pairs=64)


def to_float16_grid(model):
    """Round the weights to float16 values (kept in float32): the files store float16 to halve their size."""
    return model.half().float()


@torch.no_grad()
def pair_accuracy(classifier, images, labels) -> float:
    """Fraction of real pairs whose two digits are both read correctly."""
    return float((judge_calls(classifier, images) == labels).all(1).float().mean())


@torch.no_grad()
def base_pair_rates(velocity, judge, cfg: PairTrainConfig, gen: torch.Generator) -> dict:
    """The base model's samples (Heun ODE, 64 steps) read by the judge: per-side digit histograms and the
    rate of each preset constraint."""
    x0 = torch.randn((cfg.eval_pairs, *CANVAS_SHAPE), generator=gen)
    _, states = heun_trajectory(velocity, x0, steps=64, keep_every=64)
    calls = judge_calls(judge, states[-1])
    hist = lambda c: [round(float(h), 4) for h in torch.bincount(c, minlength=10).float() / c.numel()]  # noqa: E731
    return {"samples": cfg.eval_pairs, "sampler": "heun_64 ODE",
            "judge_left_histogram": hist(calls[:, 0]), "judge_right_histogram": hist(calls[:, 1]),
            "constraint_rates": {name: round(float(constraint_table(name)[calls[:, 0], calls[:, 1]].float().mean()), 4)
                                 for name in PRESETS}}


def train_pairs(cfg: PairTrainConfig, out: Path, log=print) -> dict:
    set_determinism(cfg.seed, cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    splits = split_digits(0)  # the digits demo's split: its classifier and judge never saw "test"
    x_train, _ = random_pairs(*splits["train"], cfg.train_pairs, gen)
    timings = {}

    start = time.perf_counter()
    log("1/2 velocity (flow matching on random train-split pairs)")
    velocity = train_velocity(x_train, cfg, gen, log, model=VelocityNet(WIDTH, DEPTH, pixels=x_train[0].numel()))
    velocity = to_float16_grid(velocity)  # the flow map learns from, and the metrics score, what is shipped
    timings["velocity_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log("2/2 flow map (distillation from the velocity's ODE trajectories)")
    flow_map: FlowMapNet = to_float16_grid(distill_flow_map(velocity, cfg, gen, log, shape=CANVAS_SHAPE))
    timings["flow_map_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log("metrics")
    classifier, judge = load_model("classifier"), load_model("judge")
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1000)
    test_pairs = random_pairs(*splits["test"], cfg.eval_pairs, eval_gen)
    x_test, _ = random_pairs(*splits["test"], 2048, eval_gen)
    metrics = {
        "config": asdict(cfg), "architecture": {"width": WIDTH, "depth": DEPTH, "canvas": list(CANVAS_SHAPE)},
        "velocity": {"flow_matching_loss_train": round(flow_matching_loss(velocity, x_train[:2048], cfg.seed + 7), 4),
                     "flow_matching_loss_test": round(flow_matching_loss(velocity, x_test, cfg.seed + 7), 4)},
        "held_out_real_pairs": {"pairs": cfg.eval_pairs, "split": "test",
                                "judge_pair_accuracy": round(pair_accuracy(judge, *test_pairs), 4),
                                "classifier_pair_accuracy": round(pair_accuracy(classifier, *test_pairs), 4)},
        "base_samples": base_pair_rates(velocity, judge, cfg, eval_gen),
    }
    timings["metrics_s"] = time.perf_counter() - start

    save_model(copy.deepcopy(velocity).half(), out / PAIR_FILES[0], seed=cfg.seed, task="pairs")
    save_model(copy.deepcopy(flow_map).half(), out / PAIR_FILES[1], seed=cfg.seed, task="pairs")
    metrics["files"] = {name: {"sha256": sha256(out / name), "bytes": (out / name).stat().st_size}
                        for name in PAIR_FILES}
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "threads": cfg.threads}
    return metrics


def model_card(metrics: dict) -> str:
    """MODEL_CARD.md for the pair models, from their metrics.json."""
    cfg, arch, real, base = metrics["config"], metrics["architecture"], metrics["held_out_real_pairs"], \
        metrics["base_samples"]
    files = "\n".join(f"| `{name}` | {f['bytes'] / 1e6:.2f} MB | `{f['sha256'][:16]}…` |"
                      for name, f in metrics["files"].items())
    rates = " | ".join(f"{v:.1%}" for v in base["constraint_rates"].values())
    hist = lambda h: " ".join(f"{v:.0%}" for v in h)  # noqa: E731
    t = metrics["timings"]
    both = [a + b for a, b in zip(base["judge_left_histogram"], base["judge_right_histogram"])]
    top = f"{both.index(max(both))}, {max(both) / 2:.0%} of digits"
    return f"""# Model card: FMTT pair-task models

The base model of the two-digit task (`fmtt demo --task pairs`, bench/bench_pairs.py): canvases of two of
scikit-learn's 8x8 digits side by side (8x16 pixels in [-1, 1]). A test bed for samplers, not a useful
digit model.

## How they were made

    {metrics.get("command", "python -m fmtt_demo.pairs.train")}

Seed {cfg["seed"]}, {cfg["threads"]} CPU thread(s), torch {metrics["environment"]["torch"]}; {t.get("total_s", "?")} s
(velocity {t["velocity_s"]} s, flow map {t["flow_map_s"]} s). Seeded generators and deterministic algorithms:
the same command on the same torch build and thread count reproduces the files (compare the hashes).

**Data.** The digits demo's stratified split (fmtt_demo.data, seed 0). The base model learns from
{cfg["train_pairs"]} canvases whose two digits are drawn independently from the train split (1078 digits):
the law of a canvas is the product of two digit laws, so every ordered pair of classes is about equally likely.

| file | size | sha256 |
|---|---:|---|
{files}

Weights are stored as float16 (the metrics below are of the stored weights).

## The models

- **velocity** `VelocityNet(width={arch["width"]}, depth={arch["depth"]}, pixels=128)`, flow matching as in
  the digits demo: {cfg["velocity_steps"]} steps of {cfg["velocity_batch"]}, EMA {cfg["ema_decay"]}.
  Flow-matching loss: train {metrics["velocity"]["flow_matching_loss_train"]}, test pairs
  {metrics["velocity"]["flow_matching_loss_test"]}.
- **flow_map** `FlowMapNet`, the same trunk, distilled with the digits recipe (fmtt_demo.train): {cfg["trajectories"]}
  teacher solves (Heun, {cfg["teacher_steps"]} steps), {cfg["flow_steps"]} steps of {cfg["flow_batch"]}, EMA.
- **reward classifier** and **judge**: the digits demo's (fmtt_demo/weights, see fmtt_demo/MODEL_CARD.md), applied
  to each half. The reward is an MLP trained on the train split; the judge a CNN trained on the judge split with
  another seed. Neither saw the test split.

## Measured

- Held-out real pairs ({real["pairs"]} canvases of test-split digits): the judge reads both digits right on
  {real["judge_pair_accuracy"]:.1%}, the reward classifier on {real["classifier_pair_accuracy"]:.1%}.
- Base samples ({base["samples"]}, {base["sampler"]}) read by the judge. Left digit:
  {hist(base["judge_left_histogram"])} (classes 0..9); right: {hist(base["judge_right_histogram"])}. Constraint rates:

| sum10 | same | pair38 | left_larger5 |
|---:|---:|---:|---:|
| {rates} |

Uniform independent digits would give 9%, 10%, 1%, 15%; the base model's own class frequencies (its most
frequent digit is {top}) set its rates.
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmtt_demo.pairs.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the two safetensors + metrics.json (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test, not a model)")
    args = parser.parse_args(argv)
    cfg = PairTrainConfig(seed=args.seed, threads=args.threads, **(QUICK if args.quick else {}))
    start = time.perf_counter()
    metrics = train_pairs(cfg, args.out)
    metrics["timings"]["total_s"] = round(time.perf_counter() - start, 1)
    metrics["command"] = "python -m fmtt_demo.pairs.train " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(metrics))
    print(f"done in {metrics['timings']['total_s']:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

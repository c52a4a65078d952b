"""Train the digits demo's models from scratch, deterministically, on a CPU in a few minutes.

    python -m fmtt_demo.train --seed 0                       # writes runs/digits-weights/
    python -m fmtt_demo.train --seed 0 --out fmtt_demo/weights  # replaces the shipped weights (says so)

1. velocity   v(x, t) by flow matching on the "train" split (x_t = (1 - t) x0 + t x1, target x1 - x0),
              with an exponential moving average of the weights (the EMA is shipped).
2. flow_map   X(x, s, t) = x + (t - s) u(x, s, t), distilled from the velocity by regression on its own
              trajectories: a pool of fine Heun solves of dx/dt = v from noise; pairs (x_s, x_t) on one
              trajectory teach u(x_s, s, t) = (x_t - x_s) / (t - s). Initialised at u(x, s, t) = v(x, s).
3. classifier the reward's MLP classifier, on the "train" split (Gaussian-noise augmentation).
4. judge      a CNN on the disjoint "judge" split, another seed, shift + noise augmentation.
Then metrics (held-out accuracies, look-ahead errors against the teacher's fine ODE solve, the base
model's class histogram) go to metrics.json and MODEL_CARD.md.

Determinism: seeded generators for every random draw, torch.use_deterministic_algorithms, and a
fixed thread count (--threads, default 1): a rerun in one environment reproduces its own weights bit for
bit. Whether it reproduces the *shipped* files is checked at the end of every run, file by file (see the
model card for which files depend on more than the command).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import SPLIT_FRACTIONS, split_digits
from .models import WEIGHT_FILES, WEIGHTS_DIR, CNNJudge, FlowMapNet, MLPClassifier, VelocityNet, save_model
from .ode import heun_endpoint, heun_trajectory

LEVEL = 1.0 / 8.0  # one ink level in pixel units


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1
    velocity_steps: int = 6000
    velocity_batch: int = 256
    velocity_lr: float = 1e-3
    ema_decay: float = 0.999
    trajectories: int = 4096       # teacher ODE solves in the distillation pool
    teacher_steps: int = 64        # Heun steps of each solve ("fine"); every state is kept
    flow_steps: int = 4000
    flow_batch: int = 256
    flow_lr: float = 5e-4
    classifier_steps: int = 1500
    judge_steps: int = 1500
    eval_trajectories: int = 1024
    eval_samples: int = 2000


QUICK = dict(velocity_steps=60, trajectories=64, teacher_steps=8, flow_steps=40, classifier_steps=40,
             judge_steps=40, eval_trajectories=32, eval_samples=64)


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _optimise(model, steps, lr, loss_fn, ema=None, ema_decay=0.999, weight_decay=0.0, log=None, name=""):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(200, steps // 10 + 1))
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - ema_decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  {name} step {step + 1}/{steps}  loss {running:.4f}")
    return running


# ------------------------------------------------------------------------------------ 1. velocity

def train_velocity(x_train: torch.Tensor, cfg: TrainConfig, gen: torch.Generator, log=print,
                   model: VelocityNet | None = None) -> VelocityNet:
    model = model or VelocityNet()
    ema = copy.deepcopy(model).requires_grad_(False)
    n, b = x_train.shape[0], cfg.velocity_batch

    def loss_fn():
        x1 = x_train[torch.randint(n, (b,), generator=gen)]
        x1 = x1 + LEVEL * (torch.rand(x1.shape, generator=gen) - 0.5)  # dequantise within one ink level
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(b, generator=gen)
        xt = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * x1
        return F.mse_loss(model(xt, t), x1 - x0)

    _optimise(model, cfg.velocity_steps, cfg.velocity_lr, loss_fn, ema, cfg.ema_decay, log=log, name="velocity")
    return ema.eval()


@torch.no_grad()
def flow_matching_loss(velocity, images: torch.Tensor, seed: int, repeats: int = 8) -> float:
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        x1 = images
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(x1.shape[0], generator=gen)
        xt = (1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * x1
        total += F.mse_loss(velocity(xt, t), x1 - x0).item()
    return total / repeats


# ------------------------------------------------------------------------------------ 2. flow map

def teacher_pool(velocity, cfg: TrainConfig, gen: torch.Generator, shape=(1, 8, 8)):
    x0 = torch.randn((cfg.trajectories, *shape), generator=gen)
    return heun_trajectory(velocity, x0, steps=cfg.teacher_steps)


def distill_flow_map(velocity: VelocityNet, cfg: TrainConfig, gen: torch.Generator, log=print,
                     shape=(1, 8, 8)) -> FlowMapNet:
    times, states = teacher_pool(velocity, cfg, gen, shape)   # [M], [M, N, *shape]
    times = times.float()
    m, n = states.shape[0], states.shape[1]
    model = FlowMapNet(**velocity.config)
    model.init_from_velocity(velocity)
    ema = copy.deepcopy(model).requires_grad_(False)
    b = cfg.flow_batch

    def loss_fn():
        traj = torch.randint(n, (b,), generator=gen)
        i = torch.randint(m - 1, (b,), generator=gen)
        # Half the pairs end at t = 1 (the look-ahead FMTT asks for), half anywhere after s.
        j_any = i + 1 + (torch.rand(b, generator=gen) * (m - 1 - i)).long()
        j = torch.where(torch.rand(b, generator=gen) < 0.5, torch.full_like(i, m - 1), j_any)
        xs, xt, s, t = states[i, traj], states[j, traj], times[i], times[j]
        target = (xt - xs) / (t - s).view(-1, 1, 1, 1)
        return F.mse_loss(model.average_velocity(xs, s, t), target)

    _optimise(model, cfg.flow_steps, cfg.flow_lr, loss_fn, ema, cfg.ema_decay, log=log, name="flow map")
    return ema.eval()


# ------------------------------------------------------------------------------------ 3-4. classifiers

def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with background (-1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(3, (2, x.shape[0]), generator=gen)
    rows = (dy.view(-1, 1) + torch.arange(8)).view(-1, 1, 8, 1).expand(-1, 1, 8, 10)
    padded = padded.gather(2, rows)
    cols = (dx.view(-1, 1) + torch.arange(8)).view(-1, 1, 1, 8).expand(-1, 1, 8, 8)
    return padded.gather(3, cols)


def train_classifier(model, images, labels, steps: int, gen: torch.Generator, *, shift: bool,
                     noise: float = 0.15, log=print, name="classifier"):
    n, b = images.shape[0], 128

    def loss_fn():
        idx = torch.randint(n, (b,), generator=gen)
        x = images[idx] + LEVEL * (torch.rand((b, 1, 8, 8), generator=gen) - 0.5)
        if shift:
            x = random_shift(x, gen)
        x = x + noise * torch.rand((b, 1, 1, 1), generator=gen) * torch.randn(x.shape, generator=gen)
        return F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)

    model.train()
    _optimise(model, steps, 2e-3, loss_fn, weight_decay=1e-4, log=log, name=name)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def accuracy(model, images, labels) -> float:
    return float((model(images).argmax(1) == labels).float().mean())


# ------------------------------------------------------------------------------------ metrics

def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square pixel error, averaged over the batch (pixels in [-1, 1])."""
    return float((a - b).flatten(1).pow(2).mean(1).sqrt().mean())


@torch.no_grad()
def lookahead_errors(velocity, flow_map, judge, cfg: TrainConfig, gen: torch.Generator) -> dict:
    """Error of X_{t,1}(x_t) against the teacher's fine ODE solve (Heun, cfg.teacher_steps), on fresh
    trajectories, for the denoiser (= 1 Euler step), Euler with 4 steps, and the flow map with 1/2/4 jumps.
    `agreement`: fraction of look-ahead predictions the judge gives the same class as the teacher's end."""
    x0 = torch.randn((cfg.eval_trajectories, 1, 8, 8), generator=gen)
    times, states = heun_trajectory(velocity, x0, steps=cfg.teacher_steps, keep_every=1)
    end = states[-1]
    end_class = judge(end).argmax(1)
    denoise = lambda x, t: x + (1 - t) * velocity(x, t)  # noqa: E731

    def euler(x, t, k):
        for j in range(k):
            tj = t + (1 - t) * j / k
            x = x + (1 - t) / k * velocity(x, tj)
        return x

    def jumps(x, t, k):
        for j in range(k):
            x = flow_map(x, t + (1 - t) * j / k, t + (1 - t) * (j + 1) / k)
        return x

    table = {}
    for t in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9):
        k = int(round(t * cfg.teacher_steps))
        x, tt = states[k], float(times[k])
        preds = {"denoiser": denoise(x, tt), "euler_4": euler(x, tt, 4),
                 "flow_map_1": jumps(x, tt, 1), "flow_map_2": jumps(x, tt, 2), "flow_map_4": jumps(x, tt, 4)}
        table[f"{t:g}"] = {name: {"rms": round(rms(p, end), 4),
                                  "agreement": round(float((judge(p).argmax(1) == end_class).float().mean()), 4)}
                           for name, p in preds.items()}
    # Precision of the "fine" reference itself: Heun 128 against Heun 256 steps from t = 0.
    ref2 = heun_endpoint(velocity, x0, 0.0, steps=2 * cfg.teacher_steps)
    return {"table": table, "teacher_self_error": round(rms(end, ref2), 6),
            "trajectories": cfg.eval_trajectories, "teacher": f"heun_{cfg.teacher_steps}"}


@torch.no_grad()
def sample_quality(velocity, judge, classifier, splits, cfg: TrainConfig, gen: torch.Generator) -> dict:
    real_test = splits["test"][0]
    x0 = torch.randn((cfg.eval_samples, 1, 8, 8), generator=gen)
    _, states = heun_trajectory(velocity, x0, steps=64, keep_every=64)
    x = states[-1]
    probs = judge(x).softmax(1)
    hist = torch.bincount(probs.argmax(1), minlength=10).float() / x.shape[0]
    real_conf = float(judge(real_test).softmax(1).max(1).values.mean())
    return {"samples": cfg.eval_samples, "sampler": "heun_64 ODE",
            "judge_class_histogram": [round(float(h), 4) for h in hist],
            "judge_confidence_samples": round(float(probs.max(1).values.mean()), 4),
            "judge_confidence_real_test": round(real_conf, 4),
            "classifier_judge_agreement": round(float((classifier(x).argmax(1) == probs.argmax(1)).float().mean()), 4),
            "pixel_range": [round(float(x.min()), 3), round(float(x.max()), 3)],
            **memorisation(x, splits)}


def memorisation(samples: torch.Tensor, splits: dict) -> dict:
    """Median RMS distance to the nearest training image: for samples, and for held-out real images.
    A model that copied its training set would put its samples much closer than the held-out images."""
    x_train = splits["train"][0].flatten(1)
    nearest = lambda x: torch.cdist(x.flatten(1), x_train).min(1).values / 8  # noqa: E731  (RMS over 64 px)
    return {"nearest_train_rms_samples": round(float(nearest(samples).median()), 4),
            "nearest_train_rms_heldout_real":
                round(float(nearest(torch.cat([splits["judge"][0], splits["test"][0]])).median()), 4)}


# ------------------------------------------------------------------------------------ main

def set_determinism(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_all(cfg: TrainConfig, out: Path, log=print) -> dict:
    set_determinism(cfg.seed, cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    splits = split_digits(cfg.seed)
    x_train, y_train = splits["train"]
    x_judge, y_judge = splits["judge"]
    x_test, y_test = splits["test"]
    timings = {}

    start = time.perf_counter()
    log("1/4 velocity (flow matching)")
    velocity = train_velocity(x_train, cfg, gen, log)
    timings["velocity_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log("2/4 flow map (distillation from the velocity's ODE trajectories)")
    flow_map = distill_flow_map(velocity, cfg, gen, log)
    timings["flow_map_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log("3/4 reward classifier (MLP, train split)")
    torch.manual_seed(cfg.seed + 1)
    classifier = train_classifier(MLPClassifier(), x_train, y_train, cfg.classifier_steps, gen, shift=False,
                                  log=log, name="classifier")
    log("4/4 judge (CNN, judge split, other seed)")
    torch.manual_seed(cfg.seed + 2)
    judge_gen = torch.Generator().manual_seed(cfg.seed + 2)
    judge = train_classifier(CNNJudge(), x_judge, y_judge, cfg.judge_steps, judge_gen, shift=True,
                             log=log, name="judge")
    timings["classifiers_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log("metrics")
    eval_gen = torch.Generator().manual_seed(cfg.seed + 1000)
    metrics = {
        "config": asdict(cfg),
        "splits": {name: int(splits[name][1].numel()) for name in SPLIT_FRACTIONS},
        "velocity": {"flow_matching_loss_train": round(flow_matching_loss(velocity, x_train, cfg.seed + 7), 4),
                     "flow_matching_loss_test": round(flow_matching_loss(velocity, x_test, cfg.seed + 7), 4)},
        "classifier": {"accuracy_test": round(accuracy(classifier, x_test, y_test), 4),
                       "accuracy_judge_split": round(accuracy(classifier, x_judge, y_judge), 4)},
        "judge": {"accuracy_test": round(accuracy(judge, x_test, y_test), 4),
                  "accuracy_train_split": round(accuracy(judge, x_train, y_train), 4)},
        "lookahead_error": lookahead_errors(velocity, flow_map, judge, cfg, eval_gen),
        "base_samples": sample_quality(velocity, judge, classifier, splits, cfg, eval_gen),
    }
    timings["metrics_s"] = time.perf_counter() - start

    for kind, model in (("velocity", velocity), ("flow_map", flow_map), ("classifier", classifier), ("judge", judge)):
        save_model(model, out / WEIGHT_FILES[kind], seed=cfg.seed)
    metrics["files"] = {WEIGHT_FILES[k]: {"sha256": sha256(out / WEIGHT_FILES[k]),
                                          "bytes": (out / WEIGHT_FILES[k]).stat().st_size} for k in WEIGHT_FILES}
    metrics["timings"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                              "machine": platform.machine(), "threads": cfg.threads}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


DEFAULT_OUT = Path("runs") / "digits-weights"  # git-ignored; never the shipped weights unless asked for


def compare_with_shipped(files: dict, shipped: dict) -> list[str]:
    """One line per weight file: whether this run reproduced the shipped file (metrics.json's "files")."""
    lines = []
    for name, info in files.items():
        ref = shipped.get(name, {}).get("sha256")
        verdict = "no shipped file" if ref is None else "same as shipped" if ref == info["sha256"] else \
            f"differs from shipped ({ref[:12]}...)"
        lines.append(f"  {name}: {info['sha256'][:12]}... {verdict}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fmtt_demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"folder for the safetensors + metrics.json (default {DEFAULT_OUT}; give "
                             f"fmtt_demo/weights to replace the shipped weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads, fixed for reproducibility (default 1)")
    parser.add_argument("--quick", action="store_true", help="a few steps of each stage (smoke test, not a model)")
    parser.add_argument("--model-card", type=Path, default=None,
                        help="also write the model card here (default: MODEL_CARD.md next to --out's parent "
                             "when --out is the package's weights folder)")
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, threads=args.threads, **(QUICK if args.quick else {}))
    replacing = args.out.resolve() == WEIGHTS_DIR
    # Read before a run into the shipped folder overwrites them: the comparison is against what shipped.
    shipped_metrics = WEIGHTS_DIR / "metrics.json"
    shipped = json.loads(shipped_metrics.read_text())["files"] if shipped_metrics.is_file() else None
    print(f"training into {args.out}" + (" (replacing the shipped weights)" if replacing else
                                         f"; the shipped weights in {WEIGHTS_DIR} stay as they are"))
    start = time.perf_counter()
    metrics = train_all(cfg, args.out)
    total = time.perf_counter() - start
    metrics["timings"]["total_s"] = round(total, 1)
    metrics["command"] = "python -m fmtt_demo.train " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    card = args.model_card
    if card is None and args.out.resolve() == WEIGHTS_DIR:
        card = WEIGHTS_DIR.parent / "MODEL_CARD.md"
    if card is not None:
        from .model_card import write_model_card
        write_model_card(metrics, card)
    print(f"done in {total:.0f} s -> {args.out}")
    if shipped is not None and not args.quick:
        print("\n".join(["sha256 against the shipped weights:"] + compare_with_shipped(metrics["files"], shipped)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fmtt demo`: FMTT against its baselines on the bundled digits models, on a CPU, with nothing to download.

    fmtt demo                               # steer toward digit 3, every method at a matched budget
    fmtt demo --target-class 7 --particles 128 --steps 60 --seed 1 --out runs/seven
    fmtt demo --reward symmetry             # a reward with no classifier at all: mirror symmetry
    fmtt demo --mode search                 # base sampling against one FMTT mode only
    torchrun --nproc-per-node 2 -m fmtt_demo.cli demo   # each population sharded over 2 processes, same table

Writes OUT/samples.png, OUT/traces.png, OUT/results.json and OUT/results.md and prints the comparison table.
Needs the pack's "demo" extra (pip install "comfyui-fmtt[demo]").
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmtt_core import time_grid

from .methods import (
    DEFAULT_METHODS,
    METHODS,
    MethodRun,
    Setup,
    evaluate,
    make_x_init,
    matched_particles,
    network_passes,
)
from .models import load_digit_models
from .report import format_table, write_results
from .rewards import REWARDS, make_reward

MODES = ("compare", "exact", "search", "zero_order")
# beta: log p(c|x) lies in [-5.3, 0] (the classifier was trained with label smoothing), the symmetry
# reward mostly in [-0.2, 0]; these make the tilt decisive without saturating it.
DEFAULT_REWARD_SCALE = {"classifier": 4.0, "symmetry": 100.0}
DEFAULT_SAMPLES = 16  # handed on per method; fewer when there are fewer particles


# What the demo imports beyond the pack's own dependencies: the "demo" extra (pyproject.toml).
DEMO_EXTRA = {"tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "pillow"}


def missing_demo_packages(modules=DEMO_EXTRA) -> list[str]:
    """The pip names of the demo's optional dependencies that do not import."""
    missing = []
    for module, package in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def check_out_folder(out: Path) -> None:
    """Fail before any work if OUT cannot hold the results (an existing file, a read-only place)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; give a folder (it is created if missing).")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}); give a folder you can write to.") from e


def methods_for(mode: str, methods: str | None) -> list[str]:
    if methods:
        keys = [k.strip() for k in methods.split(",") if k.strip()]
        unknown = [k for k in keys if k not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
        return keys
    if mode == "compare":
        return list(DEFAULT_METHODS)
    return ["base", f"fmtt_{mode}"]


def run_demo(*, target_class: int = 3, reward: str = "classifier", particles: int = 64, samples: int | None = None,
             steps: int = 40, mode: str = "compare", methods: str | None = None, reward_scale: float | None = None,
             eta: float = 1.0, jumps: int = 1, seed: int = 0, weights: Path | None = None,
             progress: bool = True, sharded: bool = False) -> tuple[list[MethodRun], dict]:
    """Run the comparison; returns the runs and the settings (everything results.json records)."""
    if steps < MIN_STEPS:
        raise ValueError(f"--steps {steps} is fewer than {MIN_STEPS}: the first step leaves noise untilted and the "
                         "last jumps onto the denoiser, so nothing would be steered; use 10 or more.")
    keys = methods_for(mode, methods)
    samples = min(DEFAULT_SAMPLES, particles) if samples is None else samples
    if samples > particles:
        raise ValueError(f"--samples {samples} is more than --particles {particles}: FMTT hands on at most its "
                         "particles; raise --particles or lower --samples.")
    models = load_digit_models(weights)
    scale = DEFAULT_REWARD_SCALE[reward] if reward_scale is None else reward_scale
    setup = Setup(models, make_reward(reward, models, target_class), reward_scale=scale, eta=eta, jumps=jumps,
                  sharded=sharded)
    times = time_grid(steps)
    settings = {"target_class": target_class if reward == "classifier" else None, "reward": reward,
                "reward_description": str(setup.reward), "reward_scale": scale, "particles": particles,
                "samples_handed_on": samples, "steps": steps, "eta": eta, "jumps": jumps, "seed": seed,
                "methods": keys, "budget_rule": "matched network passes to FMTT exact (flow map) with `particles`"}
    if sharded:
        import torch.distributed as dist
        settings["processes"] = dist.get_world_size()

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(keys) * steps, unit="step", file=sys.stderr, dynamic_ncols=True)
    runs = []
    try:
        for key in keys:
            method = METHODS[key]
            n = matched_particles(method, setup, particles)
            if bar is not None:
                bar.set_description(f"{method.label} (N={n})")
            start = time.perf_counter()
            result = method.run(setup, make_x_init(n, seed), times, seed,
                                callback=(lambda info: bar.update(1)) if bar is not None else None)
            seconds = time.perf_counter() - start
            metrics = evaluate(method, result, models, samples, settings["target_class"])
            runs.append(MethodRun(method, n, result, seconds, network_passes(result), metrics))
    finally:
        if bar is not None:
            bar.close()
    return runs, settings


MIN_STEPS = 3  # the first step starts from noise untilted and the last jumps onto D: a tilt needs a step between


def _number(kind, minimum: float, strict: bool = False):
    """An argparse type: a `kind` (int or float) >= minimum (> when strict), with a message naming the rule."""
    noun = "a whole number" if kind is int else "a number"
    rule = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {rule}, got {text!r}") from None
        if value < minimum or (strict and value == minimum) or value != value:  # value != value: NaN
            raise argparse.ArgumentTypeError(f"must be {noun} {rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmtt", description="Flow Map Trajectory Tilting tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FMTT vs baselines on the bundled digits models (CPU, offline)",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.demo_parser = demo  # main() reports errors found after parsing with the demo's own usage
    demo.add_argument("--task", choices=("digits", "pairs"), default="digits",
                      help="digits: one 8x8 digit; pairs: two digits side by side, steered toward --constraint "
                           "(fmtt_demo.pairs) (default %(default)s)")
    demo.add_argument("--constraint", default=None,
                      help="with --task pairs: a preset (sum10, same, pair38, left_larger5) or an expression in a "
                           "(left digit) and b (right digit), e.g. \"a + b == 10\" (default sum10)")
    demo.add_argument("--target-class", type=int, default=3, choices=range(10), metavar="{0..9}",
                      help="digit to steer toward with the classifier reward (default %(default)s)")
    demo.add_argument("--reward", choices=REWARDS, default="classifier",
                      help="classifier: log p(class | x); symmetry: left-right mirror symmetry, no model "
                           "(default %(default)s)")
    demo.add_argument("--particles", type=_number(int, 1), default=64,
                      help="FMTT's particles; every other method gets the particle count of the same budget "
                           "(default %(default)s)")
    demo.add_argument("--samples", type=_number(int, 1), default=None,
                      help=f"samples each method hands on and is scored on, at most --particles (default "
                           f"{DEFAULT_SAMPLES}, or --particles if fewer): draws from the final weights, the top ones "
                           "by reward for best-of-N and search")
    demo.add_argument("--steps", type=_number(int, MIN_STEPS), default=40,
                      help=f"sampler steps from t=0 to t=1, at least {MIN_STEPS} (default %(default)s)")
    demo.add_argument("--mode", choices=MODES, default="compare",
                      help="compare: every method side by side; exact / search / zero_order: base sampling against "
                           "that FMTT mode only (default %(default)s)")
    demo.add_argument("--methods", default=None,
                      help=f"comma-separated subset, overrides --mode: {', '.join(METHODS)}")
    demo.add_argument("--reward-scale", type=_number(float, 0), default=None,
                      help="beta >= 0, the tilt's strength (default " +
                           ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_REWARD_SCALE.items()) + ")")
    demo.add_argument("--eta", type=_number(float, 0), default=1.0,
                      help="SDE noise >= 0, eps_t = eta (1 - t) (default %(default)s)")
    demo.add_argument("--jumps", type=_number(int, 1), default=1,
                      help="flow-map jumps per look-ahead (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the initial noise and of every sampler's randomness (default %(default)s)")
    demo.add_argument("--out", type=Path, default=Path("fmtt_out"), help="output folder (default %(default)s)")
    demo.add_argument("--weights", type=Path, default=None,
                      help="folder with other trained weights (default: the weights shipped in fmtt_demo/weights)")
    demo.add_argument("--threads", type=_number(int, 1), default=1,
                      help="torch CPU threads (default %(default)s: the networks are tiny, more threads only add "
                           "overhead)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument("--dist-timeout", type=_number(float, 0, strict=True), default=120.0,
                      help="under torchrun: seconds a collective waits for the other processes before the run "
                           "stops with an error (default %(default)s)")
    add_distill_parser(sub)
    return parser


def add_distill_parser(sub) -> None:
    from .distill import DEFAULT_OUT, DIGITS_DEFAULTS
    from .distill import __doc__ as distill_doc

    d = DIGITS_DEFAULTS
    p = sub.add_parser("distill", help="distil the digits velocity model into a two-time flow map (CPU)",
                       description=distill_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"new output folder (default {DEFAULT_OUT})")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (state.safetensors)")
    p.add_argument("--weights", type=Path, default=None, help="folder with the teacher (default: the bundled one)")
    p.add_argument("--objective", choices=("lsd", "psd"), default=d["objective"],
                   help="lsd: Lagrangian self-distillation with a finite-difference d/dt (default); psd: "
                        "progressive self-distillation plus the diagonal velocity match")
    p.add_argument("--steps", type=_number(int, 1), default=d["steps"], help=f"total steps (default {d['steps']})")
    p.add_argument("--batch", type=_number(int, 1), default=d["batch"],
                   help=f"global batch, split over torchrun processes (default {d['batch']})")
    p.add_argument("--accumulate", type=_number(int, 1), default=1,
                   help="micro-batches per step on each process (gradient accumulation): the same global batch in "
                        "--accumulate forward / backward passes, for less memory (default 1)")
    p.add_argument("--lr", type=_number(float, 0, strict=True), default=d["lr"],
                   help=f"AdamW learning rate (default {d['lr']})")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"],
                   help=f"EMA of the weights that is saved (default {d['ema_decay']}; 0 = off)")
    p.add_argument("--derivative-warmup", type=int, default=d["derivative_warmup_steps"],
                   help=f"steps over which the d/dt term ramps in (default {d['derivative_warmup_steps']})")
    p.add_argument("--fd-step", type=_number(float, 0, strict=True), default=d["fd_step"],
                   help=f"finite-difference step of d/dt (default {d['fd_step']})")
    p.add_argument("--derivative-grad", action=argparse.BooleanOptionalAction, default=d["derivative_grad"],
                   help="LSD: differentiate through the finite difference too, the residual's own gradient (default "
                        "on); --no-derivative-grad: FMRG's detached d/dt (fewer backward passes, diverged here)")
    p.add_argument("--min-gap", type=float, default=d["min_gap"], help="minimum |t - s| of a time pair")
    p.add_argument("--both-directions", action="store_true",
                   help="train s > t pairs too (FMRG's draw); default: s <= t, the jumps FMTT makes")
    p.add_argument("--norm", choices=("l1", "l2"), default=d["norm"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--save-every", type=int, default=d["save_every"],
                   help=f"steps between resumable saves (default {d['save_every']})")
    p.add_argument("--log-every", type=_number(int, 1), default=d["log_every"])
    p.add_argument("--eval-trajectories", type=_number(int, 1), default=1024,
                   help="held-out teacher trajectories for the final look-ahead errors (default 1024)")
    p.add_argument("--threads", type=_number(int, 1), default=1, help="torch CPU threads (default 1)")
    p.add_argument("--dist-timeout", type=_number(float, 0, strict=True), default=120.0,
                   help="under torchrun: seconds a collective waits for the other processes (default 120)")


def run_distill(parser, args) -> int:
    from fmtt_core.distributed import init_from_env
    from fmtt_core.flow_maps import DistillSettings

    from .distill import DIGITS_DEFAULTS, distill_digits, summary_table

    torch.set_num_threads(args.threads)
    settings = DistillSettings(**{
        **DIGITS_DEFAULTS, "objective": args.objective, "steps": args.steps, "batch": args.batch,
        "accumulate": args.accumulate, "lr": args.lr,
        "ema_decay": args.ema_decay, "derivative_warmup_steps": args.derivative_warmup, "fd_step": args.fd_step,
        "derivative_grad": args.derivative_grad,
        "min_gap": args.min_gap, "both_directions": args.both_directions, "norm": args.norm, "seed": args.seed,
        "save_every": args.save_every, "log_every": args.log_every})
    group = init_from_env(timeout_s=args.dist_timeout)
    rank = group.rank() if group is not None else 0
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        metrics = distill_digits(args.out, settings=settings, weights=args.weights, resume=args.resume,
                                 eval_trajectories=args.eval_trajectories, log=log)
    except (ValueError, FileNotFoundError) as e:  # fmtt_core's FMTTInputError is a ValueError
        parser.error(str(e))
    if metrics is not None:
        print(f"\nlook-ahead RMS to the teacher's fine ODE end point ({args.eval_trajectories} held-out "
              "trajectories):\n" + summary_table(metrics))
        print(f"\nwrote {args.out}/flow_map.safetensors, state.safetensors, metrics.json; run FMTT with it: "
              f"fmtt demo --weights {args.out}")
    if group is not None:
        from fmtt_core.distributed import leave
        leave(0)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "distill":
        return run_distill(parser, args)
    if args.command == "demo":
        missing = missing_demo_packages()
        if missing:
            parser.demo_parser.exit(2, f"fmtt demo needs the pack's \"demo\" extra, which is not installed (missing: "
                           f"{', '.join(missing)}). Install it with:\n    pip install \"comfyui-fmtt[demo]\"\n"
                           "(from a clone of the repository: pip install -e \".[demo]\")\n")
        torch.set_num_threads(args.threads)  # said in the header: the default is 1, not torch's all-cores
        # Under torchrun (RANK / WORLD_SIZE set) every population is sharded over the processes.
        from fmtt_core.distributed import FMTTDistributedError, init_from_env
        group = init_from_env(timeout_s=args.dist_timeout)
        rank = group.rank() if group is not None else 0
        try:
            check_out_folder(args.out)
            if args.task == "pairs":
                if group is not None:
                    raise ValueError("--task pairs runs in one process; start it without torchrun.")
                from .pairs.cli import headline, run_from_args
                runs, settings = run_from_args(args)
                print(headline(settings) + "\n" + format_table(runs, None, settings["samples_handed_on"]))
                paths = write_results(runs, settings, args.out)
                print("\nwrote " + ", ".join(str(p) for p in paths.values()))
                return 0
            runs, settings = run_demo(
                target_class=args.target_class, reward=args.reward, particles=args.particles, samples=args.samples,
                steps=args.steps, mode=args.mode, methods=args.methods, reward_scale=args.reward_scale, eta=args.eta,
                jumps=args.jumps, seed=args.seed, weights=args.weights, progress=not args.no_progress and rank == 0,
                sharded=group is not None)
        except (ValueError, FileNotFoundError) as e:  # fmtt_core's FMTTInputError is a ValueError
            parser.demo_parser.error(str(e))
        except FMTTDistributedError as e:
            print(f"fmtt demo: {e}", file=sys.stderr)
            return 1
        if rank == 0:  # every rank holds the same results; one prints and writes them
            target = settings["target_class"]
            shards = f" sharded over {settings['processes']} processes" if "processes" in settings else ""
            print(f"\nFMTT digits demo{shards}: reward {settings['reward_description']}, beta "
                  f"{settings['reward_scale']}, {settings['steps']} steps, seed {settings['seed']}; particles matched "
                  f"to FMTT exact's budget with N={settings['particles']}; {args.threads} torch thread(s) "
                  "(--threads).\n")
            print(format_table(runs, target, settings["samples_handed_on"]))
            paths = write_results(runs, settings, args.out)
            print("\nwrote " + ", ".join(str(p) for p in paths.values()))
        if group is not None:
            from fmtt_core.distributed import leave
            leave(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

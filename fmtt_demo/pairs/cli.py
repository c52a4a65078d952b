"""`fmtt demo --task pairs`: the two-digit task from the demo's command line (arguments in fmtt_demo.cli)."""
from __future__ import annotations

from .task import DEFAULT_CONSTRAINT, PAIR_METHODS, run_pairs


def run_from_args(args):
    """The runs and settings for parsed `fmtt demo` arguments (digits-only options are ignored)."""
    methods = [k.strip() for k in args.methods.split(",") if k.strip()] if args.methods else PAIR_METHODS
    return run_pairs(constraint=args.constraint or DEFAULT_CONSTRAINT, particles=args.particles,
                     samples=args.samples, steps=args.steps, methods=methods, reward_scale=args.reward_scale,
                     eta=args.eta, jumps=args.jumps, seed=args.seed, weights=args.weights,
                     progress=not args.no_progress)


def headline(settings: dict) -> str:
    return (f"\nFMTT pairs demo: constraint {settings['constraint_expression']} (a left, b right; "
            f"{settings['uniform_pair_rate']:.0%} of uniform pairs), reward {settings['reward_description']}, "
            f"beta {settings['reward_scale']}, {settings['steps']} steps, seed {settings['seed']}; particles "
            f"matched to FMTT exact's budget with N={settings['particles']}. 'judge acc' = the judge reads a pair "
            "that satisfies the constraint.\n")

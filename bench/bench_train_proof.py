"""Longer runs of FMTT Train Flow Map on the tiny SD3 (MMDiT) and Z-Image (NextDiT) test models (default; also
SD1.5 / SDXL with --families sd15 sdxl --noise-to-data): does training lower
the held-out objective and the 1 / 2 / 4-jump look-ahead errors, and how do they move with the steps?

GPU run (the lead, once, H200; ~3 minutes in all: 60 s of training per family plus loading; each family stops at its
step count or its time budget, whichever comes first, and keeps every evaluation made so far):

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_train_proof.py --device cuda --steps 2000 --every 250 --seconds 60

CPU (a few minutes):

    COMFYUI_PATH=/work/comfyui /work/comfy-venv/bin/python bench/bench_train_proof.py --steps 200 --every 50

The node's own code path (nodes/flow_map_training.train: ComfyUI's sampler machinery, the two-time adapter, block
checkpointing, the core trainer), with the integration test's models (tests/integration/tiny_unets.py, built with
ComfyUI's classes), conditioning (FMTTTestSDConditioning seed 1: 4 tokens of 64 features, SD3's pooled vector of 32)
and settings (data-free, 4 teacher samples at 64 x 64 px, LSD, rank 4, batch 4, both orders of the time pair,
seed 0), float32 everywhere (TF32 off: LSD's finite difference of step 5e-3 divides model differences by 1e-2).
Every --every steps it prints and records:
  held-out objective   the LSD residual (L1) on 64 fixed held-out samples, each with its own time pair: mean +- its
                       standard error (the training objective's estimate), the paired change from step 0 +- its
                       standard error, and the median beside it (a different statistic)
  look-ahead errors    RMS of the denoiser's and of 1 / 2 / 4 jumps' end points to the teacher's 64-step Euler ODE end
                       point, from 2 held-out noises (the integration test's measure)
Each family runs in its own process. Writes bench/results/train_proof.{md,json} (train_proof_cuda.* with --device
cuda).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FAMILIES = ("sd35", "zimage", "sd15", "sdxl")
SD_UNET_SEEDS = {"sd15": 11, "sdxl": 12}  # tests/integration/tiny_unets.py main: tiny_sd15 / tiny_sdxl.safetensors
COND_SEED = 1  # the integration test's FMTTTestSDConditioning(seed=1, tokens=4)


def load(family: str, device: str):
    """The tiny model as ComfyUI loads it for the integration test, in float32, and its conditioning."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import tiny_unets
    import torch
    g = torch.Generator().manual_seed(COND_SEED)
    if family in SD_UNET_SEEDS:  # CheckpointLoaderSimple's path; the test's file stores SDXL in float16
        sd = tiny_unets.unet(family, SD_UNET_SEEDS[family]).state_dict()
        sd = {f"model.diffusion_model.{k}": (v.half() if family == "sdxl" else v) for k, v in sd.items()}
        patcher = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
        # FMTTTestSDConditioning(seed 1, tokens 4, context 768 / 2048, pooled 0 / 1280): pooled drawn first
        pooled = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
        positive = [[torch.randn(1, 4, 2048 if family == "sdxl" else 768, generator=g), pooled]]
    elif family == "sd35":  # UNETLoader's path (detected as SD3)
        patcher = comfy.sd.load_diffusion_model_state_dict(tiny_unets.mmdit(14).state_dict(),
                                                           model_options={"dtype": torch.float32})
        positive = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    else:  # what the test's FMTTTestZImageLoader does (ComfyUI detects Z-Image only at its real width)
        sd = tiny_unets.zimage(16).state_dict()
        config = comfy.supported_models.ZImage(dict(tiny_unets.ZIMAGE_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(sd, "")
        patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                       offload_device=comfy.model_management.unet_offload_device())
        model.load_model_weights(sd, "", assign=patcher.is_dynamic())
        positive = [[torch.randn(1, 4, 64, generator=g), {}]]
    return patcher, positive


def worker(family: str, steps: int, every: int, seconds: float, lr: float, batch: int, rank: int,
           device: str, both_orders: bool = True, seed: int = 0) -> dict:
    from comfy_worker import enter_comfyui
    enter_comfyui(device)
    import comfy.model_management
    import torch
    from comfyui_fmtt.fmtt_core.flow_maps.trainer import DistillSettings
    from comfyui_fmtt.nodes.flow_map_training import Run, train, training_data

    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    patcher, positive = load(family, device)
    data = training_data(None, [positive], None, 64, 64, patcher.model.latent_format.latent_channels, 4)
    out = Path(tempfile.mkdtemp())
    settings = DistillSettings(objective="lsd", steps=steps, batch=batch, lr=lr, seed=seed, save_every=0,
                               preview_every=every, log_every=1, both_directions=both_orders)
    rows, started = [], time.perf_counter()

    def on_eval(step, objective, errors):
        rows.append({"step": step, "seconds": time.perf_counter() - started, "objective": objective,
                     "lookahead_error": errors})
        change = (f", change {objective['change']:+.3e} +- {objective['change_se']:.2e}" if step else "")
        print(f"  {family} step {step:5d} ({rows[-1]['seconds']:6.1f} s): held-out objective mean "
              f"{objective['mean']:.4g} +- {objective['se']:.2g}{change}, median {objective['median']:.4g}; "
              + ", ".join(f"{k} {v:.4f}" for k, v in errors.items()), file=sys.stderr, flush=True)

    run = Run(settings, rank, 1.0, data, str(out / "map.safetensors"), str(out), None, on_eval=on_eval)
    run.writer = lambda *args: None  # the file is not what is measured
    # The time budget: ComfyUI's Cancel, which the trainer honours between steps (the evaluations so far are kept).
    timer = threading.Timer(seconds, comfy.model_management.interrupt_current_processing)
    timer.start()
    stopped = None
    try:
        with torch.inference_mode(False):
            report = train(patcher, run)
        seconds_per_step = statistics.median(report.seconds_per_step)
    except comfy.model_management.InterruptProcessingException:
        stopped, seconds_per_step = "time budget", None
    finally:
        timer.cancel()
        comfy.model_management.interrupt_current_processing(False)
    return {"family": family, "device": device, "steps": steps, "every": every, "lr": lr, "batch": batch,
            "rank": rank, "both_orders": both_orders, "seed": seed, "eval_pairs": run.eval_pairs,
            "stopped": stopped, "seconds_per_step": seconds_per_step,
            "rows": rows}


def markdown(results: list[dict], environment: str) -> str:
    r0 = results[0]
    lines = ["# FMTT Train Flow Map on the tiny test models: held-out objective and look-ahead error", "",
             f"{environment}. The node's code path; data-free (4 teacher samples, 64 x 64 px), LSD, rank "
             f"{r0['rank']}, batch {r0['batch']}, lr {r0['lr']}, "
             f"{'both orders of the time pair' if r0.get('both_orders', True) else 'noise-to-data time pairs'}, "
             f"seed {r0.get('seed', 0)}. Held-out "
             f"objective: the L1 LSD residual on {r0['eval_pairs']} fixed held-out samples (own time pair each): "
             "mean +- standard error, the paired change from step 0 +- its standard error, and the median. "
             "Look-ahead: RMS to the teacher's 64-step ODE end point from 2 held-out noises.", ""]
    for r in results:
        note = f" (stopped by the {r['stopped']} at step {r['rows'][-1]['step']})" if r["stopped"] else ""
        lines += [f"## {r['family']}{note}", "",
                  "| step | s | objective mean +- se | change from step 0 | median | denoiser | 1 jump | 2 jumps | "
                  "4 jumps |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            o, e = row["objective"], row["lookahead_error"]
            change = f"{o['change']:+.3e} +- {o['change_se']:.2e}" if row["step"] else "-"
            lines.append(f"| {row['step']} | {row['seconds']:.0f} | {o['mean']:.4g} +- {o['se']:.2g} | {change} | "
                         f"{o['median']:.4g} | {e['denoiser']:.4f} | {e['1 jump']:.4f} | {e['2 jump']:.4f} | "
                         f"{e['4 jump']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=10, metavar=("FAMILY", "STEPS", "EVERY", "SECONDS", "LR", "BATCH", "RANK",
                                                       "DEVICE", "BOTH_ORDERS", "SEED"))
    parser.add_argument("--families", nargs="+", default=["sd35", "zimage"], choices=FAMILIES)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="steps between evaluations")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="time budget per family (training and evaluations; loading not counted)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--noise-to-data", action="store_true", help="the node's time_pairs 'noise to data' (s > t)")
    parser.add_argument("--seed", type=int, default=0,
                        help="training seed (the held-out samples' seed follows it: seed + 15485863)")
    parser.add_argument("--out", default="train_proof", help="results file stem under bench/results")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout and run with its python")
    if args.worker:
        family, steps, every, seconds, lr, batch, rank, device, both, seed = args.worker
        print(json.dumps(worker(family, int(steps), int(every), float(seconds), float(lr), int(batch), int(rank),
                                device, both == "1", int(seed))))
        return 0
    results = []
    for family in args.families:
        cmd = [sys.executable, __file__, "--worker", family, str(args.steps), str(args.every), str(args.seconds),
               str(args.lr), str(args.batch), str(args.rank), args.device,
               "0" if args.noise_to_data else "1", str(args.seed)]
        print(f"{family}: {args.steps} steps, evaluated every {args.every}, budget {args.seconds:.0f} s", flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            sys.exit(f"{family} failed (exit {done.returncode}); its log is above")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    import platform

    import torch
    where = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}), 1 thread")
    environment = f"{where}, torch {torch.__version__}"
    text = markdown(results, environment)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
        (RESULTS / f"{args.out}{suffix}.md").write_text(text)
        (RESULTS / f"{args.out}{suffix}.json").write_text(json.dumps({"environment": environment,
                                                                       "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

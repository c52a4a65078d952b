"""Cost of FMTT Train Flow Map's step: time per optimiser step and peak memory of the two-time training step, through
the node's own code path (nodes/flow_map_training.train: ComfyUI's sampler machinery, the two-time adapter, block
checkpointing, the core trainer), on the tiny SD1.5 / SDXL / FLUX.1-dev models of the integration suite, built with
ComfyUI's own classes (tests/integration/tiny_unets.py, tiny_models.py) and loaded by ComfyUI's loaders.

    COMFYUI_PATH=/work/comfyui /work/comfy-venv/bin/python bench/bench_train_node.py            # CPU, 1 thread
    COMFYUI_PATH=... python bench/bench_train_node.py --device cuda --size 512 --configs 1x1 4x1 4x4  # on a GPU
    COMFYUI_PATH=... python bench/bench_train_node.py --quick                                   # smoke run

Each (family, batch x accumulate) runs in a fresh process: data-free from one random conditioning, LSD, rank 16,
`--warmup` untimed steps then `--steps` timed ones (median of the trainer's per-step wall time; previews and saves
are outside it). Peak memory over the whole run (its short teacher ODEs run without gradients and stay below the
training step), after a 1-step run of the same settings (what a server that has trained before holds is in
place): on CUDA torch.cuda.max_memory_allocated over the memory allocated with the model loaded; on the CPU the
growth of the resident set over its size with the model loaded (polled every millisecond; glibc's mmap threshold
fixed at 64 kB so that freed tensors leave it). Beside it, the memory check's estimate (check_memory in
nodes/flow_map_training.py: measured on one row, see docs/training-comfyui.md); it must be an upper bound within
2x. The tiny models are far from real ones: the table says how the step scales with batch and accumulation, not
what a real SDXL costs.
Writes bench/results/train_node.{md,json} (train_node_cuda.* with --device cuda).
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FAMILIES = ("sd15", "sdxl", "flux")


def worker(family: str, batch: int, accumulate: int, size: int, steps: int, warmup: int, rank: int,
           device: str) -> dict:
    from comfy_worker import enter_comfyui
    enter_comfyui(device)
    import comfy.sd
    import tiny_models
    import tiny_unets
    import torch
    from bench_fewstep_memory import PeakRSS, rss_mb
    from comfyui_fmtt.fmtt_core.flow_maps.trainer import DistillSettings
    from comfyui_fmtt.nodes.flow_map_training import Run, train, training_data, writer_for

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if family == "flux":
        patcher = comfy.sd.load_diffusion_model_state_dict(tiny_models.flux(True, 1).state_dict())
        positive = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    else:
        net = tiny_unets.unet(family, 11 if family == "sd15" else 12)
        sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}
        del net
        patcher = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
        extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
        positive = [[torch.randn(1, 4, 2048 if family == "sdxl" else 768, generator=g), extra]]
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    data = training_data(None, [positive], None, size, size, patcher.model.latent_format.latent_channels, batch)
    out = Path(tempfile.mkdtemp())
    settings = DistillSettings(objective="lsd", steps=warmup + steps, batch=batch, accumulate=accumulate, lr=1e-4,
                               seed=0, save_every=0, preview_every=0, log_every=1)
    run = Run(settings, rank, 1.0, data, str(out / "map.safetensors"), str(out), None, block_checkpointing=True,
              ode_steps=2, eval_steps=2, eval_samples=1)
    run.writer = lambda adapter, base, meta, path: writer_for(adapter)(adapter, base, meta, path)
    # A 1-step run first, elsewhere: what a server that has trained before holds (kernels, thread pools, caches)
    # is then in place, and the measured run's growth is what a run needs.
    first = Path(tempfile.mkdtemp())
    with torch.inference_mode(False):
        train(patcher, dataclasses.replace(run, settings=dataclasses.replace(settings, steps=1),
                                           lora_path=str(first / "map.safetensors"), state_dir=str(first)))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: the resident set is what is in use
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    resident = rss_mb()
    with PeakRSS() as peak, torch.inference_mode(False):
        report = train(patcher, run)
    if cuda:
        torch.cuda.synchronize()
    timed = report.seconds_per_step[warmup:]
    return {"family": family, "batch": batch, "accumulate": accumulate, "size": size, "rank": rank,
            "device": device, "params": params, "steps": len(timed),
            "s_per_step": statistics.median(timed),
            "peak_mb": (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else peak.peak - resident,
            "memory": "cuda max allocated over the loaded model" if cuda else "RSS growth over the loaded model",
            "estimate_mb": report.memory_estimate / 2**20,
            "losses_finite": all(v == v for v in report.losses), "load_1min": os.getloadavg()[0]}


def markdown(rows: list[dict], environment: str) -> str:
    lines = ["# FMTT Train Flow Map: time per step and peak memory (node path, tiny models)", "",
             f"{environment}; {rows[0]['size']} x {rows[0]['size']} px, LSD, rank {rows[0]['rank']}, block "
             f"checkpointing on; median over {rows[0]['steps']} timed steps; memory: {rows[0]['memory']}. "
             "batch x accumulate: the global batch and its micro-batches per step. Machine load (1-minute average) "
             "per row: on a shared machine it inflates the times.", "",
             "| family | parameters | batch | accumulate | s / step | peak MB | estimate MB | estimate / peak | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['params'] / 1e6:.1f} M | {r['batch']} | {r['accumulate']} | "
                     f"{r['s_per_step']:.2f} | {r['peak_mb']:.0f} | {r['estimate_mb']:.0f} | "
                     f"{r['estimate_mb'] / max(r['peak_mb'], 1e-9):.2f} | {r['load_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=8, metavar=("FAMILY", "BATCH", "ACCUMULATE", "SIZE", "STEPS", "WARMUP",
                                                      "RANK", "DEVICE"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--configs", nargs="+", default=["1x1", "4x1", "4x4"],
                        help="BATCHxACCUMULATE per run (default 1x1 4x1 4x4)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latent side / 8)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="sd15, 1x1 and 2x2, 2 steps; prints only")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout and run with its python")
    if args.worker:
        family, *numbers, device = args.worker
        print(json.dumps(worker(family, *map(int, numbers), device)))
        return 0
    if args.quick:
        args.families, args.configs, args.steps = ["sd15"], ["1x1", "2x2"], 2
    rows = []
    for family in args.families:
        for config in args.configs:
            batch, accumulate = config.split("x")
            cmd = [sys.executable, __file__, "--worker", family, batch, accumulate, str(args.size), str(args.steps),
                   str(args.warmup), str(args.rank), args.device]
            # A fixed mmap threshold: glibc then maps every tensor above 64 kB on its own and unmaps it when freed, so
            # the resident set follows the live tensors instead of the heap's high-water mark from earlier phases.
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:
                sys.exit(f"{family} {config} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {family} {config}: {r['s_per_step']:.2f} s/step, {r['peak_mb']:.0f} MB, estimate "
                  f"{r['estimate_mb']:.0f} MB", flush=True)
    import platform

    import torch
    where = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}), 1 thread")
    env = f"{where}, torch {torch.__version__}"
    text = markdown(rows, env)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
        (RESULTS / f"train_node{suffix}.md").write_text(text)
        (RESULTS / f"train_node{suffix}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2)
                                                          + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

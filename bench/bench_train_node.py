"""Cost of FMTT Train Flow Map's step: time per optimiser step and peak memory of the two-time training step, through
the node's own code path (nodes/flow_map_training.train: ComfyUI's sampler machinery, the two-time adapter, block
checkpointing, the core trainer), on the tiny SD1.5 / SDXL / FLUX.1-dev models of the integration suite, built with
ComfyUI's own classes (tests/integration/tiny_unets.py, tiny_models.py) and loaded by ComfyUI's loaders.

    COMFYUI_PATH=/work/comfyui /work/comfy-venv/bin/python bench/bench_train_node.py            # CPU, 1 thread
    COMFYUI_PATH=... python bench/bench_train_node.py --device cuda --size 512 --configs 1x1 4x1 4x4  # on a GPU
    COMFYUI_PATH=... python bench/bench_train_node.py --quick                                   # smoke run
    COMFYUI_PATH=... python bench/bench_train_node.py --device cuda --scale full --configs 1x1 4x1  # released sizes

`--scale full` builds the released architectures instead (SD1.5's 0.86 B UNet at 512 px, SDXL's 2.6 B UNet and
FLUX.1-dev's 12 B transformer at 1024 px, in their released dtypes), with random weights made on the device: the
weights' values change neither the time nor the memory of a step, so this is what training a real model costs,
without its file.

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


FULL_SIZE_PX = {"sd15": 512, "sdxl": 1024, "flux": 1024}  # the resolutions the released models are used at


def full_size(family: str, device: str):
    """The released architecture of `family` (the values ComfyUI's model_detection reads from the released files),
    built on `device` in its released dtype with random weights drawn there (a 12 B model drawn on the CPU would
    take minutes)."""
    import comfy.ldm.flux.model
    import comfy.ops
    import torch
    from comfy.ldm.modules.diffusionmodules import openaimodel
    ops = comfy.ops.disable_weight_init
    unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                legacy=False, operations=ops, dtype=torch.float16, device=device)
    if family == "sd15":  # transformer_depth_output is popped from its end, deepest level first
        net = openaimodel.UNetModel(**unet, num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4],
                                    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                                    transformer_depth_output=[1] * 9 + [0] * 3, transformer_depth_middle=1,
                                    context_dim=768, use_linear_in_transformer=False, num_heads=8,
                                    num_head_channels=-1)
    elif family == "sdxl":
        net = openaimodel.UNetModel(**unet, num_res_blocks=[2] * 3, channel_mult=[1, 2, 4],
                                    transformer_depth=[0, 0, 2, 2, 10, 10],
                                    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                                    transformer_depth_middle=10, context_dim=2048, use_linear_in_transformer=True,
                                    adm_in_channels=2816, num_classes="sequential", num_head_channels=64)
    else:
        net = comfy.ldm.flux.model.Flux(
            image_model="flux", operations=ops, dtype=torch.bfloat16, device=device, in_channels=16,
            out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
            depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
            guidance_embed=True, txt_ids_dims=[])
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():  # tiny_models.init_'s scales, drawn where the weights are
        for name, p in net.named_parameters():
            if p.ndim == 1 and name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight",
                                               "norm3.weight")):
                p.normal_(1.0, 0.1, generator=g)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else max(p.numel(), 1)
                p.normal_(0.0, 0.2 / fan_in ** 0.5 * (3 if p.ndim > 1 else 0.3), generator=g)
    return net


def model_and_conditioning(family: str, scale: str, device: str):
    """(ModelPatcher, positive conditioning) for a tiny or a released-size `family`, loaded by ComfyUI's loaders
    (which detect the family from the weights, as they would from a real file)."""
    import comfy.sd
    import tiny_models
    import tiny_unets
    import torch
    g = torch.Generator().manual_seed(0)
    full = scale == "full"
    if family == "flux":  # T5 tokens x features, CLIP-L pooled
        net = full_size(family, device) if full else tiny_models.flux(True, 1)
        tokens, features, pooled = (256, 4096, 768) if full else (4, 64, 32)
    else:  # CLIP tokens x features; SDXL's pooled CLIP-G
        net = full_size(family, device) if full else tiny_unets.unet(family, 11 if family == "sd15" else 12)
        tokens, features, pooled = (77 if full else 4), (2048 if family == "sdxl" else 768), 1280
    sd = net.state_dict()
    del net
    if family == "flux":
        patcher = comfy.sd.load_diffusion_model_state_dict(sd)
    else:
        sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
        patcher = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
    del sd
    extra = {} if family == "sd15" else {"pooled_output": torch.randn(1, pooled, generator=g)}
    return patcher, [[torch.randn(1, tokens, features, generator=g), extra]]


def worker(family: str, batch: int, accumulate: int, size: int, steps: int, warmup: int, rank: int,
           device: str, scale: str = "tiny") -> dict:
    from comfy_worker import enter_comfyui
    enter_comfyui(device)
    import torch
    from bench_fewstep_memory import PeakRSS, rss_mb
    from comfyui_fmtt.fmtt_core.flow_maps.trainer import DistillSettings
    from comfyui_fmtt.nodes.flow_map_training import Run, train, training_data, writer_for

    if device == "cpu":
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # --threads; on a GPU the host threads feed it
    patcher, positive = model_and_conditioning(family, scale, device)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    data = training_data(None, [positive], None, size, size, patcher.model.latent_format.latent_channels, batch)
    out = Path(tempfile.mkdtemp())
    settings = DistillSettings(objective="lsd", steps=warmup + steps, batch=batch, accumulate=accumulate, lr=1e-4,
                               seed=0, save_every=0, preview_every=0, log_every=1)
    run = Run(settings, rank, 1.0, data, str(out / "map.safetensors"), str(out), None, block_checkpointing=True,
              ode_steps=2, eval_steps=2, eval_samples=1, eval_pairs=4)  # evaluations are not what is timed
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
    return {"family": family, "scale": scale, "batch": batch, "accumulate": accumulate, "size": size, "rank": rank,
            "device": device, "params": params, "steps": len(timed),
            "s_per_step": statistics.median(timed),
            "peak_mb": (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else peak.peak - resident,
            "memory": "cuda max allocated over the loaded model" if cuda else "RSS growth over the loaded model",
            "estimate_mb": report.memory_estimate / 2**20,
            "losses_finite": all(v == v for v in report.losses), "load_1min": os.getloadavg()[0]}


def markdown(rows: list[dict], environment: str) -> str:
    models = "released architectures, random weights" if rows[0]["scale"] == "full" else "tiny models"
    lines = [f"# FMTT Train Flow Map: time per step and peak memory (node path, {models})", "",
             f"{environment}; LSD, rank {rows[0]['rank']}, block checkpointing on; median over {rows[0]['steps']} "
             f"timed steps; memory: {rows[0]['memory']}. batch x accumulate: the global batch and its micro-batches "
             "per step. Machine load (1-minute average) per row: on a shared machine it inflates the times.", "",
             "| family | parameters | px | batch | accumulate | s / step | peak MB | estimate MB | estimate / peak "
             "| losses finite | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['params'] / 1e6:.1f} M | {r['size']} | {r['batch']} | {r['accumulate']} | "
                     f"{r['s_per_step']:.2f} | {r['peak_mb']:.0f} | {r['estimate_mb']:.0f} | "
                     f"{r['estimate_mb'] / max(r['peak_mb'], 1e-9):.2f} | {'yes' if r['losses_finite'] else 'NO'} | "
                     f"{r['load_1min']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=9, metavar=("FAMILY", "BATCH", "ACCUMULATE", "SIZE", "STEPS", "WARMUP",
                                                      "RANK", "DEVICE", "SCALE"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--configs", nargs="+", default=["1x1", "4x1", "4x4"],
                        help="BATCHxACCUMULATE per run (default 1x1 4x1 4x4)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels (latent side / 8); default 64, or with --scale full each "
                             "family's own (SD1.5 512, SDXL and FLUX 1024)")
    parser.add_argument("--scale", choices=("tiny", "full"), default="tiny",
                        help="tiny: the integration suite's models; full: the released architectures with random "
                             "weights (a GPU; on the CPU SD1.5 fits in 24 GB, slowly)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per run (the CPU table's: 1)")
    parser.add_argument("--quick", action="store_true", help="sd15, 1x1 and 2x2, 2 steps; prints only")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout and run with its python")
    if args.worker:
        family, *numbers, device, scale = args.worker
        print(json.dumps(worker(family, *map(int, numbers), device, scale)))
        return 0
    if args.quick:
        args.families, args.configs, args.steps = ["sd15"], ["1x1", "2x2"], 2
    rows, failed = [], []
    for family in args.families:
        for config in args.configs:
            batch, accumulate = config.split("x")
            size = args.size or (FULL_SIZE_PX[family] if args.scale == "full" else 64)
            cmd = [sys.executable, __file__, "--worker", family, batch, accumulate, str(size), str(args.steps),
                   str(args.warmup), str(args.rank), args.device, args.scale]
            # A fixed mmap threshold: glibc then maps every tensor above 64 kB on its own and unmaps it when freed, so
            # the resident set follows the live tensors instead of the heap's high-water mark from earlier phases.
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode:  # the other rows still run: one device session measures as much as it can
                failed.append(f"{family} {config}")
                print(f"{family} {config} failed:\n{done.stderr[-12000:]}", flush=True)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  {family} {config}: {r['s_per_step']:.2f} s/step, {r['peak_mb']:.0f} MB, estimate "
                  f"{r['estimate_mb']:.0f} MB; {json.dumps(r)}", flush=True)  # a row survives a killed run
    import platform

    import torch
    where = (f"{args.device} ({torch.cuda.get_device_name()})" if args.device.startswith("cuda")
             else f"CPU ({platform.machine()}), {args.threads} thread{'s' * (args.threads > 1)}")
    env = f"{where}, torch {torch.__version__}"
    if not rows:
        sys.exit(f"every run failed: {', '.join(failed)}")
    text = markdown(rows, env)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        suffix = ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}") + (
            "_full" if args.scale == "full" else "")
        (RESULTS / f"train_node{suffix}.md").write_text(text)
        (RESULTS / f"train_node{suffix}.json").write_text(json.dumps({"environment": env, "rows": rows,
                                                                      "failed": failed}, indent=2) + "\n")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

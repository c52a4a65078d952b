"""The memory guard's whole-run estimate against the measured peak of a whole FMTT run (issue 20, item 5).

    COMFYUI_PATH=/work/comfyui /work/comfy-venv/bin/python bench/bench_memory_run.py [--device cuda] [--quick]

Each case (family x look-ahead x particles at an image size) runs in a fresh process through the FMTT KSampler
node's own code path (nodes/sampler_nodes.FMTTKSampler.execute: ComfyUI's sample_custom, the memory guard, the
core sampler, the diagnostics), on the integration suite's tiny SD1.5 / SDXL / FLUX.1-dev models built with
ComfyUI's classes and loaded by its loaders, a tiny TAESD, and the pack's CLIP score reward on a tiny transformers
CLIP (tests/fmtt_testing/hf_models.py). Every case steers: mode exact, the reward gradient on, automatic chunks.

Estimate: the peak the guard planned for (the diagnostics' "peak" of the memory plan: population state plus one
chunk's pass). Measured: a first run with 2 particles sets up what a server that has sampled before holds (weights
made differentiable, thread pools, caches); then the measured run's peak above the memory in use before it: on the
CPU the peak resident set (VmHWM, reset just before the run, after handing freed memory back; glibc's mmap
threshold is fixed so that freed tensors leave the resident set), on CUDA torch.cuda.max_memory_allocated. The
estimate must be an upper bound within 2x: ratio = estimate / measured in [1, 2].
Writes bench/results/memory_run_<device>.json after each case (not with --quick or --chunk-size; a case run again
replaces its row).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MiB = 1024 * 1024
# The two settings (particles, image side in pixels) and the look-aheads each family has.
SETTINGS = ((32, 64), (16, 128))
LOOKAHEADS = {"sd15": ("denoiser", "ode"), "sdxl": ("denoiser", "ode"), "flux": ("denoiser", "ode", "flow_map")}
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Peak:
    """Peak memory above what is in use when the block starts: the resident set on the CPU, the allocator on CUDA."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import gc

        import torch
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: the resident set is what is in use
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _status("VmHWM") - self.base


def worker(family: str, lookahead: str, particles: int, size: int, steps: int, device: str, chunk: int = 0) -> dict:
    from comfy_worker import enter_comfyui
    enter_comfyui(device)
    import comfy.sd
    import tiny_models
    import tiny_unets
    import torch
    from comfyui_fmtt.fmtt_core.flow_maps import load_flow_map
    from comfyui_fmtt.nodes import memory_guard
    from comfyui_fmtt.nodes.lookahead_specs import BaseModelLookahead, FlowMapFileLookahead
    from comfyui_fmtt.nodes.sampler_nodes import FMTTKSampler
    from comfyui_fmtt.rewards.clip import load_hf_clip_score

    from fmtt_testing.comfy_prompts import FMTT_DEFAULTS
    from fmtt_testing.hf_models import write_hf_clip_folder

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    # Loaded as ComfyUI loads them: inside inference mode.
    with torch.inference_mode():
        if family == "flux":
            patcher = comfy.sd.load_diffusion_model_state_dict(tiny_models.flux(True, 1).state_dict())
            cond = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                          "guidance": 3.5}]]
            vae = comfy.sd.VAE(sd=tiny_models.taesd(16, 3).state_dict())
        else:
            net = tiny_unets.unet(family, 11 if family == "sd15" else 12)
            sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}
            del net
            patcher = comfy.sd.load_state_dict_guess_config(sd, output_vae=False, output_clip=False)[0]
            extra = {"pooled_output": torch.randn(1, 1280, generator=g)} if family == "sdxl" else {}
            cond = [[torch.randn(1, 4, 2048 if family == "sdxl" else 768, generator=g), extra]]
            vae = comfy.sd.VAE(sd=tiny_models.taesd(4, 4).state_dict())
    write_hf_clip_folder(tmp / "clip")
    reward = load_hf_clip_score(tmp / "clip", "a red cat", device=device)
    if lookahead == "flow_map":
        tiny_models.write_flow_map(tmp / "map.safetensors", ROOT)
        spec = FlowMapFileLookahead(load_flow_map(tmp / "map.safetensors").to(device), "tiny_flow_map", jumps=1)
    else:
        spec = BaseModelLookahead(lookahead, steps=4)
    channels = patcher.model.latent_format.latent_channels

    plans = []  # what the memory guard planned, as the diagnostics show it
    planned = memory_guard.plan
    memory_guard.plan = lambda *a, **k: plans.append(planned(*a, **k)) or plans[-1]
    parts = []
    measure = memory_guard.measured_bytes
    memory_guard.measured_bytes = lambda *a, **k: parts.append(measure(*a, **k)) or parts[-1]

    def run(n: int, seed: int):
        settings = {**FMTT_DEFAULTS, "particles": n, "reward": reward, "vae": vae, "lookahead": spec,
                    "block_checkpointing": True, "chunk_size": min(chunk, n)}
        latent = {"samples": torch.zeros(1, channels, size // 8, size // 8)}
        with torch.inference_mode():  # as ComfyUI runs a node
            FMTTKSampler.execute(patcher, seed, steps, 1.0, "simple", cond, cond, latent, 1.0, **settings)

    run(2, 1)  # warm-up
    with Peak(device) as peak:
        run(particles, 7)
    plan = plans[-1]
    return {"family": family, "lookahead": lookahead, "particles": particles, "size": size, "steps": steps,
            "device": device, "chunk": plan.chunk_size, "pass_per_particle": plan.pass_per_particle,
            "state_per_particle": plan.state_per_particle, "estimate": plan.peak, "measured": peak.peak,
            **{f"{k}_bytes": v for k, v in dataclasses.asdict(parts[-1]).items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", nargs=7,
                        metavar=("FAMILY", "LOOKAHEAD", "PARTICLES", "SIZE", "STEPS", "DEVICE", "CHUNK"))
    parser.add_argument("--families", nargs="+", default=list(LOOKAHEADS), choices=list(LOOKAHEADS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=0, help="particles per pass (0: the guard's choice)")
    parser.add_argument("--cases", nargs="+", metavar="FAMILY:LOOKAHEAD:PARTICLES:SIZE",
                        help="run only these cases, e.g. sd15:denoiser:16:128")
    parser.add_argument("--quick", action="store_true", help="sd15 denoiser at 32 particles x 64 px; prints only")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout and run with its python")
    if args.worker:
        family, lookahead, particles, size, steps, device, chunk = args.worker
        print(json.dumps(worker(family, lookahead, int(particles), int(size), int(steps), device, int(chunk))))
        return 0
    cases = [(f, look, n, size) for f in args.families for look in LOOKAHEADS[f] for n, size in SETTINGS]
    if args.quick:
        cases = [("sd15", "denoiser", 32, 64)]
    if args.cases:
        cases = [(f, look, int(n), int(size)) for f, look, n, size in (c.split(":") for c in args.cases)]
    out = RESULTS / f"memory_run_{args.device.split(':')[0]}.json"
    keep = not (args.quick or args.chunk_size)  # recorded: the guard's own choice of chunk, case by case
    key = lambda r: (r["family"], r["lookahead"], r["particles"], r["size"])  # noqa: E731
    rows = {key(r): r for r in json.loads(out.read_text())["rows"]} if keep and out.exists() else {}
    print(f"{'family':<7}{'look-ahead':<11}{'particles':>10}{'px':>5}{'chunk':>7}{'estimate MiB':>14}"
          f"{'measured MiB':>14}{'ratio':>7}")
    for family, look, n, size in cases:
        cmd = [sys.executable, __file__, "--worker", family, look, str(n), str(size), str(args.steps), args.device,
               str(args.chunk_size)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
        if done.returncode:
            sys.exit(f"{family} {look} {n}x{size} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r["ratio"] = r["estimate"] / max(r["measured"], 1)
        print(f"{family:<7}{look:<11}{n:>10}{size:>5}{r['chunk']:>7}{r['estimate'] / MiB:>14.1f}"
              f"{r['measured'] / MiB:>14.1f}{r['ratio']:>7.2f}", flush=True)
        if keep:  # after each case (a long run keeps what it measured), replacing an earlier row of the same case
            rows[key(r)] = r
            RESULTS.mkdir(exist_ok=True)
            out.write_text(json.dumps({"device": args.device, "rows": list(rows.values())}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory of a few-step look-ahead: the LoRA beside the sampled model's weights versus a companion UNet.

On the tiny SDXL of the integration suite (tests/integration/tiny_unets.py: real SDXL layout, ~0.1 B parameters),
one look-ahead of `steps` Euler steps from t to 1, forward and backward (the tilt gradient), for `particles`
particles at 64 x 64 px, measured two ways:
  lora       the sampled SDXL UNet with a rank-r LoRA on every layer beside its weights (nodes/side_lora.py, what
             "FMTT Look-ahead (few-step LoRA)" does)
  companion  the sampled SDXL UNet plus a second UNet with the same LoRA merged in (a merged Lightning / Turbo
             checkpoint as companion: what "FMTT Look-ahead (companion model)" needs)
Each variant runs in its own fresh process: the table gives the weights each needs (counted exactly), the process's
resident memory with the models loaded, and its peak during the look-ahead's forward and backward pass (VmRSS
polled every millisecond). CPU only here;
the same numbers on a GPU would be torch.cuda.max_memory_allocated (not run: no GPU was lent).

    COMFYUI_PATH=/work/comfyui /work/comfy-venv/bin/python bench/bench_fewstep_memory.py [--rank 64] [--particles 4]

Writes bench/results/fewstep_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def rss_mb() -> float:
    """The process's resident memory now (MB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRSS:
    """The largest resident memory seen while the block runs (polled every millisecond by a thread)."""

    def __enter__(self):
        import threading
        self.peak, self._stop = rss_mb(), threading.Event()

        def poll():
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, rss_mb())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def variant(name: str, rank: int, particles: int, steps: int, size: int) -> dict:
    """One variant in this (fresh) process."""
    from comfy_worker import enter_comfyui
    enter_comfyui("cpu")
    import comfy.lora
    import comfy.sd
    import tiny_unets
    import torch
    from comfyui_fmtt.fmtt_core import CompanionLookahead, FewStepLookahead
    from comfyui_fmtt.nodes.clocks import clock_of, core_denoiser
    from comfyui_fmtt.nodes.side_lora import SideLoRA

    torch.manual_seed(0)
    net = tiny_unets.unet("sdxl", 12)
    sd = {f"model.diffusion_model.{k}": v for k, v in net.state_dict().items()}
    del net
    patcher = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_clip=False)[0]
    base = patcher.model
    state = base.state_dict()
    key_map = comfy.lora.model_lora_keys_unet(base, {})
    g = torch.Generator().manual_seed(1)
    lora_sd = {}
    for key, target in key_map.items():  # kohya names of every 2-D / 4-D layer
        if not key.startswith("lora_unet_") or not isinstance(target, str) or target not in state \
                or state[target].ndim not in (2, 4):
            continue
        w = state[target]
        down = torch.randn(rank, *w.shape[1:], generator=g) / w[0].numel() ** 0.5
        lora_sd[f"{key}.lora_down.weight"] = down
        lora_sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * 0.1
    seen, unique = set(), {}
    for k, v in lora_sd.items():  # one LoRA per layer (several names map to one weight)
        target = key_map[k.rsplit(".", 2)[0]]
        if (target, k.endswith("up.weight")) not in seen:
            seen.add((target, k.endswith("up.weight")))
            unique[k] = v
    weights_mb = sum(p.numel() * p.element_size() for p in base.diffusion_model.parameters()) / 2**20
    clock = clock_of(base.model_sampling)
    context = torch.randn(1, 4, 2048, generator=g)
    y = torch.randn(1, 2816, generator=g)

    def model_fn(model):
        return lambda x, sigma: model.apply_model(x, sigma, c_crossattn=context.expand(x.shape[0], -1, -1),
                                                  y=y.expand(x.shape[0], -1))

    with torch.inference_mode(False):
        if name == "lora":
            side = SideLoRA.build(patcher, unique, 1.0, "bench_lora")
            extra_mb = sum(t.numel() * t.element_size() for ps in side.pieces.values() for p in ps
                           for t in (p.down, p.up)) / 2**20
            denoiser = core_denoiser(model_fn(base), clock, check_interrupt=False)

            def with_lora(x, t):
                with side.active():
                    return denoiser(x, t)

            look = FewStepLookahead(with_lora, steps=steps, checkpoint=True)
            context_manager = side.installed(base, torch.device("cpu"))
        else:
            companion = comfy.sd.load_state_dict_guess_config(dict(sd), output_vae=False, output_clip=False)[0]
            companion.add_patches(comfy.lora.load_lora(unique, key_map, log_missing=False), 1.0)
            companion.patch_model()  # the merged few-step UNet: a second set of weights
            extra_mb = sum(p.numel() * p.element_size() for p in companion.model.diffusion_model.parameters()) / 2**20
            look = CompanionLookahead(core_denoiser(model_fn(companion.model), clock, check_interrupt=False),
                                      steps=steps, checkpoint=True)
            context_manager = torch.enable_grad()
        for p in base.parameters():
            p.requires_grad_(False)
        del sd, state, lora_sd
        gc.collect()
        x = torch.randn(particles, 4, size // 8, size // 8, generator=g).requires_grad_(True)
        t = torch.full((particles,), 0.3)
        resident = rss_mb()  # the models loaded, nothing computed yet
        with PeakRSS() as peak, context_manager, torch.enable_grad():
            out = look(x, t)
            (grad,) = torch.autograd.grad(out.square().sum(), x)
    return {"variant": name, "weights_mb": round(weights_mb, 1), "extra_mb": round(extra_mb, 1),
            "rss_loaded_mb": round(resident, 1), "rss_peak_mb": round(peak.peak, 1),
            "grad_finite": bool(torch.isfinite(grad).all())}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--particles", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--variant", choices=["lora", "companion"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(variant(args.variant, args.rank, args.particles, args.steps, args.size)))
        return
    rows = []
    for name in ("lora", "companion"):
        out = subprocess.run([sys.executable, __file__, "--variant", name, "--rank", str(args.rank), "--particles",
                              str(args.particles), "--steps", str(args.steps), "--size", str(args.size)],
                             check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    setting = (f"tiny SDXL (tests/integration/tiny_unets.py), LoRA rank {args.rank} on every layer, look-ahead of "
               f"{args.steps} steps forward + backward (checkpointed), {args.particles} particles at "
               f"{args.size} x {args.size} px, CPU, float32")
    table = ["| look-ahead | base UNet weights (MB) | added for the look-ahead (MB) | RSS, models loaded (MB) | "
             "peak RSS during the look-ahead (MB) |", "|---|---|---|---|---|"]
    for r in rows:
        what = "LoRA beside the weights" if r["variant"] == "lora" else "companion UNet (LoRA merged)"
        table.append(f"| {what} | {r['weights_mb']} | {r['extra_mb']} | {r['rss_loaded_mb']} | {r['rss_peak_mb']} |")
    text = f"{setting}\n\n" + "\n".join(table) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fewstep_memory.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    (RESULTS / "fewstep_memory.md").write_text(text)


if __name__ == "__main__":
    main()

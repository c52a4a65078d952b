"""The memory estimate against the measured peak of one particle's forward + backward pass.

    /work/comfy-venv/bin/python bench/bench_memory_estimate.py [--comfyui /work/comfyui] [--device cuda]

For each model (each family's tiny test model, one FLUX double block at hidden 3072, one SDXL UNet stage at real
width; ComfyUI's own classes, random weights, small spatial size) two fresh subprocesses run the same pass:
one reads the estimate off autograd (fmtt_core.memory.measure_pass, what the memory guard does), the other runs
the pass as the pack does (saved activations copied) and measures its peak above the resident weights and inputs:
on the CPU the peak resident set (VmHWM, reset just before the pass), on CUDA torch.cuda.max_memory_allocated.
The estimate must be an upper bound within 2x: ratio = estimate / measured in [1, 2].
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
# glibc keeps freed blocks resident and raises its mmap threshold as it goes; a fixed threshold makes every
# tensor-sized block its own mapping, returned when freed, so the resident set follows what torch holds.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
CASES = ["tiny_flux", "tiny_sdxl", "tiny_sd15", "tiny_mmdit", "flux_double_block_3072", "sdxl_stage_640",
         "taesd_decode_128", "tiny_clip_reward"]


def convnet(device: str, side: int = 64, batch: int = 1):
    """A small UNet-like torch model (convolutions, group norm, attention over a downsampled map) and its input."""
    import torch
    from torch import nn
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv2d(4, 64, 3, padding=1)
            self.norm = nn.GroupNorm(8, 64)
            self.mid = nn.Conv2d(64, 64, 3, padding=1)
            self.down = nn.Conv2d(64, 64, 3, stride=2, padding=1)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.out = nn.Conv2d(64, 4, 3, padding=1)

        def forward(self, x):
            h = self.mid(nn.functional.silu(self.norm(self.inp(x))))
            d = self.down(h)
            tokens = d.flatten(2).transpose(1, 2)
            a = self.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(1, 2).reshape(d.shape)
            return self.out(h + nn.functional.interpolate(a, scale_factor=2.0))

    net = Net().to(device).requires_grad_(False)
    return net, (torch.randn(batch, 4, side, side, device=device),)


def build(case: str, device: str):
    """(fn, inputs) of one particle's model call for `case`, weights on `device`."""
    import torch
    if case == "torch_convnet":
        return convnet(device)
    sys.path[:0] = [str(ROOT / "tests" / "integration"), str(ROOT / "tests")]
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    g = torch.Generator().manual_seed(0)

    def init(module):  # ComfyUI's disable_weight_init layers start empty: random weights, frozen as the pack runs
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() if p.ndim > 1 else 1) ** -0.5)
        return module.requires_grad_(False)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    if case.startswith("tiny_"):
        import tiny_models
        import tiny_unets
        if case == "tiny_flux":
            net = tiny_models.flux(guidance=True, seed=0).to(device).requires_grad_(False)
            x = rand(1, 16, 32, 32)  # a 256 x 256 image's latent
            inputs = (x, rand(1), rand(1, 8, 64), rand(1, 32), None, None, rand(1))
            return (lambda x, t, c, y, *_: net(x, t, c, y=y, guidance=t)), (x, *inputs[1:4])
        if case in ("tiny_sdxl", "tiny_sd15"):
            family = case.split("_")[1]
            net = tiny_unets.unet(family, seed=0).to(device).requires_grad_(False)
            x = rand(1, 4, 32, 32)
            ctx = rand(1, 77, 2048 if family == "sdxl" else 768)
            y = rand(1, 2816) if family == "sdxl" else None
            return (lambda x, t, c, y: net(x, t, context=c, y=y)), (x, rand(1).abs() * 999, ctx, y)
        if case == "tiny_mmdit":
            net = tiny_unets.mmdit(seed=0).to(device).requires_grad_(False)
            x = rand(1, 16, 32, 32)
            return (lambda x, t, c, y: net(x, t, context=c, y=y)), (x, rand(1).abs(), rand(1, 8, 64), rand(1, 32))
    if case == "taesd_decode_128":  # the tiny test models' VAE (a TAESD decoder at real width), a 128 x 128 image
        import tiny_models
        net = tiny_models.taesd(4, 4).taesd_decoder.to(device).requires_grad_(False)
        return net, (rand(1, 4, 16, 16),)
    if case == "tiny_clip_reward":  # the pack's CLIP score reward on the tiny transformers CLIP, a 128 x 128 image
        import tempfile

        from fmtt_testing.hf_models import write_hf_clip_folder
        from rewards.clip import load_hf_clip_score
        folder = Path(tempfile.mkdtemp()) / "clip"
        write_hf_clip_folder(folder)
        reward = load_hf_clip_score(folder, "a red cat", device=device)
        return reward, (torch.rand(1, 3, 128, 128, generator=g).to(device),)
    if case == "flux_double_block_3072":  # FLUX.1's double block: hidden 3072, 24 heads, in bf16 as FLUX runs
        from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND
        block = init(DoubleStreamBlock(3072, 24, 4.0, qkv_bias=True, operations=ops)).to(device, torch.bfloat16)
        img_side, txt = 16, 32  # a 256 x 256 image: 32 x 32 latent, patch 2; 32 text tokens
        ids = torch.zeros(1, txt + img_side ** 2, 3)
        ids[0, txt:, 1] = torch.arange(img_side).repeat_interleave(img_side).float()
        ids[0, txt:, 2] = torch.arange(img_side).repeat(img_side).float()
        pe = EmbedND(dim=128, theta=10000, axes_dim=[16, 56, 56])(ids).to(device)
        bf = torch.bfloat16
        img, text, vec = rand(1, img_side ** 2, 3072).to(bf), rand(1, txt, 3072).to(bf), rand(1, 3072).to(bf)
        # on copies of its inputs, which it updates in place (as nodes.autograd runs DiT blocks)
        return (lambda img, txt, vec: torch.cat(block(img.clone(), txt.clone(), vec, pe), 1)), (img, text, vec)
    if case == "sdxl_stage_640":  # SDXL's second input level: ResBlock 320 -> 640, 2 transformer layers at 640
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        res = init(ResBlock(320, 1280, 0.0, out_channels=640, operations=ops)).to(device)
        attn = init(SpatialTransformer(640, 10, 64, depth=2, context_dim=2048, use_linear=True,
                                       use_checkpoint=False, operations=ops)).to(device)
        x = rand(1, 320, 32, 32)  # the level's feature map for a 512 x 512 image
        return (lambda x, emb, ctx: attn(res(x, emb), context=ctx)), (x, rand(1, 1280), rand(1, 77, 2048))
    raise ValueError(case)


def child(case: str, mode: str, device: str) -> dict:
    import torch
    torch.manual_seed(0)
    if case != "torch_convnet":
        import comfy.model_management
        comfy.model_management.in_training = True  # as nodes.autograd sets it: Flux's fused RoPE gets a backward
    fn, inputs = build(case, device)
    inputs = tuple(i.requires_grad_() if i is not None and i is inputs[0] else i for i in inputs)
    from fmtt_core.memory import is_weight, measure_pass
    if mode == "estimate":
        est = measure_pass(fn, *inputs)
        return {"estimate": est.peak, "saved": est.saved, "kept": est.kept, "largest": est.largest}
    def copy():
        return torch.autograd.graph.saved_tensors_hooks(
            lambda t: t if is_weight(t) else t.clone(), lambda t: t)

    def run():
        with torch.enable_grad(), copy():
            out = fn(*inputs)
        out.backward(torch.ones_like(out))

    run()  # once first: kernels, thread pools and the allocator's pools are set up, as in a server that has run
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import ctypes
        import gc
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back, so the resident set is what is in use
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to the current size
        base = _status("VmRSS")
    run()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status("VmHWM") - base
    return {"measured": peak}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", "/work/comfyui"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", nargs="*", default=CASES)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the table here")
    args = ap.parse_args()
    if args.child:
        sys.path[:0] = [args.comfyui, str(ROOT)]
        if args.child[0] != "torch_convnet":
            import comfy.cli_args
            comfy.cli_args.args.cpu = args.device == "cpu"  # before comfy.model_management is imported
        print(json.dumps(child(*args.child, args.device)))
        return
    rows = []
    print(f"{'model':<26}{'estimate MiB':>14}{'measured MiB':>14}{'ratio':>8}")
    for case in args.cases:
        r = {"model": case}
        for mode in ("estimate", "measure"):
            out = subprocess.run([sys.executable, __file__, "--comfyui", args.comfyui, "--device", args.device,
                                  "--child", case, mode], capture_output=True, text=True, check=False, env=CHILD_ENV)
            if out.returncode:
                sys.exit(f"{case} {mode} failed:\n{out.stderr[-3000:]}")
            r.update(json.loads(out.stdout.strip().splitlines()[-1]))
        r["ratio"] = r["estimate"] / max(r["measured"], 1)
        rows.append(r)
        print(f"{case:<26}{r['estimate'] / MiB:>14.1f}{r['measured'] / MiB:>14.1f}{r['ratio']:>8.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

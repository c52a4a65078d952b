"""Test-only ComfyUI nodes, copied by the harness into the temporary ComfyUI's custom_nodes/ as
fmtt_test_nodes/__init__.py. Never shipped in the pack.

  FMTTTestConditioning   random Flux-shaped CONDITIONING (no text encoder needed)
  FMTTTestNaNReward      an FMTT_REWARD that returns NaN (bad-input test)
  FMTTTestLinearReward   an FMTT_REWARD with a gradient as steep as asked (run-warning test)
  FMTTTestLatentReport   shows a LATENT's values as text (exact comparisons through /history)
  FMTTTestGradientCheck  reward gradient through the MODEL (look-ahead + VAE + reward) against finite differences,
                         with and without block checkpointing, and the sampler run both ways
"""
import importlib.util
import json
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import ComfyExtension, io, ui

from fmtt_testing.comfy_pack import pack_module

Reward = io.Custom("FMTT_REWARD")


class TestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestConditioning", category="testing",
                         inputs=[io.Int.Input("seed", default=0, min=0, max=2**31),
                                 io.Int.Input("tokens", default=4, min=1, max=64)],
                         outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, seed, tokens):
        g = torch.Generator().manual_seed(seed)
        return io.NodeOutput([[torch.randn(1, tokens, 64, generator=g),
                               {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]])


class NaNReward(torch.nn.Module):
    name = "NaN"

    def forward(self, images):
        return images.mean((1, 2, 3)) * float("nan")


class TestNaNReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestNaNReward", category="testing", inputs=[], outputs=[Reward.Output()])

    @classmethod
    def execute(cls):
        return io.NodeOutput(NaNReward())


class LinearReward(torch.nn.Module):
    name = "linear test reward"

    def __init__(self, slope):
        super().__init__()
        self.slope = slope

    def forward(self, images):
        return self.slope * images.mean((1, 2, 3))


class TestLinearReward(io.ComfyNode):
    """slope x mean brightness: a reward whose gradient is as steep as asked (run-warning tests)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestLinearReward", category="testing",
                         inputs=[io.Float.Input("slope", default=1.0, min=-1e9, max=1e9)], outputs=[Reward.Output()])

    @classmethod
    def execute(cls, slope):
        return io.NodeOutput(LinearReward(slope))


class TestLatentReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestLatentReport", category="testing", is_output_node=True,
                         inputs=[io.Latent.Input("samples")], outputs=[])

    @classmethod
    def execute(cls, samples):
        x = samples["samples"].float()
        text = json.dumps({"shape": list(x.shape), "values": x.flatten().tolist()})
        return io.NodeOutput(ui=ui.PreviewText(text))


def block_calls(diffusion_model):
    """Counts runs of the first double and single block (forward and backward recompute): a hook on a layer
    inside each block, since a recompute does not go through the block's own __call__."""
    counts = {"double": 0, "single": 0}
    layers = {"double": diffusion_model.double_blocks[0].img_attn.qkv,
              "single": diffusion_model.single_blocks[0].linear1}
    handles = [layer.register_forward_hook(lambda *a, k=k: counts.__setitem__(k, counts[k] + 1))
               for k, layer in layers.items()]
    return counts, handles


class TestGradientCheck(io.ComfyNode):
    """d/dx r(decode(X_t,1(x))) through the real MODEL, by autograd (the pack's autograd) and by central differences,
    with and without block checkpointing; then the FMTT sampler run both ways."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestGradientCheck", category="testing", is_output_node=True,
                         inputs=[io.Model.Input("model"), io.Vae.Input("vae"), Reward.Input("reward"),
                                 io.Conditioning.Input("positive"), io.Int.Input("seed", default=0, min=0, max=2**31),
                                 io.Float.Input("t", default=0.5, min=0.0, max=0.99),
                                 io.Boolean.Input("checkpoint", default=True),
                                 io.Float.Input("h", default=1e-2, min=1e-6, max=1.0, step=1e-6)],
                         outputs=[])

    @classmethod
    def execute(cls, model, vae, reward, positive, seed, t, checkpoint, h):
        clocks, autograd, core = pack_module("nodes.clocks"), pack_module("nodes.autograd"), pack_module("fmtt_core")
        decoding = pack_module("nodes.decoding")
        settings_module, sampler = pack_module("nodes.settings"), pack_module("nodes.comfy_sampler")
        report = {}

        def probe(m, x, sigmas, extra_args=None, callback=None, disable=None):
            guider, base = clocks.guided_parts(m)
            clock = clocks.clock_of(base.model_sampling)
            fn = lambda xc, sigma: m(xc, sigma, **extra_args)  # noqa: E731
            denoiser = clocks.core_denoiser(fn, clock)
            decode, first_stage = decoding.vae_decoder(vae, base)
            g = torch.Generator().manual_seed(seed)
            x0 = torch.randn(x.shape, generator=g)
            direction = torch.randn(x.shape, generator=g)
            tt = torch.full((1,), t)

            def objectives(steps_checkpointed):
                look = core.ODELookahead(denoiser, steps=2, checkpoint=steps_checkpointed)
                return {"lookahead": lambda z: look(z, tt).square().sum(),
                        "reward": lambda z: reward(decode(look(z, tt))).sum()}

            def gradient(f, z):
                z = z.clone().requires_grad_(True)
                return torch.autograd.grad(f(z), z)[0]

            def directional(f, h, along_gradient=False):
                grad = gradient(f, x0)
                # Along the gradient the derivative is largest: the float32 noise of the difference quotient
                # matters least there.
                u = grad / grad.norm() if along_gradient else direction
                with torch.no_grad():
                    fd = (f(x0 + h * u) - f(x0 - h * u)) / (2 * h)
                return {"autograd": float((grad * u).sum()), "finite_difference": float(fd)}

            # (look-ahead steps checkpointed, blocks checkpointed); the last is the sampler's default path.
            variants = {"plain": (False, False), "blocks": (False, True), "steps_and_blocks": (checkpoint, True)}
            grads = {}
            for name, (steps_checkpointed, blocks) in variants.items():
                fs = objectives(steps_checkpointed)
                with autograd.differentiable([base.diffusion_model, first_stage], block_checkpointing=blocks):
                    counts, handles = block_calls(base.diffusion_model)
                    grads[name] = {k: gradient(f, x0) for k, f in fs.items()}
                    for handle in handles:
                        handle.remove()
                    report[f"block_calls_{name}"] = counts
                    if name == "steps_and_blocks":  # The model alone (smooth), then the whole chain.
                        report["lookahead"] = directional(fs["lookahead"], h)
                        report["reward"] = directional(fs["reward"], h, along_gradient=True)
            report["gradient_error"] = {
                name: {k: float((grads[name][k] - grads["plain"][k]).abs().max() / grads["plain"][k].abs().max())
                       for k in grads["plain"]} for name in ("blocks", "steps_and_blocks")}
            return x

        latent = torch.zeros(1, 16, 4, 4)
        sigmas = torch.tensor([1.0, 0.0])
        comfy.sample.sample_custom(model, latent.clone(), 1.0, comfy.samplers.KSAMPLER(probe), sigmas, positive,
                                   positive, latent, seed=seed)

        # The sampler's run path: block checkpointing recomputes blocks and changes nothing in the result.
        runs = {}
        noise = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(seed))
        for blocks in (False, True):
            settings = settings_module.FMTTSettings(reward=reward, vae=vae, particles=2, block_checkpointing=blocks)
            counts, handles = block_calls(model.model.diffusion_model)
            out = comfy.sample.sample_custom(model, noise.clone(), 1.0, sampler.ksampler(settings),
                                             torch.tensor([1.0, 0.75, 0.5, 0.0]), positive, positive, latent, seed=seed)
            for handle in handles:
                handle.remove()
            runs[blocks] = (out, counts)
        report["sampler"] = {"block_calls_off": runs[False][1], "block_calls_on": runs[True][1],
                             "max_difference": float((runs[True][0] - runs[False][0]).abs().max()),
                             "scale": float(runs[False][0].abs().max())}
        report["restored"] = {"in_training": comfy.model_management.in_training,
                              "grad_enabled": torch.is_grad_enabled(),
                              "inference_mode": torch.is_inference_mode_enabled(),
                              "block_forward_patched": any("forward" in vars(b) for b in
                                                           [*model.model.diffusion_model.double_blocks,
                                                            *model.model.diffusion_model.single_blocks])}
        return io.NodeOutput(ui=ui.PreviewText(json.dumps(report)))


def pack_test_nodes(filename):
    """The NODES of a test-node module in the pack's tests/integration/ (the pack is linked next to this folder)."""
    path = Path(__file__).resolve().parents[1] / "comfyui-fmtt" / "tests" / "integration" / filename
    spec = importlib.util.spec_from_file_location("fmtt_" + Path(filename).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NODES


class TestExtension(ComfyExtension):
    async def get_node_list(self):
        return [TestConditioning, TestNaNReward, TestLinearReward, TestLatentReport, TestGradientCheck,
                *pack_test_nodes("flux_flow_map_test_nodes.py"), *pack_test_nodes("family_test_nodes.py"),
                *pack_test_nodes("multigpu_test_nodes.py"), *pack_test_nodes("few_step_test_nodes.py")]


async def comfy_entrypoint():
    return TestExtension()

"""Test-only node for the few-step LoRA look-ahead (loaded by comfy_test_nodes.py inside the test ComfyUI; never
shipped).

  FMTTTestFewStepCompare  the pack's look-ahead X_{t,1}(x) on the sampled MODEL (LoRA beside the weights) against
                          ComfyUI's own sampling of the same LoRA loaded with LoraLoader (+ ModelSamplingDiscrete lcm
                          for LCM) with the named sampler on the look-ahead's sigmas, from the same x; the base
                          model unchanged inside and after the look-ahead's run; the gradient against central
                          differences, with and without block recompute; no hook left behind.
"""
import json

import comfy.model_sampling
import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from fmtt_testing.comfy_pack import pack_module

Lookahead = io.Custom("FMTT_LOOKAHEAD")


def _relative(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


class TestFewStepCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestFewStepCompare", category="testing", is_output_node=True,
                         inputs=[io.Model.Input("model"), io.Model.Input("lora_model"), Lookahead.Input("lookahead"),
                                 io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                                 io.Float.Input("cfg", default=1.0, min=0.0, max=30.0),
                                 io.Float.Input("t", default=0.3, min=0.0, max=0.99),
                                 io.Combo.Input("sampler_name", options=["euler", "lcm"]),
                                 io.Int.Input("size", default=8, min=2, max=64),
                                 io.Float.Input("h", default=1e-2, min=1e-6, max=1.0, step=1e-6)],
                         outputs=[])

    @classmethod
    def execute(cls, model, lora_model, lookahead, positive, negative, cfg, t, sampler_name, size, h):
        clocks, autograd = pack_module("nodes.clocks"), pack_module("nodes.autograd")
        report, box = {}, {}
        channels = model.model.latent_format.latent_channels

        def probe(m, x, sigmas, extra_args=None, callback=None, disable=None):
            _, base = clocks.guided_parts(m)
            clock = clocks.clock_of(base.model_sampling)
            denoiser = clocks.core_denoiser(lambda xc, sigma: m(xc, sigma, **extra_args), clock)
            g = torch.Generator().manual_seed(3)
            tt = torch.full((2,), t)
            x_lin = torch.randn(2, channels, size, size, generator=g) * (1 - t)  # a plausible x_t
            before = denoiser(x_lin, tt)

            def body(companion=None, companion_modules=()):
                look = lookahead.build(denoiser)
                box["out"] = look(x_lin, tt)
                box["grid"] = [float(clock.sigma(v[0])) for v in look.grid(tt, look.steps)]
                report["base_unchanged_inside"] = bool(torch.equal(denoiser(x_lin, tt), before))
                report["lora_effect"] = float((look.denoiser(x_lin, tt) - before).abs().max())
                report["gradients"] = gradients(look, base, x_lin, tt, g)
                return x

            out = lookahead.run_with(base, x, sigmas, 0, body)
            report["base_unchanged_after"] = bool(torch.equal(denoiser(x_lin, tt), before))
            report["hooks_left"] = [n for n, mod in base.diffusion_model.named_modules() if "forward" in vars(mod)]
            report["sampling_hooks_left"] = [k for k in ("timestep", "calculate_denoised")
                                             if k in vars(base.model_sampling)]
            box["x_start"] = clock.from_linear(x_lin, tt)
            return out

        def gradients(look, base, x0, tt, g):
            with torch.inference_mode(False):
                x0, tt = x0.clone(), tt.clone()  # made in ComfyUI's inference mode: normal copies for autograd
                weight, direction = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
                f = lambda z: (look(z, tt) * weight).sum()  # noqa: E731
                out = {}
                for blocks in (False, True):
                    with autograd.differentiable([base.diffusion_model], block_checkpointing=blocks):
                        z = x0.clone().requires_grad_(True)
                        grad = torch.autograd.grad(f(z), z)[0]
                        with torch.no_grad():
                            fd = (f(x0 + h * direction) - f(x0 - h * direction)) / (2 * h)
                    out["blocks" if blocks else "plain"] = {"autograd": float((grad * direction).sum()),
                                                            "finite_difference": float(fd), "grad": grad}
                out["checkpoint_error"] = _relative(out["blocks"].pop("grad"), out["plain"].pop("grad"))
                return out

        latent = torch.zeros(1, channels, size, size)
        sigma_max = float(model.get_model_object("model_sampling").sigma_max)
        comfy.sample.sample_custom(model, latent.clone(), cfg, comfy.samplers.KSAMPLER(probe),
                                   torch.tensor([sigma_max, 0.0]), positive, negative, latent, seed=0)
        # ComfyUI itself: the LoRA merged by LoraLoader, its sampler on the look-ahead's sigmas, from the same x.
        process = lora_model.model.latent_format
        x_start = box["x_start"]
        if isinstance(lora_model.get_model_object("model_sampling"), comfy.model_sampling.CONST):
            x_start = x_start / (1 - box["grid"][0])  # ComfyUI's flow noise scaling: (1 - sigma) x + sigma noise
        start = process.process_out(x_start)
        want = comfy.sample.sample_custom(lora_model, torch.zeros_like(start), cfg,
                                          comfy.samplers.sampler_object(sampler_name), torch.tensor(box["grid"]),
                                          positive, negative, start, seed=0)
        report["sigmas"] = box["grid"]
        got = process.process_out(box["out"])
        report["error"] = _relative(got, want)
        report["error_abs"] = float((got - want).abs().max())
        report["lora_effect"] *= float(process.process_out(torch.ones(1)) - process.process_out(torch.zeros(1)))
        return io.NodeOutput(ui=ui.PreviewText(json.dumps(report)))


NODES = [TestFewStepCompare]

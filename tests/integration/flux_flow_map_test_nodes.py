"""Test-only node for the FLUX flow-map LoRA (loaded by comfy_test_nodes.py inside the test ComfyUI; never shipped).

  FMTTTestFlowMapCompare  the pack's look-ahead X(x, s, t) on the sampled MODEL against diffusers' reference values
                          (written by tiny_flux_flow_map.py), X(x, s, s) = x, 3 jumps against the reference's chain,
                          gradients against finite differences with and without block checkpointing, and that the
                          base model is unchanged outside the look-ahead's calls.
"""
import json

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from fmtt_testing.comfy_pack import pack_module

Lookahead = io.Custom("FMTT_LOOKAHEAD")



def _relative(got, want):
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


class TestFlowMapCompare(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestFlowMapCompare", category="testing", is_output_node=True,
                         inputs=[io.Model.Input("model"), Lookahead.Input("lookahead"),
                                 io.Conditioning.Input("positive"), io.String.Input("reference"),
                                 io.Float.Input("h", default=1e-2, min=1e-6, max=1.0, step=1e-6)],
                         outputs=[])

    @classmethod
    def execute(cls, model, lookahead, positive, reference, h):
        from safetensors import safe_open
        clocks, autograd, core = pack_module("nodes.clocks"), pack_module("nodes.autograd"), pack_module("fmtt_core")
        with safe_open(reference, "pt") as f:
            ref = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        cases, chain = json.loads(meta["cases"]), json.loads(meta["chain"])
        report = {}

        def probe(m, x, sigmas, extra_args=None, callback=None, disable=None):
            _, base = clocks.guided_parts(m)
            clock = clocks.clock_of(base.model_sampling)
            denoiser = clocks.core_denoiser(lambda xc, sigma: m(xc, sigma, **extra_args), clock)
            x_probe = ref["x4"]
            probe_t = torch.full((x_probe.shape[0],), 0.2)
            before = denoiser(x_probe, probe_t)

            def body(companion=None, companion_modules=()):
                flow_map = lookahead.build(denoiser).flow_map
                report["cases"] = []
                for i, case in enumerate(cases):
                    s, t = torch.tensor(1 - case["sigma"]), torch.tensor(1 - case["sigma_next"])
                    got = flow_map(ref[f"x{i}"], s, t)
                    report["cases"].append({**case, "shape": list(got.shape), "error": _relative(got, ref[f"want{i}"]),
                                            "identity": bool(torch.equal(got, ref[f"x{i}"])) if s == t else None})
                three = core.FlowMapLookahead(flow_map, jumps=3)
                got = three(ref["chain_x"], torch.full((ref["chain_x"].shape[0],), 1 - chain[0]))
                report["chain_error"] = _relative(got, ref["chain_want"])
                # Outside the look-ahead's calls the sampled model is the plain base model.
                report["base_unchanged_inside"] = bool(torch.equal(denoiser(x_probe, probe_t), before))
                report["gradients"] = gradients(flow_map, base)
                return x

            out = lookahead.run_with(base, x, sigmas, 0, body)
            report["base_unchanged_after"] = bool(torch.equal(denoiser(x_probe, probe_t), before))
            report["hooks_left"] = [n for n, mod in base.diffusion_model.named_modules() if "forward" in vars(mod)]
            return out

        def gradients(flow_map, base):
            g = torch.Generator().manual_seed(5)
            with torch.inference_mode(False):
                x0 = torch.randn(2, 16, 4, 4, generator=g)
                weight, direction = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
                s, t = torch.tensor(0.3), torch.tensor(0.8)
                f = lambda z: (flow_map(z, s, t) * weight).sum()  # noqa: E731
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

        latent = torch.zeros(1, 16, 4, 4)
        comfy.sample.sample_custom(model, latent.clone(), 1.0, comfy.samplers.KSAMPLER(probe), torch.tensor([1.0, 0.0]),
                                   positive, positive, latent, seed=0)
        return io.NodeOutput(ui=ui.PreviewText(json.dumps(report)))


NODES = [TestFlowMapCompare]

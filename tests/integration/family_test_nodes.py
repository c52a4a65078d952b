"""Test-only ComfyUI nodes for the model-family suite (test_model_families.py), loaded by comfy_test_nodes.py.

  FMTTTestSDConditioning        random CONDITIONING of any text width (SD1.5 768, SDXL 2048) and pooled size
  FMTTTestZImageLoader          a tiny Z-Image (tiny_unets.zimage) as ComfyUI's own ZImage model: ComfyUI detects
                                Z-Image only at width 3840, so the config comes from the file's metadata
  FMTTTestFamilyGradientCheck   the reward gradient through any MODEL (look-ahead + VAE + reward) against central
                                differences, with and without block recomputation, counting block runs
"""
import json

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from fmtt_testing.comfy_pack import pack_module

Reward = io.Custom("FMTT_REWARD")


class TestSDConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestSDConditioning", category="testing",
                         inputs=[io.Int.Input("seed", default=0, min=0, max=2**31),
                                 io.Int.Input("tokens", default=4, min=1, max=77),
                                 io.Int.Input("context_dim", default=768, min=1, max=8192),
                                 io.Int.Input("pooled_dim", default=0, min=0, max=8192)],
                         outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, seed, tokens, context_dim, pooled_dim):
        g = torch.Generator().manual_seed(seed)
        extra = {"pooled_output": torch.randn(1, pooled_dim, generator=g)} if pooled_dim else {}
        return io.NodeOutput([[torch.randn(1, tokens, context_dim, generator=g), extra]])


class TestZImageLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestZImageLoader", category="testing",
                         inputs=[io.String.Input("unet_name", default="tiny_zimage.safetensors")],
                         outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, unet_name):
        """What comfy.sd.load_diffusion_model does once detection has named the config: ZImage(unet_config)."""
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
        config = comfy.supported_models.ZImage(json.loads(metadata["fmtt.tiny_zimage"]))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model(sd, "")
        patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                                       offload_device=comfy.model_management.unet_offload_device())
        model.load_model_weights(sd, "", assign=patcher.is_dynamic())
        return io.NodeOutput(patcher)


def block_runs(lists):
    """Counts runs of the first block of each block list (forward and backward recompute), by a hook on the first
    linear layer inside it: a recompute does not go through the block's own __call__."""
    counts, handles = {}, []
    for name in lists:
        layer = next(m for m in lists[name][0].modules() if isinstance(m, torch.nn.Linear))
        counts[name] = 0
        handles.append(layer.register_forward_hook(lambda *a, k=name: counts.__setitem__(k, counts[k] + 1)))
    return counts, handles


class TestFamilyGradientCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FMTTTestFamilyGradientCheck", category="testing", is_output_node=True,
                         inputs=[io.Model.Input("model"), io.Vae.Input("vae"), Reward.Input("reward"),
                                 io.Conditioning.Input("positive"), io.Conditioning.Input("negative"),
                                 io.Float.Input("cfg", default=1.0, min=0.0, max=30.0),
                                 io.Int.Input("seed", default=0, min=0, max=2**31),
                                 io.Float.Input("t", default=0.5, min=0.0, max=0.99),
                                 io.Float.Input("h", default=1e-2, min=1e-6, max=1.0, step=1e-6),
                                 io.Int.Input("size", default=8, min=2, max=64)],
                         outputs=[])

    @classmethod
    def execute(cls, model, vae, reward, positive, negative, cfg, seed, t, h, size):
        clocks, autograd, core = pack_module("nodes.clocks"), pack_module("nodes.autograd"), pack_module("fmtt_core")
        decoding = pack_module("nodes.decoding")
        report = {}

        def probe(m, x, sigmas, extra_args=None, callback=None, disable=None):
            _, base = clocks.guided_parts(m)
            report["family"] = type(base.model_config).__name__
            report["sampling"] = [c.__name__ for c in type(base.model_sampling).__mro__]
            report["clock"] = clocks.clock_of(base.model_sampling).kind
            denoiser = clocks.core_denoiser(lambda xc, sigma: m(xc, sigma, **extra_args),
                                            clocks.clock_of(base.model_sampling))
            decode, first_stage = decoding.vae_decoder(vae, base)
            g = torch.Generator().manual_seed(seed)
            x0, direction = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
            tt = torch.full((1,), t)
            look = core.ODELookahead(denoiser, steps=2, checkpoint=False)
            fs = {"lookahead": lambda z: look(z, tt).square().sum(),
                  "reward": lambda z: reward(decode(look(z, tt))).sum()}

            def gradient(f, z):
                z = z.clone().requires_grad_(True)
                return torch.autograd.grad(f(z), z)[0]

            lists = autograd.block_lists(base.diffusion_model)
            report["block_lists"] = list(lists)
            grads = {}
            for blocks in (False, True):
                with autograd.differentiable([base.diffusion_model, first_stage], block_checkpointing=blocks):
                    counts, handles = block_runs(lists)
                    grads[blocks] = {k: gradient(f, x0) for k, f in fs.items()}
                    for handle in handles:
                        handle.remove()
                    report[f"block_runs_{'recomputed' if blocks else 'plain'}"] = counts
                    if blocks:
                        u = direction
                        with torch.no_grad():
                            fd = (fs["lookahead"](x0 + h * u) - fs["lookahead"](x0 - h * u)) / (2 * h)
                        report["lookahead"] = {"autograd": float((grads[True]["lookahead"] * u).sum()),
                                               "finite_difference": float(fd)}
                        u = grads[True]["reward"] / grads[True]["reward"].norm()  # largest slope: least noise
                        with torch.no_grad():
                            fd = (fs["reward"](x0 + h * u) - fs["reward"](x0 - h * u)) / (2 * h)
                        report["reward"] = {"autograd": float((grads[True]["reward"] * u).sum()),
                                            "finite_difference": float(fd)}
            report["recompute_error"] = {
                k: float((grads[True][k] - grads[False][k]).abs().max() / grads[False][k].abs().max())
                for k in fs}
            return x

        channels = model.model.latent_format.latent_channels
        latent = torch.zeros(1, channels, size, size)
        sigma = float(model.get_model_object("model_sampling").sigma_max)
        comfy.sample.sample_custom(model, latent.clone(), cfg, comfy.samplers.KSAMPLER(probe),
                                   torch.tensor([sigma, 0.0]), positive, negative, latent, seed=seed)
        report["restored"] = {"grad_enabled": torch.is_grad_enabled(),
                              "inference_mode": torch.is_inference_mode_enabled(),
                              "block_forward_patched": any(
                                  "forward" in vars(b)
                                  for blocks in autograd.block_lists(model.model.diffusion_model).values()
                                  for b in blocks)}
        return io.NodeOutput(ui=ui.PreviewText(json.dumps(report)))


NODES = [TestSDConditioning, TestZImageLoader, TestFamilyGradientCheck]

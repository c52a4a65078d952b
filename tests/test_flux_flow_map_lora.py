"""The FLUX two-time flow-map LoRA without ComfyUI (fmtt_core.flow_maps): what the pack reads from a file saved by
diffusers is what diffusers itself loads, the jump it defines matches diffusers + FMRG's DualTimeEmbedder, and
wrong files are told apart with errors that name the fix. The same comparison inside a real ComfyUI is
tests/integration/test_flux_flow_map.py."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from fmtt_core.flow_maps import (
    FlowMapLoRAError,
    average_embeddings,
    inspect_two_time_lora,
    jump_from_denoiser,
    sigma_jump,
)
from fmtt_core.flow_maps.two_time_lora import ORIGINAL, SECOND

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fmtt_testing import flux_flow_map_reference as ref  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_lora")
    base = ref.tiny_transformer()
    return base, ref.save_flow_map_lora(base, folder / "flow.safetensors"), folder


class PackDualTime(torch.nn.Module):
    """The two-time model the pack's reading of the file defines, built on plain diffusers modules: every LoRA
    merged into its layer (scale from the file), the second embedder a copy of time_text_embed with its own LoRA."""

    def __init__(self, base, info, tensors):
        super().__init__()
        self.model = copy.deepcopy(base)
        second = copy.deepcopy(self.model.time_text_embed)
        with torch.no_grad():
            for modules, layers in ((self.model, info.base), (second, info.second)):
                for name, layer in layers.items():
                    modules.get_submodule(name).weight += layer.delta(tensors)
                    if layer.bias is not None:  # peft's lora_bias=True
                        modules.get_submodule(name).bias += layer.bias_delta(tensors)
        first = self.model.time_text_embed

        class Dual(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.first, self.second = first, second

            def forward(self, timestep, guidance, pooled):
                return average_embeddings(self.first(timestep[:, 0], guidance, pooled),
                                          self.second(timestep[:, 1], guidance, pooled))

        self.model.time_text_embed = Dual()

    def forward(self, **kw):
        return self.model(**kw)


def test_keys_of_a_diffusers_saved_flow_map_lora(files):
    _, path, _ = files
    info = inspect_two_time_lora(path)
    assert info.format == "fmrg_dual_time" and info.rank == 4
    header_keys = set(json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]))
    embedder_keys = {k for k in header_keys if ORIGINAL in k or SECOND in k}
    # diffusers writes the embedders under the wrapper's names; the pack reads every key of the file.
    assert embedder_keys and set(info.keys()) == header_keys - {"__metadata__"}
    assert set(info.second) == {f"{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder",
                                                           "text_embedder") for i in (1, 2)}
    assert "time_text_embed.timestep_embedder.linear_1" in info.base  # original embedder = the model's own
    assert not any("original_embedder" in k for k in info.base) and not info.second_full
    assert {round(layer.scale, 6) for layer in [*info.base.values(), *info.second.values()]} == {2.0}  # alpha 8 / r 4


@pytest.mark.parametrize("size, lora_bias", [((4, 4), False), ((6, 8), False), ((4, 4), True)],
                         ids=["32px", "48x64px", "peft_lora_bias"])
def test_pack_reading_matches_diffusers_fmrg_reference(files, size, lora_bias, tmp_path):
    base, path, _ = files
    if lora_bias:  # a legal peft LoRA with a bias on every B (issue 20): read, and it counts
        path = ref.save_flow_map_lora(base, tmp_path / "flow_bias.safetensors", lora_bias=True)
    info = inspect_two_time_lora(path)
    assert all((layer.bias is not None) == lora_bias for layer in [*info.base.values(), *info.second.values()])
    pack = PackDualTime(base, info, info.load_tensors()).eval()
    reference = ref.load_like_fmrg(base, path)
    context, pooled = ref.conditioning(3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 16, *size, generator=g)
            for sigma, sigma_next in [(1.0, 0.0), (0.8, 0.3), (0.5, 0.45), (0.3, 0.0), (0.9, 0.9)]:
                want = ref.reference_jump(reference, x, sigma, sigma_next, context, pooled)
                got = ref.reference_jump(pack, x, sigma, sigma_next, context, pooled)
                # float32 rounding: merged weights (the pack's reading) vs. peft's separate LoRA path
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
                if sigma == sigma_next:
                    assert torch.equal(want, x)
        # The LoRA matters (else the comparison proves nothing): the plain model's jump is far off.
        plain = ref.add_dual_time_embedder(copy.deepcopy(base))
        off = ref.reference_jump(plain, x, 0.8, 0.3, context, pooled) - ref.reference_jump(reference, x, 0.8, 0.3,
                                                                                          context, pooled)
        assert off.abs().max() > 1e-2
        # ... and so does the second time: the jump depends on sigma' through more than (sigma' - sigma).
        u1 = (ref.reference_jump(reference, x, 0.8, 0.3, context, pooled) - x) / -0.5
        u2 = (ref.reference_jump(reference, x, 0.8, 0.6, context, pooled) - x) / -0.2
        assert (u1 - u2).abs().max() > 1e-3


def test_jump_math_in_both_clocks():
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sigma, sigma_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.4, 0.5, 0.0])
    x_sigma = sigma_jump(z, sigma, sigma_next, u)
    # ComfyUI's flow models return D = z - sigma u; the core clock is t = 1 - sigma.
    x_core = jump_from_denoiser(z, 1 - sigma, 1 - sigma_next, z - sigma.view(-1, 1, 1, 1) * u)
    torch.testing.assert_close(x_core, x_sigma)
    torch.testing.assert_close(x_sigma[1], z[1])  # X(z; s -> s) = z


# ------------------------------------------------------------------ wrong files

def test_an_ordinary_flux_lora_is_refused_with_the_fix(files, tmp_path):
    base, _, _ = files
    path = ref.save_plain_lora(base, tmp_path / "style.safetensors")
    with pytest.raises(FlowMapLoRAError, match="not a flow-map LoRA; load it with LoraLoader"):
        inspect_two_time_lora(path)


def test_lora_of_another_family_full_models_and_own_format_are_named(tmp_path):
    a, b = torch.zeros(2, 8), torch.zeros(8, 2)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": a,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": b}, tmp_path / "sdxl.safetensors")
    with pytest.raises(FlowMapLoRAError, match="LoRA for SD1.x / SDXL, not for FLUX.1-dev"):
        inspect_two_time_lora(tmp_path / "sdxl.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, tmp_path / "full.safetensors")
    with pytest.raises(FlowMapLoRAError, match="is not a LoRA"):
        inspect_two_time_lora(tmp_path / "full.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "own.safetensors", {"fmtt.format": "flow_map"})
    with pytest.raises(FlowMapLoRAError, match="flow map file"):
        inspect_two_time_lora(tmp_path / "own.safetensors")


def test_truncated_and_half_pairs_are_refused(files, tmp_path):
    _, path, _ = files
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlowMapLoRAError.__mro__[1], match="truncated"):
        inspect_two_time_lora(tmp_path / "cut.safetensors")
    save_file({f"transformer.{SECOND}timestep_embedder.linear_1.lora_A.weight": torch.zeros(2, 8)},
              tmp_path / "half.safetensors")
    with pytest.raises(FlowMapLoRAError, match="incomplete"):
        inspect_two_time_lora(tmp_path / "half.safetensors")


def test_full_second_embedder_tensors_are_read_as_replacements(tmp_path):
    """A save with the second embedder in peft's modules_to_save holds full tensors; they replace the copy's."""
    w = torch.zeros(8, 4)
    save_file({f"transformer.{SECOND}timestep_embedder.linear_1.weight": w,
               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)},
              tmp_path / "full_second.safetensors")
    info = inspect_two_time_lora(tmp_path / "full_second.safetensors")
    assert info.second_full == {"timestep_embedder.linear_1.weight":
                                f"transformer.{SECOND}timestep_embedder.linear_1.weight"}
    assert info.base["transformer_blocks.0.attn.to_q"].scale == 1.0  # no metadata, no alpha: diffusers' scale 1


def test_disagreeing_ranks_are_refused_when_read_naming_the_layer(tmp_path):
    """A and B of one layer with different ranks: refused at inspection (diffusers refuses it at load), not later
    with a raw shape error inside the second embedder."""
    save_file({f"transformer.{SECOND}timestep_embedder.linear_1.lora_A.weight": torch.zeros(4, 8),
               f"transformer.{SECOND}timestep_embedder.linear_1.lora_B.weight": torch.zeros(8, 2)},
              tmp_path / "ranks.safetensors")
    with pytest.raises(FlowMapLoRAError, match=r"ranks\.safetensors.*second_embedder\.timestep_embedder\.linear_1"
                                               r".*ranks disagree"):
        inspect_two_time_lora(tmp_path / "ranks.safetensors")


def test_a_kohya_named_flow_map_lora_is_called_what_it_is(tmp_path):
    name = "lora_transformer_time_text_embed_second_embedder_timestep_embedder_linear_1"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 8), f"{name}.lora_up.weight": torch.zeros(8, 2)},
              tmp_path / "kohya_flow.safetensors")
    with pytest.raises(FlowMapLoRAError, match="two-time flow-map LoRA in kohya naming") as error:
        inspect_two_time_lora(tmp_path / "kohya_flow.safetensors")
    assert "ordinary" not in str(error.value) and "no second time embedder" not in str(error.value)

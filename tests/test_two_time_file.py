"""The pack's two-time flow-map LoRA file: what is written is read back, and incomplete files are refused."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmtt_core import FMTTInputError
from fmtt_core.flow_maps.two_time_file import is_two_time_lora, load_two_time_lora, save_two_time_lora

META = {"family": "SD1.5 / SDXL", "base_model_hash": "0123abcd", "clock": "ve", "cfg": 5.0, "resolution": "64x64",
        "objective": "lsd", "steps": 12, "rank": 2, "embedders": ["time_embed"]}


def pairs(seed):
    g = torch.Generator().manual_seed(seed)
    return {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (torch.randn(2, 8, generator=g),
                                                                 torch.randn(8, 2, generator=g))}


def test_round_trip(tmp_path):
    path = tmp_path / "map.safetensors"
    base, second = pairs(0), {"time_embed.0": (torch.randn(2, 4), torch.randn(6, 2))}
    save_two_time_lora(path, base, second, META)
    assert is_two_time_lora(path)
    got_base, got_second, meta = load_two_time_lora(path)
    for want, got in ((base, got_base), (second, got_second)):
        assert set(want) == set(got)
        for k in want:
            assert all(torch.equal(a, b) for a, b in zip(want[k], got[k]))
    assert meta["cfg"] == 5.0 and meta["steps"] == 12 and meta["embedders"] == ["time_embed"]
    assert meta["family"] == "SD1.5 / SDXL" and meta["base_model_hash"] == "0123abcd"


def test_missing_metadata_is_refused_when_writing_and_reading(tmp_path):
    with pytest.raises(ValueError, match="base_model_hash"):
        save_two_time_lora(tmp_path / "a.safetensors", pairs(0), {}, {k: v for k, v in META.items()
                                                                     if k != "base_model_hash"})
    path = tmp_path / "b.safetensors"
    save_two_time_lora(path, pairs(0), {}, META)
    tensors = load_file(path)
    save_file(tensors, path, {"fmtt.format": "two_time_lora"})
    with pytest.raises(FMTTInputError, match="lacks the metadata"):
        load_two_time_lora(path)


def test_half_a_lora_is_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    save_two_time_lora(path, pairs(0), {}, META)
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith("lora_up.weight")}
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, path, meta)
    with pytest.raises(FMTTInputError, match="incomplete"):
        load_two_time_lora(path)


def test_other_files_are_not_taken_for_one(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    assert not is_two_time_lora(path)
    with pytest.raises(FMTTInputError, match="not a two-time flow-map LoRA"):
        load_two_time_lora(path)

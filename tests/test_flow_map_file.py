"""The pack's flow-map file format (fmtt_core/flow_maps/conv_resnet.py, pure torch): what a user exports is what
the look-ahead node reads, X_{s,s} is the identity, and bad files get errors that say what is expected."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fmtt_core.flow_maps import conv_resnet as fmf
from fmtt_testing.damaged_files import DAMAGES


def tiny(seed=0):
    torch.manual_seed(seed)
    net = fmf.ConvFlowMap(channels=4, width=8, depth=2, n_freq=3, groups=4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_round_trip_gives_the_same_map(tmp_path):
    net = tiny()
    fmf.save_flow_map(net, tmp_path / "map.safetensors")
    loaded = fmf.load_flow_map(tmp_path / "map.safetensors")
    x = torch.randn(3, 4, 6, 5)
    s, t = torch.tensor([0.0, 0.3, 0.9]), torch.ones(3)
    torch.testing.assert_close(loaded(x, s, t), net(x, s, t))
    assert not any(p.requires_grad for p in loaded.parameters())


def test_identity_at_equal_times_and_differentiable_in_x():
    net = tiny(1)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    s = torch.tensor([0.2, 0.7])
    torch.testing.assert_close(net(x, s, s), x)
    y = net(x, s, torch.ones(2))
    assert not torch.allclose(y, x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_a_file_written_by_hand_from_the_documented_layout_loads(tmp_path):
    """Someone exporting from another framework writes tensors by the documented names and the metadata."""
    net = tiny(2)
    tensors = {k: v.clone() for k, v in net.state_dict().items()}
    meta = {"fmtt.format": "flow_map", "fmtt.version": "1", "fmtt.architecture": "conv_resnet",
            "fmtt.config": json.dumps({"channels": 4, "width": 8, "depth": 2, "n_freq": 3, "groups": 4})}
    documented = {"inp.weight", "inp.bias", "cond.0.weight", "cond.0.bias", "cond.2.weight", "cond.2.bias",
                  "out.weight", "out.bias"} | {f"blocks.{i}.{m}.{p}" for i in range(2)
                                               for m in ("film", "conv1", "conv2") for p in ("weight", "bias")}
    assert set(tensors) == documented
    save_file(tensors, str(tmp_path / "export.safetensors"), meta)
    x = torch.randn(1, 4, 3, 3)
    torch.testing.assert_close(fmf.load_flow_map(tmp_path / "export.safetensors")(x, 0.1, 1.0), net(x, 0.1, 1.0))


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(fmf.FlowMapFileError, match="does not exist"):
        fmf.load_flow_map(tmp_path / "nope.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(fmf.FlowMapFileError, match="not an FMTT flow-map file"):
        fmf.load_flow_map(tmp_path / "other.safetensors")
    net = tiny()
    state = net.state_dict()
    meta = {"fmtt.format": "flow_map", "fmtt.version": "1", "fmtt.architecture": "conv_resnet",
            "fmtt.config": json.dumps({**net.config, "width": 16, "groups": 4})}
    save_file(state, str(tmp_path / "mismatch.safetensors"), meta)
    with pytest.raises(fmf.FlowMapFileError, match="do not fit the declared config"):
        fmf.load_flow_map(tmp_path / "mismatch.safetensors")
    save_file(state, str(tmp_path / "v2.safetensors"), {**meta, "fmtt.version": "2"})
    with pytest.raises(fmf.FlowMapFileError, match="this pack reads version 1"):
        fmf.load_flow_map(tmp_path / "v2.safetensors")


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_files_get_the_packs_damaged_file_check(tmp_path, damage):
    """The same check as the LoRA and reward files: the file named, what is wrong, and the fix."""
    good = tmp_path / "good.safetensors"
    fmf.save_flow_map(tiny(), good)
    bad = tmp_path / f"{damage}.safetensors"
    make, said = DAMAGES[damage]
    bad.write_bytes(make(good.read_bytes()))
    with pytest.raises(fmf.FlowMapFileError, match=said) as e:
        fmf.load_flow_map(bad)
    assert str(bad) in str(e.value) and "Download or copy it again" in str(e.value)


def test_a_file_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    net = tiny()
    with torch.no_grad():
        net.blocks[1].conv2.weight[0, 0, 0, 0] = float("nan")
    fmf.save_flow_map(net, tmp_path / "nan.safetensors")
    with pytest.raises(fmf.FlowMapFileError, match=r"blocks\.1\.conv2\.weight hold NaN / inf") as e:
        fmf.load_flow_map(tmp_path / "nan.safetensors")
    assert "nan.safetensors" in str(e.value)

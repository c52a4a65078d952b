"""CLIP-family rewards (CLIP score, PickScore, HPSv2, LAION aesthetic, ImageReward) on tiny random models
of the real architectures, written to disk in the formats users have and loaded through the public loaders.

Each reward is checked against the reference computation of its own library (open_clip's CLIP forward,
transformers' CLIPModel logits, timm's ViT for BLIP's image encoder), for the reward contract (shape,
finiteness, determinism, chunking, pixel gradients equal to finite differences), for offline loading
(sockets blocked, download functions poisoned) and for clear errors on bad inputs and bad files.
"""
from __future__ import annotations

import json
import os
import socket
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fmtt_rewards as R
from fmtt_rewards.base import RewardInputError
from fmtt_rewards.local_files import RewardFilesError, RewardWeightsError, hub_offline
from fmtt_rewards.preprocess import ClipTransform
from fmtt_testing.hf_models import perturb_, register_open_clip_archs, write_hf_clip_folder

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

PROMPT = "a photo of a red cat on the grass"
TINY_ARCH = "fmtt-test-tiny-vit"  # registered below; a real open_clip ViT/text-transformer CLIP, just small
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
OTHER_ARCH = "fmtt-test-tiny-vit-wide"
OTHER_CFG = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 96}}


# ---------------------------------------------------------------- no network, ever

@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt or download call fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import huggingface_hub
    import open_clip.factory
    import open_clip.pretrained
    for module, name in ((open_clip.pretrained, "download_pretrained"), (open_clip.factory, "download_pretrained"),
                         (open_clip.pretrained, "download_pretrained_from_hf"),
                         (open_clip.factory, "download_pretrained_from_hf"), (huggingface_hub, "hf_hub_download"),
                         (huggingface_hub, "snapshot_download")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, refuse)


# ---------------------------------------------------------------- tiny models in user formats

@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(open_clip model, safetensors path, HPSv2-style .pt path) for the tiny architecture."""
    d = tmp_path_factory.mktemp("open_clip")
    register_open_clip_archs(d, {TINY_ARCH: TINY_CFG, OTHER_ARCH: OTHER_CFG})
    torch.manual_seed(0)
    model = perturb_(open_clip.create_model(TINY_ARCH), seed=1).eval()
    model.logit_scale.data.fill_(3.0)
    state = model.state_dict()
    save_file(state, d / "open_clip_model.safetensors")
    torch.save({"state_dict": OrderedDict(state)}, d / "HPS_v2_compressed.pt")  # HPSv2's checkpoint layout
    return model, d / "open_clip_model.safetensors", d / "HPS_v2_compressed.pt"


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """(CLIPModel, folder) of a transformers CLIP folder (fmtt_testing.hf_models.write_hf_clip_folder)."""
    folder = tmp_path_factory.mktemp("hf_clip")
    return write_hf_clip_folder(folder), folder


class PublishedHead(torch.nn.Module):
    """improved-aesthetic-predictor's MLP (also ImageReward's head), written out here independently
    of the package: its state-dict keys are layers.0/2/4/6/7.weight/bias."""

    def __init__(self, width: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(width, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


def aesthetic_mlp(width: int, seed: int) -> PublishedHead:
    torch.manual_seed(seed)
    return PublishedHead(width).eval()


def images(b=3, h=40, w=48, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Non-square images (exercise resize + crop) strictly inside [0, 1] (room for finite differences)."""
    g = torch.Generator().manual_seed(seed)
    return (0.1 + 0.8 * torch.rand(b, 3, h, w, generator=g)).to(dtype)


# ---------------------------------------------------------------- the reward contract

def check_contract(reward, reward64):
    """Shape / dtype / finiteness, determinism, chunking, and d reward / d pixels == finite differences.

    reward64 is the same reward loaded with dtype=float64: the finite-difference check runs `score`
    (the per-chunk computation) in float64 so that the comparison is tight.
    """
    x = images(b=5)
    s = reward(x)
    assert s.shape == (5,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert torch.equal(reward(x), s), "not deterministic"
    assert s.std() > 0, "different images should get different scores"

    saved, reward.chunk_size = reward.chunk_size, 2  # chunks of 2, 2, 1
    torch.testing.assert_close(reward(x), s, rtol=1e-5, atol=1e-5)
    reward.chunk_size = saved

    x.requires_grad_(True)
    reward(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

    x64 = images(b=2, seed=1, dtype=torch.float64).requires_grad_(True)
    reward64.evaluate(x64).sum().backward()
    direction = torch.randn(x64.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h = 1e-4
    with torch.no_grad():
        fd = (reward64.evaluate(x64 + h * direction).sum() - reward64.evaluate(x64 - h * direction).sum()) / (2 * h)
    analytic = (x64.grad * direction).sum()
    assert abs(analytic.item()) > 1e-8
    torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-9)
    # the float32 public path has the same gradient as the float64 one
    x32 = x64.detach().float().requires_grad_(True)
    reward(x32).sum().backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-2, atol=1e-5)


def check_bad_images(reward):
    with pytest.raises(RewardInputError, match=r"3 \(RGB\) channels"):
        reward(torch.rand(2, 4, 32, 32))
    with pytest.raises(RewardInputError, match=r"\[0, 1\].*\(x \+ 1\) / 2"):
        reward(torch.rand(2, 3, 32, 32) * 2 - 1)


# ---------------------------------------------------------------- open_clip: CLIP score and HPSv2

def test_open_clip_score_matches_open_clip_and_keeps_contract(tiny_open_clip):
    model, weights, _ = tiny_open_clip
    reward = R.load_open_clip_score(TINY_ARCH, weights, PROMPT)
    x = images()
    with torch.no_grad():
        # open_clip's own forward on the same pixels: features are unit vectors, logit_scale multiplies
        feats_img, feats_txt, logit_scale = model(reward.backbone.transform(x),
                                                  open_clip.get_tokenizer(TINY_ARCH)([PROMPT]))
        expected = logit_scale * (feats_img @ feats_txt.T)[:, 0]
    torch.testing.assert_close(reward(x), expected, rtol=1e-5, atol=1e-5)
    check_contract(reward, R.load_open_clip_score(TINY_ARCH, weights, PROMPT, dtype=torch.float64))
    check_bad_images(reward)


def test_open_clip_score_matches_open_clip_pil_pipeline(tiny_open_clip):
    """End to end against open_clip's reference preprocessing (PIL resize, crop, normalise)."""
    import numpy as np
    from PIL import Image

    _, weights, _ = tiny_open_clip
    ref_model, _, preprocess = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(weights))
    ref_model.eval()
    reward = R.load_open_clip_score(TINY_ARCH, weights, PROMPT)
    x = F.avg_pool2d(images(b=2, h=70, w=90), 3, 1, 1)  # smooth, like real images
    x8 = (x * 255).round().to(torch.uint8)
    pil = [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).numpy())) for im in x8]
    with torch.no_grad():
        feats_img, feats_txt, scale = ref_model(torch.stack([preprocess(p) for p in pil]),
                                                open_clip.get_tokenizer(TINY_ARCH)([PROMPT]))
        expected = scale * (feats_img @ feats_txt.T)[:, 0]
    ours = reward(x8.float() / 255)
    # PIL rounds its resized pixels to uint8; everything else is the same computation
    torch.testing.assert_close(ours, expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_set_prompt_changes_the_text_side(tiny_open_clip):
    _, weights, _ = tiny_open_clip
    reward = R.load_open_clip_score(TINY_ARCH, weights, PROMPT)
    x = images()
    before = reward(x)
    reward.set_prompt("a blue dog")
    other = R.load_open_clip_score(TINY_ARCH, weights, "a blue dog")
    torch.testing.assert_close(reward(x), other(x))
    assert not torch.allclose(before, other(x))
    with pytest.raises(ValueError, match="non-empty string"):
        reward.set_prompt("  ")


def test_hpsv2_is_the_cosine_as_in_the_hpsv2_repo(tiny_open_clip):
    model, _, hps_checkpoint = tiny_open_clip
    reward = R.load_hpsv2(hps_checkpoint, PROMPT, arch=TINY_ARCH, chunk_size=2)
    x = images()
    with torch.no_grad():
        # hpsv2/img_score.py: output_dict forward, image_features @ text_features.T, diagonal
        model.output_dict = True
        out = model(reward.backbone.transform(x), open_clip.get_tokenizer(TINY_ARCH)([PROMPT]))
        model.output_dict = False
        expected = (out["image_features"] @ out["text_features"].T)[:, 0]
    torch.testing.assert_close(reward(x), expected, rtol=1e-5, atol=1e-6)
    assert reward(x).abs().max() <= 1
    check_contract(reward, R.load_hpsv2(hps_checkpoint, PROMPT, arch=TINY_ARCH, dtype=torch.float64))


def test_open_clip_loader_errors(tiny_open_clip, tmp_path):
    _, weights, _ = tiny_open_clip
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(RewardFilesError, match=r"HPS_v2\.1_compressed\.pt' does not exist.*open_clip state dict"):
        R.load_hpsv2(missing, PROMPT)
    with pytest.raises(ValueError, match=r"unknown open_clip architecture 'ViT-Nope-1'.*list_models"):
        R.load_open_clip_score("ViT-Nope-1", weights, PROMPT)
    with pytest.raises(ValueError, match="Hugging Face hub, which this pack never downloads"):
        R.load_open_clip_score("ViT-B-16-SigLIP", weights, PROMPT)
    with pytest.raises(RewardWeightsError, match=r"(?s)do not fit.*architecture.*shape mismatches \([1-9]"):
        R.load_open_clip_score(OTHER_ARCH, weights, PROMPT)
    # a pickle carrying a Python object is refused (torch.load weights_only=True), with the fix
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {}, "hook": UnsafeObject()}, unsafe)
    with pytest.raises(RewardWeightsError, match=r"(?s)weights_only=True.*safetensors"):
        R.load_open_clip_score(TINY_ARCH, unsafe, PROMPT)


class UnsafeObject:
    pass


def test_half_precision_rewards_track_float32(tiny_open_clip, tiny_imagereward):
    _, weights, _ = tiny_open_clip
    _, _, _, checkpoint, tokenizer = tiny_imagereward
    loaders = (partial(R.load_open_clip_score, TINY_ARCH, weights, PROMPT),
               partial(R.load_imagereward, checkpoint, tokenizer, PROMPT))
    x = images()
    for load in loaders:
        full, half = load(), load(dtype=torch.bfloat16)
        xh = x.clone().requires_grad_(True)
        scores = half(xh)
        scores.sum().backward()
        assert scores.dtype == torch.float32 and xh.grad.dtype == torch.float32
        torch.testing.assert_close(scores, full(x), rtol=0, atol=0.05 * full(x).abs().max().item())


def test_loaders_leave_hub_settings_as_they_were(tiny_open_clip, monkeypatch):
    import huggingface_hub.constants as hub_constants

    _, weights, _ = tiny_open_clip
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    flag = hub_constants.HF_HUB_OFFLINE
    with hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
        assert hub_constants.HF_HUB_OFFLINE is True
    R.load_open_clip_score(TINY_ARCH, weights, PROMPT)
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"
    assert hub_constants.HF_HUB_OFFLINE == flag


# ---------------------------------------------------------------- transformers CLIP: CLIP score and PickScore

def test_pickscore_matches_clipmodel_logits_and_keeps_contract(tiny_hf_clip):
    model, folder = tiny_hf_clip
    reward = R.load_pickscore(folder, PROMPT)
    x = images()
    tokenizer = transformers.CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    # the tensor (torchvision) image processor; transformers 4's default one goes through PIL and uint8
    processor_class = getattr(transformers, "CLIPImageProcessorFast", transformers.CLIPImageProcessor)
    processor = processor_class.from_pretrained(str(folder), local_files_only=True)
    pixels = processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
    # preprocessing read from preprocessor_config.json (resize 36, crop 32, custom mean / std)
    torch.testing.assert_close(reward.backbone.transform(x), pixels, rtol=0, atol=3e-2)
    with torch.no_grad():
        # PickScore's reference: logit_scale.exp() * cosine == CLIPModel's logits_per_image
        logits = model(**tokenizer([PROMPT], return_tensors="pt"), pixel_values=reward.backbone.transform(x))
    torch.testing.assert_close(reward(x), logits.logits_per_image[:, 0], rtol=1e-5, atol=1e-5)
    check_contract(reward, R.load_pickscore(folder, PROMPT, dtype=torch.float64))
    check_bad_images(reward)


def test_hf_clip_score_cosine_scale_and_separate_tokenizer_folder(tiny_hf_clip, tmp_path):
    model, folder = tiny_hf_clip
    model_only = tmp_path / "model"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (model_only / name).symlink_to(folder / name)
    cosine = R.load_hf_clip_score(model_only, PROMPT, scale="cosine", tokenizer_folder=folder)
    logit = R.load_hf_clip_score(folder, PROMPT)
    x = images()
    torch.testing.assert_close(logit(x), model.logit_scale.exp().item() * cosine(x), rtol=1e-5, atol=1e-5)
    # without preprocessor_config.json: the model's image size and the CLIP statistics
    (model_only / "preprocessor_config.json").unlink()
    plain = R.load_hf_clip_score(model_only, PROMPT, tokenizer_folder=folder)
    assert plain.backbone.transform == ClipTransform(size=32, crop_offset="floor")


def test_hf_clip_folder_errors_list_expected_files(tiny_hf_clip, tmp_path):
    _, folder = tiny_hf_clip
    with pytest.raises(RewardFilesError, match=r"does not exist.*config\.json.*model\.safetensors"):
        R.load_pickscore(tmp_path / "PickScore_v1", PROMPT)
    partial_folder = tmp_path / "partial"
    partial_folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (partial_folder / name).symlink_to(folder / name)
    with pytest.raises(RewardFilesError) as err:
        R.load_pickscore(partial_folder, PROMPT)
    message = str(err.value)
    assert "incomplete" in message and "CLIP tokenizer: tokenizer.json or vocab.json+merges.txt" in message
    assert "Missing:\n  - CLIP tokenizer" in message and "- weights" not in message
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    for name in ("model.safetensors", "vocab.json", "merges.txt"):
        (not_clip / name).symlink_to(folder / name)
    (not_clip / "config.json").write_text(json.dumps({"model_type": "siglip"}))
    with pytest.raises(RewardFilesError, match="model_type 'siglip', expected 'clip'"):
        R.load_hf_clip_score(not_clip, PROMPT)


# ---------------------------------------------------------------- LAION aesthetic predictor

def test_aesthetic_on_open_clip_matches_reference_and_keeps_contract(tiny_open_clip, tmp_path):
    model, weights, _ = tiny_open_clip
    head = aesthetic_mlp(TINY_CFG["embed_dim"], seed=4)
    torch.save(head.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")  # the published format
    reward = R.load_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", weights, clip_arch=TINY_ARCH)
    x = images()
    with torch.no_grad():
        expected = head(F.normalize(model.encode_image(reward.backbone.transform(x)), dim=-1))[:, 0]
    torch.testing.assert_close(reward(x), expected, rtol=1e-5, atol=1e-6)
    reward64 = R.load_aesthetic(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", weights, clip_arch=TINY_ARCH,
                                dtype=torch.float64)
    check_contract(reward, reward64)


def test_aesthetic_on_hf_clip_folder(tiny_hf_clip, tmp_path):
    model, folder = tiny_hf_clip
    head = aesthetic_mlp(model.config.projection_dim, seed=5)
    save_file(head.state_dict(), tmp_path / "aesthetic.safetensors")
    reward = R.load_aesthetic(tmp_path / "aesthetic.safetensors", clip_folder=folder, chunk_size=2)
    x = images()
    with torch.no_grad():
        embedding = model.visual_projection(model.vision_model(pixel_values=reward.backbone.transform(x)).pooler_output)
        expected = head(F.normalize(embedding, dim=-1))[:, 0]
    torch.testing.assert_close(reward(x), expected, rtol=1e-5, atol=1e-6)


def test_aesthetic_errors(tiny_open_clip, tmp_path):
    _, weights, _ = tiny_open_clip
    torch.save(aesthetic_mlp(768, seed=6).state_dict(), tmp_path / "vit_l14_head.pth")
    with pytest.raises(ValueError, match=r"takes 768-dim embeddings.*gives 32-dim.*ViT-L/14"):
        R.load_aesthetic(tmp_path / "vit_l14_head.pth", weights, clip_arch=TINY_ARCH)
    with pytest.raises(ValueError, match="exactly one CLIP ViT-L/14 source"):
        R.load_aesthetic(tmp_path / "vit_l14_head.pth")
    with pytest.raises(RewardFilesError, match=r"missing\.pth' does not exist.*aesthetic MLP"):
        R.load_aesthetic(tmp_path / "missing.pth", weights, clip_arch=TINY_ARCH)
    torch.save({"fc.weight": torch.zeros(1, 32)}, tmp_path / "not_a_head.pth")
    with pytest.raises(RewardWeightsError, match="no 'layers.0.weight'"):
        R.load_aesthetic(tmp_path / "not_a_head.pth", weights, clip_arch=TINY_ARCH)


# ---------------------------------------------------------------- ImageReward

IR_WIDTH, IR_TEXT = 128, 128  # 2 attention heads of 64 each, as BLIP's ViT / BERT heads


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    """An ImageReward.pt-format checkpoint: BLIP's timm-style ViT under blip.visual_encoder.*, BLIP's med.py
    BERT (with cross-attention) under blip.text_encoder.*, the contrastive projections BLIP_Pretrain also
    holds, and the MLP head under mlp.layers.*; plus a bert-style vocab.txt tokenizer folder."""
    from timm.models.vision_transformer import VisionTransformer

    d = tmp_path_factory.mktemp("imagereward")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "red", "blue", "cat", "dog", "on",
             "the", "grass", "##s", ",", "."]
    (d / "bert-base-uncased").mkdir()
    (d / "bert-base-uncased" / "vocab.txt").write_text("\n".join(words) + "\n")

    torch.manual_seed(8)
    vit = perturb_(VisionTransformer(img_size=32, patch_size=16, embed_dim=IR_WIDTH, depth=2, num_heads=2,
                                     mlp_ratio=4, qkv_bias=True, num_classes=0, global_pool="",
                                     norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), act_layer=torch.nn.GELU),
                   seed=9).eval()
    text_cfg = transformers.BlipTextConfig(
        vocab_size=len(words) + 2, hidden_size=IR_TEXT, num_attention_heads=2, num_hidden_layers=2,
        intermediate_size=256, max_position_embeddings=40, encoder_hidden_size=IR_WIDTH, layer_norm_eps=1e-12,
        is_decoder=True, pad_token_id=0, bos_token_id=len(words), eos_token_id=3, sep_token_id=3)
    bert = perturb_(transformers.BlipTextModel(text_cfg, add_pooling_layer=False), seed=10).eval()
    head = aesthetic_mlp(IR_TEXT, seed=11)
    state = {f"blip.visual_encoder.{k}": v for k, v in vit.state_dict().items()}
    state.update({f"blip.text_encoder.{k}": v for k, v in bert.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)  # med.py: persistent
    state.update({"blip.vision_proj.weight": torch.randn(16, IR_WIDTH), "blip.vision_proj.bias": torch.zeros(16),
                  "blip.text_proj.weight": torch.randn(16, IR_TEXT), "blip.text_proj.bias": torch.zeros(16)})
    state.update({f"mlp.{k}": v for k, v in head.state_dict().items()})
    torch.save(OrderedDict(state), d / "ImageReward.pt")
    return vit, bert, head, d / "ImageReward.pt", d / "bert-base-uncased"


def imagereward_reference(vit, bert, head, tokenizer_folder, x, prompt, padding="max_length"):
    """ImageReward.evaluate(): BLIP ViT tokens, BERT cross-attending to them, [CLS] -> MLP -> standardise."""
    tok = transformers.BertTokenizerFast.from_pretrained(str(tokenizer_folder), local_files_only=True)
    t = tok(prompt, padding=padding, truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        image_embeds = vit.forward_features(ClipTransform(size=32)(x))
        b = x.shape[0]
        out = bert(input_ids=t["input_ids"].expand(b, -1), attention_mask=t["attention_mask"].expand(b, -1),
                   encoder_hidden_states=image_embeds,
                   encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long), is_decoder=False)
        return (head(out.last_hidden_state[:, 0])[:, 0] - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_matches_blip_reference_and_keeps_contract(tiny_imagereward):
    vit, bert, head, checkpoint, tokenizer = tiny_imagereward
    reward = R.load_imagereward(checkpoint, tokenizer, PROMPT)
    x = images()
    torch.testing.assert_close(reward(x), imagereward_reference(vit, bert, head, tokenizer, x, PROMPT),
                               rtol=1e-5, atol=1e-5)
    # padding to 35 tokens is masked: the unpadded prompt gives the same scores
    torch.testing.assert_close(reward(x), imagereward_reference(vit, bert, head, tokenizer, x, PROMPT, padding=False),
                               rtol=1e-5, atol=1e-5)
    check_contract(reward, R.load_imagereward(checkpoint, tokenizer, PROMPT, dtype=torch.float64))
    check_bad_images(reward)


def test_imagereward_text_attends_both_ways(tiny_imagereward):
    """[CLS] must see every word (bidirectional, as BLIP's multimodal mode), not just itself (causal)."""
    _, _, _, checkpoint, tokenizer = tiny_imagereward
    x = images()
    last_word_changed = R.load_imagereward(checkpoint, tokenizer, "a photo of a red cat on the grass")(x)
    reward = R.load_imagereward(checkpoint, tokenizer, "a photo of a red cat on the dog")
    assert (reward(x) - last_word_changed).abs().min() > 1e-4


def test_imagereward_errors(tiny_imagereward, tmp_path):
    _, _, _, checkpoint, tokenizer = tiny_imagereward
    with pytest.raises(RewardFilesError, match=r"folder .* does not exist.*vocab\.txt"):
        R.load_imagereward(checkpoint, tmp_path / "bert-base-uncased", PROMPT)
    (tmp_path / "small_vocab").mkdir()
    (tmp_path / "small_vocab" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\n")
    with pytest.raises(RewardWeightsError, match=r"has 8 tokens.*expects 20.*bert-base-uncased"):
        R.load_imagereward(checkpoint, tmp_path / "small_vocab", PROMPT)
    state = torch.load(checkpoint, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, tmp_path / "no_head.pt")
    with pytest.raises(RewardWeightsError, match=r"not an ImageReward checkpoint \(no mlp\.\* entries\)"):
        R.load_imagereward(tmp_path / "no_head.pt", tokenizer, PROMPT)
    broken = {k: v for k, v in state.items() if k != "blip.visual_encoder.blocks.0.attn.proj.weight"}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(RewardWeightsError, match=r"missing keys \(1\): encoder\.layers\.0\.self_attn\.projection"):
        R.load_imagereward(tmp_path / "broken.pt", tokenizer, PROMPT)

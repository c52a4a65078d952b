"""ImageReward (Xu et al. 2023): a BLIP ViT image encoder, a BERT text encoder whose layers
cross-attend to the image tokens, and an MLP on the text's [CLS] output,

    r(x) = (MLP(h_CLS(prompt | E_img(T(x)))) - mu) / sigma,  mu = 0.16717..., sigma = 1.03333...

Built on transformers' BLIP components (BlipVisionModel and BlipTextModel port BLIP's ViT and
med.py BERT layer for layer), so neither the ImageReward package nor its pinned dependencies
(timm 0.6, fairscale, OpenAI clip) are needed, and nothing is fetched: the checkpoint and the
BERT tokenizer are local. The architecture is read from the checkpoint's tensor shapes.
"""
from __future__ import annotations

import re
import warnings

import torch

from .aesthetic import AestheticMLP
from .base import Reward
from .clip import check_prompt
from .local_files import (
    PathLike,
    RewardWeightsError,
    hub_offline,
    load_into,
    load_state_dict,
    loading_errors,
    require_file,
    require_folder,
)
from .preprocess import ClipTransform

# Normalisation of the raw head output, from ImageReward.py (v1.0).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35  # ImageReward pads / truncates every prompt to 35 tokens
HEAD_DIM = 64  # BLIP's ViT-B / ViT-L and BERT-base all use 64-dim attention heads

# BLIP's timm-style ViT names -> transformers' BlipVisionModel names.
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)
# Checkpoint entries ImageReward itself never uses (BLIP's contrastive projections, a buffer).
_UNUSED = re.compile(r"^blip\.(vision_proj|text_proj)\.|^blip\.text_encoder\.embeddings\.position_ids$")
TOKENIZER_FILES = (("BERT tokenizer vocabulary (bert-base-uncased)", ("vocab.txt",)),)


def _rename_vision(key: str) -> str:
    for pattern, replacement in _VISION_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def split_checkpoint(state: dict[str, torch.Tensor], what: str):
    """ImageReward.pt -> (vision, text, mlp) state dicts in transformers / AestheticMLP naming."""
    parts = {"blip.visual_encoder.": {}, "blip.text_encoder.": {}, "mlp.": {}}
    ignored = []
    for key, value in state.items():
        prefix = next((p for p in parts if key.startswith(p)), None)
        if prefix is not None and not _UNUSED.match(key):
            parts[prefix][key[len(prefix):]] = value
        elif not _UNUSED.match(key):
            ignored.append(key)
    if not all(parts.values()):
        absent = [p + "*" for p, sub in parts.items() if not sub]
        raise RewardWeightsError(f"{what}: this is not an ImageReward checkpoint (no {', '.join(absent)} entries). "
                                 "Expected ImageReward.pt from THUDM/ImageReward.")
    if ignored:
        warnings.warn(f"{what}: ignoring {len(ignored)} checkpoint entries ImageReward does not use: {ignored[:5]}",
                      stacklevel=2)
    vision = {_rename_vision(k): v for k, v in parts["blip.visual_encoder."].items()}
    return vision, parts["blip.text_encoder."], parts["mlp."]


def _count_layers(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def configs_from_shapes(vision: dict[str, torch.Tensor], text: dict[str, torch.Tensor]):
    """BlipVisionConfig / BlipTextConfig matching the checkpoint (heads: HEAD_DIM-wide, as in BLIP)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    vision_cfg = BlipVisionConfig(
        hidden_size=width, num_attention_heads=width // HEAD_DIM, patch_size=patch, image_size=grid * patch,
        num_hidden_layers=_count_layers(vision, r"encoder\.layers\.(\d+)\."),
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        layer_norm_eps=1e-6, hidden_act="gelu")
    vocab, hidden = text["embeddings.word_embeddings.weight"].shape
    text_cfg = BlipTextConfig(
        vocab_size=vocab, hidden_size=hidden, num_attention_heads=hidden // HEAD_DIM,
        num_hidden_layers=_count_layers(text, r"encoder\.layer\.(\d+)\."),
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
        encoder_hidden_size=text["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0, bos_token_id=None, eos_token_id=None,
        sep_token_id=None,  # med_config.json (a BertConfig) sets none of these; the forward uses none
        is_decoder=True)  # builds the cross-attention layers; forward runs bidirectionally (is_decoder=False)
    return vision_cfg, text_cfg


class ImageRewardScore(Reward):
    """r(x) = (MLP(BERT_CLS(prompt, cross-attending to ViT(T(x)))) - mean) / std."""

    def __init__(self, vision: torch.nn.Module, text: torch.nn.Module, mlp: AestheticMLP, tokenizer,
                 prompt: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        self.name = "ImageReward"
        self.transform = ClipTransform(size=vision.config.image_size)
        self.vision, self.text, self.mlp = (m.to(self.device, self.dtype) for m in (vision, text, mlp))
        self.tokenizer = tokenizer
        self.freeze()
        self.set_prompt(prompt)

    def set_prompt(self, prompt: str) -> None:
        self.prompt = check_prompt(prompt, self.name)
        tokens = self.tokenizer(self.prompt, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
                                return_tensors="pt")
        self.register_buffer("input_ids", tokens["input_ids"].to(self.device), persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"].to(self.device), persistent=False)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=self.transform(images)).last_hidden_state
        b = image_tokens.shape[0]
        out = self.text(input_ids=self.input_ids.expand(b, -1), attention_mask=self.attention_mask.expand(b, -1),
                        encoder_hidden_states=image_tokens,
                        encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long,
                                                          device=image_tokens.device),
                        is_decoder=False)
        raw = self.mlp(out.last_hidden_state[:, 0])[:, 0]
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_imagereward(checkpoint_path: PathLike, tokenizer_folder: PathLike, prompt: str, *,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     chunk_size: int | None = None) -> ImageRewardScore:
    """ImageReward v1.0 (typical scores -2 ... 2, higher is better).

    Expected files:
      - `checkpoint_path`: ImageReward.pt from THUDM/ImageReward (a plain state dict, read with
        torch.load(weights_only=True)) or a .safetensors copy of it. med_config.json is not needed.
      - `tokenizer_folder`: a bert-base-uncased tokenizer folder containing vocab.txt
        (tokenizer_config.json optional). ImageReward adds [DEC] and [ENC] to it, as BLIP does.
    """
    what = "ImageReward"
    path = require_file(checkpoint_path, what, "ImageReward.pt (THUDM/ImageReward) or a .safetensors copy")
    tokenizer_folder = require_folder(tokenizer_folder, f"{what} tokenizer", TOKENIZER_FILES)
    vision_state, text_state, mlp_state = split_checkpoint(load_state_dict(path, what), what)
    with hub_offline():
        from transformers import BertTokenizerFast, BlipTextModel, BlipVisionModel

        try:
            vision_cfg, text_cfg = configs_from_shapes(vision_state, text_state)
            mlp = AestheticMLP(mlp_state["layers.0.weight"].shape[1])
        except KeyError as err:
            raise RewardWeightsError(f"{what}: the checkpoint lacks entry {err} (key names after mapping to "
                                     "transformers' BLIP). Expected ImageReward.pt from THUDM/ImageReward.") from err
        vision, text = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False)
        with loading_errors(what, tokenizer_folder, "tokenizer"):
            tokenizer = BertTokenizerFast.from_pretrained(str(tokenizer_folder), local_files_only=True)
    hint = "Is this the ImageReward v1.0 checkpoint (BLIP ViT-L/16 + BERT-base)?"
    try:
        load_into(vision.eval(), vision_state, f"{what} image encoder", hint)
        load_into(text.eval(), text_state, f"{what} text encoder", hint)
        load_into(mlp, mlp_state, f"{what} head", hint)
    except RewardWeightsError:
        del vision, text, mlp, vision_state, text_state, mlp_state  # the traceback keeps this frame
        raise
    # BLIP's tokenizer: BERT plus [DEC] (bos) and [ENC]; the checkpoint's vocabulary includes both.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != text_cfg.vocab_size:
        raise RewardWeightsError(
            f"{what}: the tokenizer in '{tokenizer_folder}' has {len(tokenizer)} tokens with [DEC] and [ENC] added, "
            f"the checkpoint expects {text_cfg.vocab_size}. Use the bert-base-uncased tokenizer (vocab.txt).")
    return ImageRewardScore(vision, text, mlp, tokenizer, prompt, device=device, dtype=dtype,
                            chunk_size=chunk_size)

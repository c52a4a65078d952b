"""CLIP-family text-image rewards: CLIP score, PickScore, HPSv2 / HPSv2.1.

All of them score an image x against a prompt p by the cosine of their CLIP embeddings,

    r(x) = s * cos(E_img(T(x)), E_txt(p)),

with T the differentiable CLIP preprocessing and s either the model's learned logit scale
(CLIP score, PickScore: logit_scale.exp() * cos, ~100 * cos) or 1 (HPSv2: plain cosine, as in
the HPSv2 repo). Backbones come from open_clip (architecture name + local state dict) or from a
transformers CLIP folder. Nothing is downloaded.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward
from .local_files import (
    PathLike,
    RewardFilesError,
    RewardWeightsError,
    check_folder_weights,
    hub_offline,
    load_into,
    load_state_dict,
    loading_errors,
    read_json,
    require_file,
    require_folder,
)
from .preprocess import CLIP_MEAN, CLIP_STD, ClipTransform


class ClipBackbone(torch.nn.Module):
    """The two towers of a CLIP model behind one interface; `transform` is its image preprocessing."""

    transform: ClipTransform
    embed_dim: int

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def encode_text(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class OpenClipBackbone(ClipBackbone):
    def __init__(self, model: torch.nn.Module, tokenizer, embed_dim: int):
        super().__init__()
        self.model, self.tokenizer, self.embed_dim = model, tokenizer, embed_dim
        cfg = model.visual.preprocess_cfg
        self.transform = ClipTransform(size=cfg["size"], mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                                       interpolation=cfg.get("interpolation", "bicubic"))

    def encode_image(self, pixels):
        return self.model.encode_image(pixels)

    def encode_text(self, prompts):
        return self.model.encode_text(self.tokenizer(prompts).to(self.model.logit_scale.device))

    def logit_scale(self):
        return self.model.logit_scale.exp()


class HFClipBackbone(ClipBackbone):
    def __init__(self, model: torch.nn.Module, tokenizer, transform: ClipTransform):
        super().__init__()
        self.model, self.tokenizer, self.transform = model, tokenizer, transform
        self.embed_dim = model.config.projection_dim
        self.max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)

    def encode_image(self, pixels):
        # Towers called directly: get_image_features returns a tensor in transformers 4, an output object in 5.
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def encode_text(self, prompts):
        tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.model.logit_scale.device)
        # transformers 4 builds CLIP's causal mask in torch's default dtype; float64 models overflow it.
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64 if self.model.logit_scale.dtype == torch.float64 else saved)
        try:
            pooled = self.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
        finally:
            torch.set_default_dtype(saved)
        return self.model.text_projection(pooled)

    def logit_scale(self):
        return self.model.logit_scale.exp()


class ClipScore(Reward):
    """r(x) = s * cos(E_img(T(x)), E_txt(prompt)); s = logit_scale.exp() ("logit") or 1 ("cosine").

    The prompt's text embedding is computed once (and again on `set_prompt`).
    """

    def __init__(self, backbone: ClipBackbone, prompt: str, *, scale: str = "logit", name: str = "CLIP score",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        if scale not in ("logit", "cosine"):
            raise ValueError(f"scale must be 'logit' (logit_scale * cosine) or 'cosine', got {scale!r}.")
        self.name, self.scale = name, scale
        self.backbone = backbone.to(self.device, self.dtype)
        self.freeze()
        self.set_prompt(prompt)

    def set_prompt(self, prompt: str) -> None:
        self.prompt = check_prompt(prompt, self.name)
        with torch.no_grad():
            text = F.normalize(self.backbone.encode_text([self.prompt]), dim=-1)[0]
            s = self.backbone.logit_scale() if self.scale == "logit" else torch.ones((), device=text.device)
        self.register_buffer("text_features", text, persistent=False)
        self.register_buffer("multiplier", s.to(text.dtype), persistent=False)

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.backbone.encode_image(self.backbone.transform(images)), dim=-1)
        return self.multiplier * (image @ self.text_features)


def check_prompt(prompt: str, name: str) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{name}: prompt must be a non-empty string, got {prompt!r}. "
                         "Pass the text the image should match.")
    return prompt


# ---------------------------------------------------------------- open_clip backbones

class _quiet_random_init_warning(logging.Filter):
    """Hide open_clip's "initialized randomly" warning: the weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    def __enter__(self):
        logging.getLogger().addFilter(self)

    def __exit__(self, *exc):
        logging.getLogger().removeFilter(self)


def open_clip_backbone(arch: str, weights_path: PathLike, what: str) -> OpenClipBackbone:
    """Build open_clip architecture `arch` without pretrained weights, then load the local state dict."""
    path = require_file(weights_path, what,
                        f"an open_clip state dict for architecture '{arch}' (.safetensors, or .pt / .pth / .bin)")
    import open_clip

    arch = arch.replace("/", "-")
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise ValueError(f"{what}: unknown open_clip architecture '{arch}'. Use a name from "
                         "open_clip.list_models(), e.g. 'ViT-H-14', 'ViT-L-14', 'ViT-L-14-quickgelu', 'ViT-B-32'.")
    text_cfg = cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg or "hf_tokenizer_name" in text_cfg:
        raise ValueError(
            f"{what}: open_clip architecture '{arch}' takes its text tower or tokenizer from the Hugging Face hub, "
            "which this pack never downloads. Use a CLIP architecture with open_clip's built-in tokenizer "
            "(ViT-*-* names), or a transformers CLIP folder with load_hf_clip_score.")
    # The weights are read (and checked) before the model is built: building ViT-H-14 takes seconds and gigabytes,
    # which a damaged file should not cost.
    state = load_state_dict(path, what)
    with hub_offline(), _quiet_random_init_warning():
        # pretrained=None: open_clip must not resolve a tag (that downloads); weights come from `path` only.
        model = open_clip.create_model(arch, pretrained=None, pretrained_image=False)
        if "logit_scale" in state and state["logit_scale"].shape != model.logit_scale.shape:
            state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
        try:
            load_into(model, state, what,
                      f"Is '{path.name}' a checkpoint of open_clip architecture '{arch}'? "
                      "Pass the architecture the weights were trained with (HPSv2: ViT-H-14).")
        except RewardWeightsError:
            del model, state  # the error's traceback keeps this frame: let the model and weights go
            raise
        tokenizer = open_clip.get_tokenizer(arch)
    return OpenClipBackbone(model, tokenizer, cfg["embed_dim"])


def load_open_clip_score(arch: str, weights_path: PathLike, prompt: str, *, scale: str = "logit",
                         device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         chunk_size: int | None = None) -> ClipScore:
    """CLIP text-image score from an open_clip architecture and a local weights file.

    Expected files: one state dict of open_clip architecture `arch`, e.g.
    `open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`) from an open_clip hub repo such as
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K. OpenAI CLIP weights need a '-quickgelu' architecture
    (e.g. 'ViT-L-14-quickgelu'); OpenAI's TorchScript .pt files are not read (not loadable safely).
    Score: logit_scale * cosine (~100 * cos for CLIP) with scale="logit", plain cosine with "cosine".
    """
    backbone = open_clip_backbone(arch, weights_path, "CLIP score (open_clip)")
    return ClipScore(backbone, prompt, scale=scale, name=f"CLIP {arch}", device=device, dtype=dtype,
                     chunk_size=chunk_size)


def load_hpsv2(weights_path: PathLike, prompt: str, *, arch: str = "ViT-H-14",
               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               chunk_size: int | None = None) -> ClipScore:
    """HPSv2 / HPSv2.1 human preference score: cosine of open_clip ViT-H-14 image and text features.

    Expected files: `HPS_v2_compressed.pt` or `HPS_v2.1_compressed.pt` (from the xswu/HPSv2 hub repo),
    a {'state_dict': ...} checkpoint read with torch.load(weights_only=True); a .safetensors
    conversion of the same state dict also works. Typical scores are 0.2 - 0.35.
    """
    backbone = open_clip_backbone(arch, weights_path, "HPSv2")
    return ClipScore(backbone, prompt, scale="cosine", name="HPSv2", device=device, dtype=dtype,
                     chunk_size=chunk_size)


# ---------------------------------------------------------------- transformers backbones

HF_MODEL_FILES = (("model config", ("config.json",)),
                  ("weights", ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")))
HF_TOKENIZER_FILES = (("CLIP tokenizer", ("tokenizer.json", "vocab.json+merges.txt")),)


def hf_clip_backbone(folder: PathLike, tokenizer_folder: PathLike | None, what: str) -> HFClipBackbone:
    """Load a transformers CLIPModel, its tokenizer and its preprocessing from local folders only."""
    if tokenizer_folder is None:
        folder = tokenizer_folder = require_folder(folder, what, HF_MODEL_FILES + HF_TOKENIZER_FILES)
    else:
        folder = require_folder(folder, what, HF_MODEL_FILES)
        tokenizer_folder = require_folder(tokenizer_folder, f"{what} tokenizer", HF_TOKENIZER_FILES)
    model_type = read_json(folder / "config.json", what).get("model_type")
    if model_type != "clip":
        raise RewardFilesError(f"{what}: '{folder / 'config.json'}' has model_type {model_type!r}, expected 'clip'. "
                               "Point to a transformers CLIPModel folder (e.g. PickScore_v1, clip-vit-large-patch14).")
    check_folder_weights(folder, what)
    with hub_offline():
        from transformers import CLIPModel, CLIPTokenizerFast

        with loading_errors(what, folder, "model"):
            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        with loading_errors(what, tokenizer_folder, "tokenizer"):
            tokenizer = CLIPTokenizerFast.from_pretrained(str(tokenizer_folder), local_files_only=True)
    transform = hf_image_transform(folder, model.config.vision_config.image_size)
    return HFClipBackbone(model.eval(), tokenizer, transform)


def hf_image_transform(folder: Path, image_size: int) -> ClipTransform:
    """Preprocessing from preprocessor_config.json when present, else the model's image size and CLIP stats."""
    path = folder / "preprocessor_config.json"
    cfg = read_json(path, "CLIP preprocessing") if path.is_file() else {}

    def side(value, key):  # transformers writes sizes as ints (old) or dicts (new)
        return value.get(key, value.get("height")) if isinstance(value, dict) else value

    crop = cfg.get("crop_size", image_size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else int(crop)
    resize = side(cfg.get("size"), "shortest_edge")
    interpolation = {2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 3), "bicubic")
    return ClipTransform(size=crop, mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                         std=tuple(cfg.get("image_std", CLIP_STD)), interpolation=interpolation,
                         resize=None if resize is None else int(resize), crop_offset="floor")


def load_hf_clip_score(folder: PathLike, prompt: str, *, scale: str = "logit",
                       tokenizer_folder: PathLike | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, chunk_size: int | None = None) -> ClipScore:
    """CLIP text-image score from a transformers CLIP folder (e.g. openai/clip-vit-large-patch14).

    Expected files in `folder`: config.json (model_type "clip"); model.safetensors (or a sharded
    model.safetensors.index.json, or pytorch_model.bin, read with weights_only=True); tokenizer.json
    or vocab.json + merges.txt (or give `tokenizer_folder`); optional preprocessor_config.json
    (crop size, mean, std; defaults: the model's image size and CLIP statistics).
    Score: logit_scale * cosine with scale="logit", plain cosine with "cosine".
    """
    backbone = hf_clip_backbone(folder, tokenizer_folder, "CLIP score (transformers)")
    return ClipScore(backbone, prompt, scale=scale, name="CLIP", device=device, dtype=dtype,
                     chunk_size=chunk_size)


def load_pickscore(folder: PathLike, prompt: str, *, tokenizer_folder: PathLike | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   chunk_size: int | None = None) -> ClipScore:
    """PickScore v1: logit_scale * cosine of a CLIP-H model fine-tuned on Pick-a-Pic (~18 - 23).

    Expected files in `folder` (yuvalkirstain/PickScore_v1): config.json, model.safetensors
    (or pytorch_model.bin), tokenizer.json or vocab.json + merges.txt, optional preprocessor_config.json.
    PickScore's own repo uses the tokenizer and processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K:
    if `folder` has no tokenizer files, pass that folder as `tokenizer_folder`.
    """
    backbone = hf_clip_backbone(folder, tokenizer_folder, "PickScore")
    return ClipScore(backbone, prompt, scale="logit", name="PickScore", device=device, dtype=dtype,
                     chunk_size=chunk_size)

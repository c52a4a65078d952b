"""LAION aesthetic predictor (improved-aesthetic-predictor): an MLP on L2-normalised CLIP ViT-L/14
image embeddings,

    r(x) = MLP(e / ||e||),  e = E_img(T(x)),

scoring roughly 1 (poor) to 10 (beautiful). Prompt-free.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Reward
from .clip import ClipBackbone, hf_clip_backbone, open_clip_backbone
from .local_files import PathLike, RewardWeightsError, load_into, load_state_dict, require_file


class AestheticMLP(torch.nn.Module):
    """The published head: linear layers with dropout and no activations (state-dict keys layers.0 ... layers.7).

    ImageReward's reward head has the same layer stack.
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp(path: PathLike, what: str) -> AestheticMLP:
    """Read an AestheticMLP state dict (keys `layers.N.weight/bias`), inferring its input size."""
    state = load_state_dict(path, what)
    first = state.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise RewardWeightsError(f"{what}: '{path}' has no 'layers.0.weight' matrix; expected an "
                                 "aesthetic-predictor MLP state dict such as sac+logos+ava1-l14-linearMSE.pth.")
    mlp = AestheticMLP(first.shape[1])
    load_into(mlp, state, what, "Expected the improved-aesthetic-predictor layout Linear(d,1024), Dropout, "
              "Linear(1024,128), Dropout, Linear(128,64), Dropout, Linear(64,16), Linear(16,1).")
    return mlp


class AestheticScore(Reward):
    """r(x) = MLP(normalize(E_img(T(x)))); prompt-free."""

    def __init__(self, backbone: ClipBackbone, mlp: AestheticMLP, *, name: str = "Aesthetic",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 chunk_size: int | None = None):
        super().__init__(device=device, dtype=dtype, chunk_size=chunk_size)
        width = mlp.layers[0].in_features
        if width != backbone.embed_dim:
            raise ValueError(f"{name}: the MLP takes {width}-dim embeddings but the CLIP model gives "
                             f"{backbone.embed_dim}-dim ones. The LAION predictors are trained on CLIP ViT-L/14 "
                             "(768-dim): pass ViT-L/14 weights.")
        self.name = name
        self.backbone, self.mlp = backbone.to(self.device, self.dtype), mlp.to(self.device, self.dtype)
        self.freeze()

    def evaluate(self, images: torch.Tensor) -> torch.Tensor:
        embedding = F.normalize(self.backbone.encode_image(self.backbone.transform(images)), dim=-1)
        return self.mlp(embedding)[:, 0]


def load_aesthetic(mlp_path: PathLike, clip_weights: PathLike | None = None, *,
                   clip_arch: str = "ViT-L-14-quickgelu", clip_folder: PathLike | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   chunk_size: int | None = None) -> AestheticScore:
    """LAION aesthetic predictor v2 on OpenAI CLIP ViT-L/14 image embeddings.

    Expected files:
      - `mlp_path`: the predictor head, e.g. `sac+logos+ava1-l14-linearMSE.pth` (state dict with keys
        layers.0/2/4/6/7.weight/bias, read with torch.load(weights_only=True)) or a .safetensors copy;
      - the CLIP ViT-L/14 image tower, either
        `clip_weights`: an open_clip state dict of `clip_arch` (default 'ViT-L-14-quickgelu', the OpenAI
        weights, e.g. open_clip_model.safetensors of timm/vit_large_patch14_clip_224.openai), or
        `clip_folder`: a transformers CLIP folder (openai/clip-vit-large-patch14: config.json,
        model.safetensors, tokenizer files).
    """
    what = "Aesthetic predictor"
    mlp_path = require_file(mlp_path, what, "the aesthetic MLP weights (e.g. sac+logos+ava1-l14-linearMSE.pth)")
    if (clip_weights is None) == (clip_folder is None):
        raise ValueError(f"{what}: give exactly one CLIP ViT-L/14 source: clip_weights (an open_clip state dict "
                         "of clip_arch) or clip_folder (a transformers CLIP folder).")
    mlp = load_mlp(mlp_path, what)
    backbone = (open_clip_backbone(clip_arch, clip_weights, f"{what} CLIP") if clip_folder is None
                else hf_clip_backbone(clip_folder, None, f"{what} CLIP"))
    return AestheticScore(backbone, mlp, device=device, dtype=dtype, chunk_size=chunk_size)

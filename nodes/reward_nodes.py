"""Reward loader nodes: one per reward family of the pack's rewards package, plus a weighted sum.

Every node outputs FMTT_REWARD: a differentiable r(images) with images [B, 3, H, W] in [0, 1]. Rewards are
built outside inference mode so their tensors can take part in the sampler's backward pass.
"""
from __future__ import annotations

import comfy.model_management
import torch
from comfy_api.latest import io

from .. import rewards as R
from .autograd import normal_tensor
from .folders import REWARDS, TOKENIZER_MARKERS, file_path, folder_path, model_folders, weight_files
from .types import REWARD_CATEGORY, Reward

DTYPES = ("auto", "float32", "float16", "bfloat16")
REWARD_OUT = "The reward, r(image), larger is better. Connect it to an FMTT sampler or an FMTT Combine Rewards node."
SAME_FOLDER = "(model folder)"


def _device_dtype(choice: str):
    device = comfy.model_management.get_torch_device()
    if choice != "auto":
        return device, getattr(torch, choice)
    if device.type == "cpu":
        return device, torch.float32
    return device, torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16


def _dtype_input():
    return io.Combo.Input("dtype", options=list(DTYPES), default="auto", advanced=True,
                          tooltip="Precision of the reward model. auto: float32 on the CPU, bfloat16 / float16 "
                                  "on a GPU.")


def _prompt_input(tooltip="The text the image should match (usually your positive prompt)."):
    return io.String.Input("prompt", multiline=True, default="", tooltip=tooltip)


def _load(fn, *args, **kwargs):
    """Build a reward with normal (non-inference) tensors; say which file the problem is in."""
    with torch.inference_mode(False):
        return fn(*args, **kwargs)


def _check_text(text, what: str) -> str | bool:
    if text is None:  # linked from another node: checked when it runs
        return True
    return True if isinstance(text, str) and text.strip() else f"{what} is empty: type the text the reward needs."


class CLIPScoreReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTCLIPScoreReward", display_name="FMTT CLIP Score Reward", category=REWARD_CATEGORY,
            description="CLIP text-image similarity as a reward (logit scale x cosine, ~100 x cos).",
            inputs=[
                io.Combo.Input("model", options=weight_files() + model_folders(),
                               tooltip="An open_clip weights file (.safetensors / .bin) or a transformers CLIP "
                                       "folder, in models/reward_models/."),
                io.String.Input("open_clip_arch", default="ViT-H-14",
                                tooltip="open_clip architecture of a weights file (e.g. ViT-H-14, ViT-L-14-quickgelu "
                                        "for OpenAI weights). Ignored for transformers folders."),
                _prompt_input(),
                io.Combo.Input("scale", options=["logit", "cosine"], default="logit",
                               tooltip="logit: the model's logit scale x cosine (~100 x cos); cosine: plain cosine."),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def validate_inputs(cls, prompt):
        return _check_text(prompt, "prompt")

    @classmethod
    def execute(cls, model, open_clip_arch, prompt, scale, dtype) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        if model in model_folders():
            reward = _load(R.load_hf_clip_score, folder_path(REWARDS, model), prompt, scale=scale, device=device,
                           dtype=dt)
        else:
            reward = _load(R.load_open_clip_score, open_clip_arch, file_path(REWARDS, model), prompt, scale=scale,
                           device=device, dtype=dt)
        return io.NodeOutput(reward)


class PickScoreReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTPickScoreReward", display_name="FMTT PickScore Reward", category=REWARD_CATEGORY,
            description="PickScore v1 (human preference, ~18-23) from a transformers folder.",
            inputs=[
                io.Combo.Input("model", options=model_folders(),
                               tooltip="The PickScore_v1 folder (config.json, model.safetensors, ...) in "
                                       "models/reward_models/."),
                io.Combo.Input("tokenizer", options=[SAME_FOLDER] + model_folders(markers=TOKENIZER_MARKERS),
                               default=SAME_FOLDER,
                               tooltip="Folder with the CLIP tokenizer, when the model folder has none "
                                       "(PickScore uses the laion CLIP-ViT-H-14 tokenizer)."),
                _prompt_input(),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def validate_inputs(cls, prompt):
        return _check_text(prompt, "prompt")

    @classmethod
    def execute(cls, model, tokenizer, prompt, dtype) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        tok = None if tokenizer == SAME_FOLDER else folder_path(REWARDS, tokenizer)
        return io.NodeOutput(_load(R.load_pickscore, folder_path(REWARDS, model), prompt, tokenizer_folder=tok,
                                   device=device, dtype=dt))


class HPSv2Reward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTHPSv2Reward", display_name="FMTT HPSv2 Reward", category=REWARD_CATEGORY,
            description="HPSv2 / HPSv2.1 human preference score (cosine, ~0.2-0.35) on open_clip ViT-H-14.",
            inputs=[
                io.Combo.Input("model", options=weight_files(),
                               tooltip="HPS_v2_compressed.pt or HPS_v2.1_compressed.pt (or a .safetensors copy) in "
                                       "models/reward_models/."),
                _prompt_input(),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def validate_inputs(cls, prompt):
        return _check_text(prompt, "prompt")

    @classmethod
    def execute(cls, model, prompt, dtype) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        return io.NodeOutput(_load(R.load_hpsv2, file_path(REWARDS, model), prompt, device=device, dtype=dt))


class AestheticReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTAestheticReward", display_name="FMTT Aesthetic Reward", category=REWARD_CATEGORY,
            description="LAION aesthetic predictor v2 (prompt-free, ~1-10) on CLIP ViT-L/14 image embeddings.",
            inputs=[
                io.Combo.Input("head", options=weight_files(),
                               tooltip="The predictor head, e.g. sac+logos+ava1-l14-linearMSE.pth, in "
                                       "models/reward_models/."),
                io.Combo.Input("clip", options=weight_files() + model_folders(),
                               tooltip="CLIP ViT-L/14: an open_clip weights file or a transformers CLIP folder."),
                io.String.Input("open_clip_arch", default="ViT-L-14-quickgelu",
                                tooltip="open_clip architecture of a CLIP weights file; ignored for folders."),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def execute(cls, head, clip, open_clip_arch, dtype) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        if clip in model_folders():
            kwargs = {"clip_folder": folder_path(REWARDS, clip)}
        else:
            kwargs = {"clip_weights": file_path(REWARDS, clip), "clip_arch": open_clip_arch}
        return io.NodeOutput(_load(R.load_aesthetic, file_path(REWARDS, head), device=device, dtype=dt, **kwargs))


class ImageRewardReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTImageReward", display_name="FMTT ImageReward", category=REWARD_CATEGORY,
            description="ImageReward v1.0 (BLIP-based human preference, ~-2..2).",
            inputs=[
                io.Combo.Input("model", options=weight_files(),
                               tooltip="ImageReward.pt (THUDM/ImageReward) or a .safetensors copy, in "
                                       "models/reward_models/."),
                io.Combo.Input("tokenizer", options=model_folders(markers=TOKENIZER_MARKERS),
                               tooltip="A bert-base-uncased tokenizer folder (vocab.txt) in models/reward_models/."),
                _prompt_input(),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def validate_inputs(cls, prompt):
        return _check_text(prompt, "prompt")

    @classmethod
    def execute(cls, model, tokenizer, prompt, dtype) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        return io.NodeOutput(_load(R.load_imagereward, file_path(REWARDS, model), folder_path(REWARDS, tokenizer),
                                   prompt, device=device, dtype=dt))


class VLMQuestionReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTVLMQuestionReward", display_name="FMTT VLM Question Reward", category=REWARD_CATEGORY,
            description="Sum over yes/no questions of how surely a vision-language model answers Yes "
                        "(SmolVLM / Idefics3, Qwen2-VL, Qwen2.5-VL).",
            inputs=[
                io.Combo.Input("model", options=model_folders(),
                               tooltip="A complete VLM folder (config.json, model.safetensors, tokenizer, "
                                       "preprocessor and chat template) in models/reward_models/."),
                io.String.Input("questions", multiline=True, default="Does the image match the prompt?",
                                tooltip="One yes/no question per line; each line is one term of the reward. With a "
                                        "reference image, say so: 'The first image is a reference. Is the second "
                                        "image in the same style?'"),
                io.Combo.Input("answer", options=list(R.vlm.ANSWER_MODES), default="log_prob",
                               tooltip="log_prob: log P(Yes); prob: P(Yes); log_odds: log P(Yes) - log P(No)."),
                io.Image.Input("reference_image", optional=True,
                               tooltip="Optional reference image(s) shown before the scored image in every question "
                                       "(same style, same character, ...)."),
                io.Int.Input("max_pixels", default=0, min=0, max=4096 * 4096, step=1024, advanced=True,
                             tooltip="Qwen2-VL family only: cap on the working resolution in pixels (0: the "
                                     "model's default). Compute and memory grow with it."),
                _dtype_input(),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def validate_inputs(cls, questions):
        return _check_text(questions, "questions")

    @classmethod
    def execute(cls, model, questions, answer, dtype, max_pixels=0, reference_image=None) -> io.NodeOutput:
        device, dt = _device_dtype(dtype)
        refs = () if reference_image is None else (normal_tensor(reference_image).permute(0, 3, 1, 2).contiguous(),)
        qs = [R.Question(line.strip(), 1.0, refs) for line in questions.splitlines() if line.strip()]
        return io.NodeOutput(_load(R.load_vlm_reward, folder_path(REWARDS, model), qs, answer=answer,
                                   max_pixels=max_pixels or None, device=device, dtype=dt))


class MaskReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTMaskReward", display_name="FMTT Mask Reward", category=REWARD_CATEGORY,
            description="Geometric reward: the fraction of the image's mass (brightness, ink or a colour) inside "
                        "the mask, in [0, 1]. No model needed.",
            inputs=[
                io.Mask.Input("mask", tooltip="Where the mass should go (1 inside). Any size: it is resized to the "
                                              "image."),
                io.Combo.Input("mass", options=list(R.geometric.MASS_KINDS), default="luminance",
                               tooltip="luminance: bright pixels; ink: dark pixels; color: pixels close to `color`."),
                io.String.Input("color", default="1.0, 0.0, 0.0",
                                tooltip="For mass = color: the RGB colour in [0, 1], e.g. '1.0, 0.0, 0.0' for red."),
                io.Float.Input("color_tolerance", default=0.25, min=0.01, max=2.0, step=0.01, advanced=True,
                               tooltip="For mass = color: how far (RGB distance) a pixel may be from the colour."),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def execute(cls, mask, mass, color, color_tolerance) -> io.NodeOutput:
        rgb = None
        if mass == "color":
            try:
                rgb = [float(v) for v in color.replace(";", ",").split(",")]
            except ValueError as err:
                raise ValueError(f"FMTT Mask Reward: color '{color}' is not three numbers; write e.g. "
                                 "'1.0, 0.0, 0.0'.") from err
        device = comfy.model_management.get_torch_device()
        return io.NodeOutput(_load(R.MaskContainment, normal_tensor(mask), mass=mass, color=rgb,
                                   color_sigma=color_tolerance, device=device))


class SymmetryReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="FMTTSymmetryReward", display_name="FMTT Symmetry Reward", category=REWARD_CATEGORY,
            description="Geometric reward: minus the mean squared difference between the image and its mirror "
                        "image or rotation (0 is perfectly symmetric).",
            inputs=[
                io.Combo.Input("kind", options=["mirror_left_right", "mirror_top_bottom", "rotation"],
                               default="mirror_left_right", tooltip="Which symmetry to reward."),
                io.String.Input("angles", default="90",
                                tooltip="For kind = rotation: angle(s) in degrees, comma-separated, e.g. '90' or "
                                        "'120, 240'."),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def execute(cls, kind, angles) -> io.NodeOutput:
        device = comfy.model_management.get_torch_device()
        if kind == "rotation":
            try:
                values = [float(a) for a in angles.split(",") if a.strip()]
            except ValueError as err:
                raise ValueError(f"FMTT Symmetry Reward: angles '{angles}' must be numbers in degrees, e.g. "
                                 "'90' or '120, 240'.") from err
            return io.NodeOutput(_load(R.RotationInvariance, values, device=device))
        return io.NodeOutput(_load(R.MirrorSymmetry, kind.removeprefix("mirror_"), device=device))


class CombineRewards(io.ComfyNode):
    TERMS = 4

    @classmethod
    def define_schema(cls):
        inputs = []
        for i in range(1, cls.TERMS + 1):
            inputs += [
                Reward.Input(f"reward_{i}", optional=i > 1, tooltip=f"Reward term {i}" + (" (optional)." if i > 1
                                                                                          else ".")),
                io.Float.Input(f"weight_{i}", default=1.0, min=-1000.0, max=1000.0, step=0.01,
                               tooltip=f"Weight of reward {i}; rewards have different scales (CLIP ~100 x cos, "
                                       "HPSv2 ~0.3), so balance them here. Negative weights penalise."),
            ]
        return io.Schema(
            node_id="FMTTCombineRewards", display_name="FMTT Combine Rewards", category=REWARD_CATEGORY,
            description="Weighted sum of up to four rewards: R = sum_i w_i r_i.",
            inputs=inputs, outputs=[Reward.Output(display_name="reward", tooltip=REWARD_OUT)])

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        terms = [R.Term(kwargs[f"reward_{i}"], float(kwargs[f"weight_{i}"]), name=getattr(
                 kwargs[f"reward_{i}"], "name", f"reward_{i}")) for i in range(1, cls.TERMS + 1)
                 if kwargs.get(f"reward_{i}") is not None]
        reward = _load(R.WeightedSum, terms)
        reward.name = " + ".join(f"{t.weight:g} x {t.name}" for t in reward.terms)
        return io.NodeOutput(reward)


REWARD_NODES = [CLIPScoreReward, PickScoreReward, HPSv2Reward, AestheticReward, ImageRewardReward,
                VLMQuestionReward, MaskReward, SymmetryReward, CombineRewards]

"""Differentiable rewards from local files (installed as `fmtt_rewards`).

Every reward is a `Reward` (a torch module): `reward(images)` maps images [B, 3, H, W] in [0, 1] to
float32 rewards [B], larger is better. See the README's "Rewards" section for the files each loader reads.
"""
from .aesthetic import AestheticScore, load_aesthetic
from .base import Reward, RewardInputError, check_images
from .clip import ClipScore, load_hf_clip_score, load_hpsv2, load_open_clip_score, load_pickscore
from .combine import Affine, BatchStandardize, Term, WeightedSum
from .geometric import MaskContainment, MirrorSymmetry, RotationInvariance
from .imagereward import ImageRewardScore, load_imagereward
from .local_files import RewardFilesError, RewardWeightsError
from .vlm import Question, VLMQuestionReward, check_vlm_folder, load_vlm, load_vlm_reward

__all__ = [
    # the contract
    "Reward", "RewardInputError", "check_images",
    # model rewards and their loaders
    "ClipScore", "load_open_clip_score", "load_hf_clip_score", "load_pickscore", "load_hpsv2",
    "AestheticScore", "load_aesthetic",
    "ImageRewardScore", "load_imagereward",
    "Question", "VLMQuestionReward", "load_vlm_reward", "load_vlm", "check_vlm_folder",
    "RewardFilesError", "RewardWeightsError",
    # rewards without a model
    "MaskContainment", "MirrorSymmetry", "RotationInvariance",
    # combining rewards
    "WeightedSum", "Term", "Affine", "BatchStandardize",
]

from .clip import ClipScore, load_hf_clip_score, load_hpsv2, load_open_clip_score, load_pickscore
from .aesthetic import AestheticScore, load_aesthetic
from .imagereward import ImageRewardScore, load_imagereward
from .local_files import RewardFilesError, RewardWeightsError
from .vlm import Question, VLMQuestionReward, check_vlm_folder, load_vlm, load_vlm_reward
from .geometric import MaskContainment, MirrorSymmetry, RotationInvariance
from .combine import Affine, BatchStandardize, Term, WeightedSum

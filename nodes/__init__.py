"""The ComfyUI layer of the pack. Loaded only by ComfyUI, as a sub-package of the pack (relative imports)."""
from .folders import register as _register_folders

_register_folders()

from .few_step_nodes import FEW_STEP_NODES  # noqa: E402  (the folders must exist before the schemas list them)
from .flow_map_training_nodes import TRAINING_NODES  # noqa: E402
from .flux_flow_map_nodes import FLOW_MAP_NODES  # noqa: E402
from .reward_nodes import REWARD_NODES  # noqa: E402
from .sampler_nodes import SAMPLER_NODES  # noqa: E402

NODES = SAMPLER_NODES + FLOW_MAP_NODES + FEW_STEP_NODES + TRAINING_NODES + REWARD_NODES

from .finite_outputs import register as _register_finite_outputs  # noqa: E402
from .strict_inputs import register as _register_strict_inputs  # noqa: E402

_register_strict_inputs(NODES)
_register_finite_outputs(NODES)

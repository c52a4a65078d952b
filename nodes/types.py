"""The pack's link types (links connect only equal type strings)."""
from comfy_api.latest import io

Reward = io.Custom("FMTT_REWARD")            # a differentiable reward: images [B, 3, H, W] in [0, 1] -> [B]
Lookahead = io.Custom("FMTT_LOOKAHEAD")      # a look-ahead spec, resolved inside the sampler
SamplerDiagnostics = io.Custom("FMTT_DIAGNOSTICS")  # filled by the FMTT sampler each time it runs

CATEGORY = "sampling/FMTT"
REWARD_CATEGORY = "sampling/FMTT/rewards"

"""The pair task's networks: its own base velocity and flow map on 8x16 canvases, and the digits demo's
reward classifier and judge applied to each half (they were trained on single 8x8 digits of disjoint
splits, with different architectures and seeds: see fmtt_demo/MODEL_CARD.md)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models import CNNJudge, FlowMapNet, MLPClassifier, VelocityNet, load_model

PAIR_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass
class PairModels:
    velocity: VelocityNet
    flow_map: FlowMapNet
    classifier: MLPClassifier   # per half
    judge: CNNJudge             # per half

    def denoiser(self, x, t):
        """D(x, t) in fmtt_core's Denoiser signature."""
        return self.velocity.denoise(x, t)


def load_pair_models(weights_dir: Path | str | None = None, digit_weights_dir: Path | str | None = None) -> PairModels:
    pair_dir = weights_dir or PAIR_WEIGHTS_DIR
    return PairModels(load_model("velocity", pair_dir), load_model("flow_map", pair_dir),
                      load_model("classifier", digit_weights_dir), load_model("judge", digit_weights_dir))

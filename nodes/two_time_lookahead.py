"""The look-ahead with a trained two-time flow map: the sampled model itself, with the file's adapter active during
the look-ahead's calls only (nodes/two_time.py), X(x, s, t) = x + (t - s)(D2(x; s, t) - x) / (1 - s)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..fmtt_core import FlowMapLookahead, FMTTInputError
from ..fmtt_core.flow_maps import jump_from_denoiser
from ..fmtt_core.flow_maps.two_time_file import is_two_time_lora, load_two_time_lora
from .clocks import clock_of
from .flux_flow_map import load_lookahead as load_fmrg_lookahead
from .lookahead_specs import _Plain
from .two_time import TwoTimeAdapter, family_of, model_fingerprint


@dataclass(frozen=True, eq=False)
class TwoTimeLookahead(_Plain):
    """(e) a two-time flow map trained for this model: X_{t,1} in `jumps` jumps, 1 model call each."""

    adapter: TwoTimeAdapter
    name: str
    jumps: int = 1
    checkpoint: bool = False
    kind = "flow_map"

    def describe(self) -> str:
        return f"two-time flow map '{self.name}' ({self.adapter.family.name}), {self.jumps} jump(s)"

    def flow_map(self, denoiser, clock):
        def jump(x, s, t):
            s = torch.as_tensor(s, dtype=x.dtype, device=x.device).expand(x.shape[0])
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
            with self.adapter.active(clock.sigma(t)):
                denoised = denoiser(x, s)
            return jump_from_denoiser(x, s, t, denoised)

        return jump

    def build(self, denoiser, companion=None):
        clock = clock_of(self.adapter._model_sampling)
        return FlowMapLookahead(self.flow_map(denoiser, clock), jumps=self.jumps, checkpoint=self.checkpoint)

    def run_with(self, base_model, x, sigmas, seed, body):
        with self.adapter.installed(base_model, device=x.device):
            return body()


def load_lookahead(model, path: str, jumps: int, checkpoint: bool):
    """A flow map trained by FMTT Train Flow Map: the pack's two-time format, or FMRG's for FLUX."""
    name = os.path.basename(path)
    if not is_two_time_lora(path):
        return load_fmrg_lookahead(model, path, name, 1.0, jumps, checkpoint)
    base, second, meta = load_two_time_lora(path)
    family = family_of(model.model)
    if meta.get("family") != family.name:
        raise FMTTInputError(f"FMTT: '{name}' is a flow map for {meta.get('family')}, the MODEL is {family.name}. "
                             "Connect the model it was trained on.")
    if meta.get("base_model_hash") != model_fingerprint(model.model):
        raise FMTTInputError(f"FMTT: '{name}' was trained on another {family.name} model (fingerprint "
                             f"{meta.get('base_model_hash')}, this model {model_fingerprint(model.model)}): its look-"
                             "ahead would not be this model's flow map. Connect the model it was trained on, or train "
                             "one for this model with FMTT Train Flow Map.")
    adapter = TwoTimeAdapter(family, model, base, second, trainable=False, name=name)
    return TwoTimeLookahead(adapter, name, jumps, checkpoint)

"""The look-ahead with a two-time flow map: the sampled model itself, with the map's TwoTimeAdapter (nodes/two_time.py)
active during the look-ahead's calls only, X(x, s, t) = x + (t - s)(D2(x; s, t) - x) / (1 - s).

One mechanism for every two-time file: the pack's own format (FMTT Train Flow Map, every family but FLUX) and FMRG's
FLUX LoRA format (FMRG's public file, and the FLUX maps the trainer writes), read onto the model by
nodes/flux_flow_map.py."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..fmtt_core import FlowMapLookahead, FMTTInputError
from ..fmtt_core.flow_maps import jump_from_denoiser
from ..fmtt_core.flow_maps.two_time_file import is_two_time_lora, load_two_time_lora
from .clocks import clock_of
from .flux_flow_map import fmrg_adapter
from .lookahead_specs import BesideTheWeights
from .two_time import TwoTimeAdapter, family_of, model_fingerprint


@dataclass(frozen=True, eq=False)
class TwoTimeLookahead(BesideTheWeights):
    """(e) a two-time flow map of the sampled model: X_{t,1} in `jumps` jumps, 1 model call each."""

    adapter: TwoTimeAdapter
    label: str  # what the diagnostics call it
    jumps: int = 1
    checkpoint: bool = False
    kind = "flow_map"

    def describe(self) -> str:
        return f"{self.label}, {self.jumps} jump(s), {self.jumps} model call(s) per look-ahead"

    def flow_map(self, denoiser, clock):
        """X(x, s, t) in the core clock from the base sampler's denoiser D(x, s) (its conditioning, its guidance):
        the model called as the two-time model at (sigma(s), sigma(t))."""

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

    def installed(self, base_model, device=None):
        return self.adapter.installed(base_model, device)


def load_lookahead(model, path: str, jumps: int, checkpoint: bool, strength: float = 1.0) -> TwoTimeLookahead:
    """A two-time flow map file for this model: the pack's format, or FMRG's FLUX LoRA format (strength: its LoRA's
    multiplier, 1 as trained)."""
    name = os.path.basename(path)
    if not is_two_time_lora(path):
        adapter = fmrg_adapter(model, path, strength)
        return TwoTimeLookahead(adapter, f"FLUX flow-map LoRA '{name}' (strength {strength:g})", jumps, checkpoint)
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
    return TwoTimeLookahead(adapter, f"two-time flow map '{name}' ({family.name})", jumps, checkpoint)

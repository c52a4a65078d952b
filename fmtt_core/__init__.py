"""fmtt_core: Flow Map Trajectory Tilting, framework-free (torch + numpy only).

Clock: t in [0, 1], t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1. A model is a denoiser
D(x, t) ~ E[x1 | x_t = x]; a flow map is X(x, s, t). See fmtt_sample for the method.
"""
from .baselines import (
                    FK_POTENTIALS,
                    base_sample,
                    best_of_n,
                    fk_steering,
                    guidance_sample,
)
from .clock import (
                    flow_sigma_to_t,
                    linear_to_ve,
                    noise_from_denoiser,
                    score_from_denoiser,
                    t_to_flow_sigma,
                    t_to_ve_sigma,
                    ve_sigma_to_t,
                    ve_to_linear,
                    velocity_from_denoiser,
)
from .config import MODES, SDE_STEPS, WEIGHTS, FMTTConfig
from .errors import FMTTInputError, FMTTNumericalError
from .files import FMTTFileError, read_safetensors_header
from .lookahead import (
                    CompanionLookahead,
                    DenoiserLookahead,
                    FewStepLookahead,
                    FlowMapLookahead,
                    ODELookahead,
)
from .nfe import NFE
from .particles import ParticleLoop
from .population import Population
from .result import FMTTResult, StepTrace
from .sampler import fmtt_sample
from .schedules import (
                    LinearTilt,
                    RampTilt,
                    check_time_grid,
                    noise_level,
                    tilt_values,
                    time_grid,
)
from .sde import Move, base_kernel, sde_step
from .smc import SCHEMES, ess, normalize_log_weights, resample_indices
from .weights import (
                    AdvectiveWeights,
                    EulerianWeights,
                    FKWeights,
                    NoWeights,
                    SearchSelection,
                    TwistedWeights,
                    WeightRule,
)

__all__ = [
                    "FK_POTENTIALS",
                    "MODES",
                    "NFE",
                    "SCHEMES",
                    "SDE_STEPS",
                    "WEIGHTS",
                    "AdvectiveWeights",
                    "CompanionLookahead",
                    "FewStepLookahead",
                    "DenoiserLookahead",
                    "EulerianWeights",
                    "FKWeights",
                    "FMTTConfig",
                    "FMTTFileError",
                    "FMTTInputError",
                    "FMTTNumericalError",
                    "FMTTResult",
                    "FlowMapLookahead",
                    "LinearTilt",
                    "Move",
                    "NoWeights",
                    "ODELookahead",
                    "ParticleLoop",
                    "Population",
                    "RampTilt",
                    "SearchSelection",
                    "StepTrace",
                    "TwistedWeights",
                    "WeightRule",
                    "base_kernel",
                    "base_sample",
                    "best_of_n",
                    "check_time_grid",
                    "ess",
                    "fk_steering",
                    "flow_sigma_to_t",
                    "fmtt_sample",
                    "guidance_sample",
                    "linear_to_ve",
                    "noise_from_denoiser",
                    "noise_level",
                    "normalize_log_weights",
                    "read_safetensors_header",
                    "resample_indices",
                    "score_from_denoiser",
                    "sde_step",
                    "t_to_flow_sigma",
                    "t_to_ve_sigma",
                    "tilt_values",
                    "time_grid",
                    "ve_sigma_to_t",
                    "ve_to_linear",
                    "velocity_from_denoiser",
]
__version__ = "0.1.0"

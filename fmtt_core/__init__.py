"""fmtt_core: Flow Map Trajectory Tilting, framework-free (torch + numpy only).

Clock: t in [0, 1], t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1. A model is a denoiser
D(x, t) ~ E[x1 | x_t = x]; a flow map is X(x, s, t). See fmtt_sample for the method.
"""
from .baselines import FK_POTENTIALS, base_sample, best_of_n, fk_steering, guidance_sample
from .clock import (flow_sigma_to_t, linear_to_ve, noise_from_denoiser, score_from_denoiser, t_to_flow_sigma,
                    t_to_ve_sigma, ve_sigma_to_t, ve_to_linear, velocity_from_denoiser)
from .errors import FMTTInputError, FMTTNumericalError
from .files import FMTTFileError, read_safetensors_header
from .lookahead import CompanionLookahead, DenoiserLookahead, FlowMapLookahead, ODELookahead
from .nfe import NFE
from .config import MODES, SDE_STEPS, WEIGHTS, FMTTConfig
from .particles import ParticleLoop
from .population import Population
from .result import FMTTResult, StepTrace
from .sampler import fmtt_sample
from .sde import Move, base_kernel, sde_step
from .schedules import LinearTilt, RampTilt, check_time_grid, noise_level, tilt_values, time_grid
from .smc import SCHEMES, ess, normalize_log_weights, resample_indices
from .weights import (AdvectiveWeights, EulerianWeights, FKWeights, NoWeights, SearchSelection, TwistedWeights,
                      WeightRule)

__all__ = [
    "fmtt_sample", "FMTTConfig", "FMTTResult", "StepTrace", "ParticleLoop", "sde_step", "base_kernel", "Move",
    "MODES", "WEIGHTS", "SDE_STEPS", "Population",
    "WeightRule", "TwistedWeights", "AdvectiveWeights", "EulerianWeights", "FKWeights", "SearchSelection", "NoWeights",
    "base_sample", "best_of_n", "guidance_sample", "fk_steering", "FK_POTENTIALS",
    "DenoiserLookahead", "ODELookahead", "CompanionLookahead", "FlowMapLookahead",
    "time_grid", "check_time_grid", "LinearTilt", "RampTilt", "tilt_values", "noise_level",
    "ess", "resample_indices", "normalize_log_weights", "SCHEMES", "NFE",
    "velocity_from_denoiser", "score_from_denoiser", "noise_from_denoiser",
    "flow_sigma_to_t", "t_to_flow_sigma", "ve_sigma_to_t", "t_to_ve_sigma", "ve_to_linear", "linear_to_ve",
    "FMTTInputError", "FMTTNumericalError", "FMTTFileError", "read_safetensors_header",
]
__version__ = "0.1.0"

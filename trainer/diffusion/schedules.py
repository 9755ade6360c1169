"""Training noise schedules, computed the way diffusers computes them from a scheduler config.

Betas and alphas_cumprod are float32 torch tensors built with the same torch ops as diffusers
(torch.linspace, **2, torch.cumprod), so a config means the same schedule here as there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# diffusers' defaults for the keys that decide the training schedule (they are the same in every
# scheduler class that supports them).
_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}

# Stable Diffusion 1.x's noise schedule as its scheduler configs state it (runwayml/stable-diffusion-v1-5
# scheduler/): packages add their sampler's class name and its own keys.
SD1_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
}


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """config[key], or diffusers' default when the key is missing or null."""
    value = config.get(key)
    return _DEFAULTS.get(key) if value is None else value


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """`squaredcos_cap_v2`: betas from ᾱ(t) = cos²((t + 0.008) / 1.008 · π/2), computed in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that ᾱ[T-1] = 0 (pure noise at the last timestep), keeping ᾱ[0]."""
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sqrt_ab = alphas_cumprod.sqrt()
    first = sqrt_ab[0].clone()
    last = sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def betas_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """The float32 betas a diffusers scheduler builds from `config` (incl. the zero-SNR rescale)."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float32)
    else:
        schedule = config_value(config, "beta_schedule")
        steps = int(config_value(config, "num_train_timesteps"))
        start = float(config_value(config, "beta_start"))
        end = float(config_value(config, "beta_end"))
        if schedule == "linear":
            betas = torch.linspace(start, end, steps, dtype=torch.float32)
        elif schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = cosine_betas(steps)
        else:
            raise ValueError(f"unsupported beta_schedule {schedule!r} (expected one of {BETA_SCHEDULES})")
    if config_value(config, "rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas)
    return betas


@dataclass
class NoiseSchedule:
    """The forward (noising) process of a diffusers config, for training."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        prediction_type = config_value(config, "prediction_type")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        betas = betas_from_config(config)
        return cls(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), prediction_type=prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """√ᾱ_t and √(1-ᾱ_t) for per-sample timesteps t, shaped to broadcast against `like`."""
        ac = self.alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        signal = ac.sqrt().to(like.dtype).reshape(shape)
        noise = (1 - ac).sqrt().to(like.dtype).reshape(shape)
        return signal, noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network must predict under this schedule's prediction_type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.velocity(x0, noise, t)
        return x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ_t / (1 - ᾱ_t) in float64 (0 at a zero-terminal-SNR last step)."""
        ac = self.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
        return ac / (1 - ac)

    def min_snr_weights(self, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023) for this prediction_type, float32 [B].

        epsilon: min(snr, γ)/snr, which tends to 1 as snr → 0 (taken as 1 at snr = 0);
        v_prediction: min(snr, γ)/(snr + 1), 0 at snr = 0; sample: min(snr, γ).
        """
        return min_snr_weights(self.snr(t), gamma, self.prediction_type)

    def capped_snr_weights(self, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        """min(1, γ/(snr + 1)): min-SNR-γ on snr + 1, for v-prediction with a zero-SNR schedule.

        Plain min-SNR gives v-prediction a weight of snr/(snr + 1) near pure noise, i.e. ≈0 on the
        timesteps where only the caption can tell the model what to draw. This variant keeps the
        γ/(snr + 1) down-weighting of clean timesteps but caps the weight at 1 near pure noise.
        """
        return (gamma / (self.snr(t) + 1)).clamp(max=1.0).float()


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    snr = snr.double()
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "epsilon":
        weights = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(torch.float64).tiny), torch.ones_like(snr))
    elif prediction_type == "v_prediction":
        weights = clipped / (snr + 1)
    elif prediction_type == "sample":
        weights = clipped
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return weights.float()

"""The diffusion training loss: noise and timesteps drawn for a batch, the schedule's target, and the
(optionally SNR-weighted) mean squared error against it."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from trainer.diffusion.schedules import NoiseSchedule

# Stable Diffusion 1.x's training schedule (the AFA reference trains on it).
SD15_SCHEDULER: Dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}
SNR_WEIGHTINGS = ("none", "min_snr", "capped")


def schedule_from_config(scheduler_config: Optional[Mapping[str, Any]],
                         prediction_type: Optional[str] = None) -> Tuple[NoiseSchedule, Dict[str, Any]]:
    config = dict(SD15_SCHEDULER if scheduler_config is None else scheduler_config)
    if prediction_type is not None:
        config["prediction_type"] = prediction_type
    return NoiseSchedule.from_config(config), config


class DiffusionLoss:
    """Noise, timesteps (uniform over the schedule's train timesteps), targets and the weighted MSE."""

    def __init__(self, schedule: NoiseSchedule, device: torch.device, snr_weighting: str = "none",
                 snr_gamma: float = 5.0):
        if snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"snr_weighting must be one of {SNR_WEIGHTINGS}, got {snr_weighting!r}")
        self.schedule = schedule
        self.device = device
        self.snr_weighting = snr_weighting
        self.snr_gamma = snr_gamma

    def noisy_inputs(self, x0: Tensor, generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
        """(noisy sample, timesteps [B] on the device, target); noise and timesteps are drawn on the CPU."""
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(self.device, x0.dtype)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(self.device)
        return self.schedule.add_noise(x0, noise, t), t, self.schedule.target(x0, noise, t)

    def __call__(self, prediction: Tensor, target: Tensor, t: Tensor) -> Tensor:
        per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
        if self.snr_weighting == "none":
            return per_sample.mean()
        if self.snr_weighting == "min_snr":
            weights = self.schedule.min_snr_weights(t, self.snr_gamma)
        else:
            weights = self.schedule.capped_snr_weights(t, self.snr_gamma)
        return (per_sample * weights.to(per_sample.device)).mean()

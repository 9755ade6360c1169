"""Reference sampler over PyTorch denoisers, with diffusers' DDIM (eta 0) and Euler (discrete)
semantics read from a diffusers scheduler config dict.

The engine's parity tests compare against what this module produces, so the arithmetic follows
diffusers op by op: timestep grids and sigma interpolation in float64 numpy, everything that
touches latents in float32 torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from trainer.diffusion.schedules import betas_from_config
from trainer.models.afa import contribution_map

# Defaults of the diffusers classes, used when an (older) config lacks a key.
DDIM_DEFAULTS = {
    "num_train_timesteps": 1000,
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
}
EULER_DEFAULTS = {
    "num_train_timesteps": 1000,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
    "interpolation_type": "linear",
    "final_sigmas_type": "zero",
    "timestep_type": "discrete",
    "rescale_betas_zero_snr": False,
}
SCHEDULERS = ("ddim", "euler")


def _get(config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    value = config.get(key)
    return defaults[key] if value is None else value


def _spaced_timesteps(spacing: str, train_steps: int, steps: int, offset: int) -> np.ndarray:
    """diffusers' inference grid, descending, float64 (DDIM rounds it to int64 afterwards)."""
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = train_steps // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy() + offset
    if spacing == "trailing":
        ratio = train_steps / steps
        return np.round(np.arange(train_steps, 0, -ratio)) - 1
    raise ValueError(f"unsupported timestep_spacing {spacing!r} (expected leading, linspace or trailing)")


class DDIMScheduler:
    """diffusers' DDIMScheduler with eta = 0 (deterministic)."""

    order = 1

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int):
        cfg = dict(DDIM_DEFAULTS)
        cfg.update({k: v for k, v in config.items() if v is not None})
        if cfg["thresholding"]:
            raise ValueError("DDIM dynamic thresholding is not supported")
        self.config = cfg
        self.prediction_type = cfg["prediction_type"]
        self.train_steps = int(cfg["num_train_timesteps"])
        if num_inference_steps > self.train_steps:
            raise ValueError(f"num_inference_steps {num_inference_steps} > num_train_timesteps {self.train_steps}")
        self.num_inference_steps = num_inference_steps
        self.alphas_cumprod = torch.cumprod(1.0 - betas_from_config(cfg), dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        spacing = cfg["timestep_spacing"]
        grid = _spaced_timesteps(spacing, self.train_steps, num_inference_steps, int(cfg["steps_offset"]))
        if spacing == "linspace":
            grid = grid.round()
        self.timesteps = torch.from_numpy(grid.astype(np.int64))
        self.init_noise_sigma = torch.tensor(1.0)

    def model_timestep(self, index: int) -> float:
        return float(self.timesteps[index])

    def scale_model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        t = int(self.timesteps[index])
        # diffusers steps back by train_steps // steps whatever the spacing
        prev_t = t - self.train_steps // self.num_inference_steps
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t = 1 - alpha_t
        if self.prediction_type == "epsilon":
            pred_x0 = (sample - beta_t ** (0.5) * model_output) / alpha_t ** (0.5)
            pred_eps = model_output
        elif self.prediction_type == "v_prediction":
            pred_x0 = (alpha_t**0.5) * sample - (beta_t**0.5) * model_output
            pred_eps = (alpha_t**0.5) * model_output + (beta_t**0.5) * sample
        elif self.prediction_type == "sample":
            pred_x0 = model_output
            pred_eps = (sample - alpha_t ** (0.5) * pred_x0) / beta_t ** (0.5)
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        if self.config["clip_sample"]:
            limit = float(self.config["clip_sample_range"])
            pred_x0 = pred_x0.clamp(-limit, limit)
        direction = (1 - alpha_prev) ** (0.5) * pred_eps
        return alpha_prev ** (0.5) * pred_x0 + direction


class EulerDiscreteScheduler:
    """diffusers' EulerDiscreteScheduler with s_churn = 0 (no noise is drawn)."""

    order = 1

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int, karras: Optional[bool] = None):
        cfg = dict(EULER_DEFAULTS)
        cfg.update({k: v for k, v in config.items() if v is not None})
        if karras is not None:
            cfg["use_karras_sigmas"] = karras
        if cfg["interpolation_type"] != "linear" or cfg["timestep_type"] != "discrete":
            raise ValueError("only interpolation_type 'linear' and timestep_type 'discrete' are supported")
        self.config = cfg
        self.prediction_type = cfg["prediction_type"]
        train_steps = int(cfg["num_train_timesteps"])
        alphas_cumprod = torch.cumprod(1.0 - betas_from_config(cfg), dim=0)
        if cfg["rescale_betas_zero_snr"]:
            # keeps σ finite at the last timestep, as diffusers does
            alphas_cumprod[-1] = 2**-24
        self.alphas_cumprod = alphas_cumprod

        timesteps = _spaced_timesteps(cfg["timestep_spacing"], train_steps, num_inference_steps, int(cfg["steps_offset"]))
        timesteps = timesteps.astype(np.float32)
        train_sigmas = np.array(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        log_sigmas = np.log(train_sigmas)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if cfg["use_karras_sigmas"]:
            sigmas = _karras_sigmas(sigmas, num_inference_steps)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if cfg["final_sigmas_type"] == "zero":
            last = 0.0
        elif cfg["final_sigmas_type"] == "sigma_min":
            last = float(train_sigmas[0])
        else:
            raise ValueError(f"unsupported final_sigmas_type {cfg['final_sigmas_type']!r}")
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32))
        self.num_inference_steps = num_inference_steps
        max_sigma = self.sigmas.max()
        if cfg["timestep_spacing"] in ("linspace", "trailing"):
            self.init_noise_sigma = max_sigma
        else:
            self.init_noise_sigma = (max_sigma**2 + 1) ** 0.5

    def model_timestep(self, index: int) -> float:
        return float(self.timesteps[index])

    def scale_model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        sigma = self.sigmas[index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[index]
        if self.prediction_type == "epsilon":
            pred_x0 = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            pred_x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        elif self.prediction_type == "sample":
            pred_x0 = model_output
        else:
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")
        derivative = (sample - pred_x0) / sigma
        dt = self.sigmas[index + 1] - sigma
        return sample + derivative * dt


def _karras_sigmas(sigmas: np.ndarray, steps: int, rho: float = 7.0) -> np.ndarray:
    sigma_min, sigma_max = float(sigmas[-1]), float(sigmas[0])
    ramp = np.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep whose σ is `sigma`, by interpolation in log σ."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return float(((1 - w) * low_idx + w * high_idx).reshape(()))


Scheduler = Union[DDIMScheduler, EulerDiscreteScheduler]


def make_scheduler(name: str, config: Mapping[str, Any], num_inference_steps: int, karras: Optional[bool] = None) -> Scheduler:
    if name == "ddim":
        if karras:
            raise ValueError("DDIM has no Karras sigmas")
        return DDIMScheduler(config, num_inference_steps)
    if name == "euler":
        return EulerDiscreteScheduler(config, num_inference_steps, karras=karras)
    raise ValueError(f"unknown scheduler {name!r} (expected one of {SCHEDULERS})")


def initial_latents(shape: Sequence[int], seed: int, init_noise_sigma: torch.Tensor) -> torch.Tensor:
    """[B,C,h,w] start latents; image i is drawn from its own generator seeded with seed + i."""
    batch, rest = int(shape[0]), list(shape[1:])
    images = [
        torch.randn([1] + rest, generator=torch.Generator("cpu").manual_seed(seed + i), dtype=torch.float32)
        for i in range(batch)
    ]
    return torch.cat(images) * init_noise_sigma


# A denoiser maps (latent_model_input [B',C,h,w], t [B'] float32, text_embeddings [..., B', 77, D])
# to the prediction, or to (prediction, weights) where weights are either a list of per-point
# [B',N,h_i,w_i] softmax maps (AFAEnsemble.forward) or one [B',N,h,w] map.
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


@dataclass
class SampleResult:
    latents: torch.Tensor
    # [B,N,h,w] aggregator weights at latent resolution, mean over points and steps, of the
    # conditional half of the guided batch; None for a plain denoiser.
    contributions: Optional[torch.Tensor]
    timesteps: torch.Tensor


def _split_output(output: Any, size: tuple[int, int]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(output, torch.Tensor):
        return output, None
    prediction, weights = output
    if isinstance(weights, torch.Tensor):
        maps = weights
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    else:
        maps = contribution_map(weights, size)
    return prediction, maps


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    *,
    latent_shape: Sequence[int],
    seed: int,
    steps: int,
    guidance: float,
    scheduler: str = "ddim",
    scheduler_config: Mapping[str, Any],
    karras: Optional[bool] = None,
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
) -> SampleResult:
    """Denoise `latent_shape[0]` images from seeds seed, seed+1, ….

    cond/uncond are text embeddings with the batch on axis -3 ([B,77,D], or [N,B,77,D] for an
    AFA ensemble); uncond may have batch 1 (broadcast). With guidance > 1 the denoiser sees the
    doubled batch [uncond; cond] and the result is uncond + guidance·(cond - uncond); otherwise
    it sees cond only (as diffusers does).
    """
    sched = make_scheduler(scheduler, scheduler_config, steps, karras=karras)
    batch = int(latent_shape[0])
    if cond.shape[-3] != batch:
        raise ValueError(f"cond has batch {cond.shape[-3]}, latent_shape has {batch}")
    guided = guidance > 1.0
    if guided:
        if uncond is None:
            raise ValueError("guidance > 1 needs unconditional embeddings")
        uncond = uncond.expand(cond.shape) if uncond.shape[-3] == 1 else uncond
        text = torch.cat([uncond, cond], dim=-3)
    else:
        text = cond
    latents = initial_latents(latent_shape, seed, sched.init_noise_sigma)
    latents, contributions = denoise_from(denoiser, latents, text, sched, 0, guidance, on_step=on_step)
    return SampleResult(latents=latents, contributions=contributions, timesteps=sched.timesteps)


@torch.no_grad()
def decode_latents(vae_decoder: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """latents → uint8 RGB images [B,H,W,3]."""
    images = vae_decoder(latents / scale_factor)
    if not isinstance(images, torch.Tensor):  # e.g. a (sample,) tuple or an output object
        images = images[0] if isinstance(images, (tuple, list)) else images.sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def denoise_from(denoiser: Denoiser, latents: torch.Tensor, text: torch.Tensor, sched, begin: int, guidance: float,
                 on_step: Optional[Callable[[int, torch.Tensor], None]] = None):
    """The denoising loop from step `begin` on (0 for txt2img; img2img starts later): text is [uncond; cond]
    when guidance > 1, else cond. Returns (latents, the mean contribution maps over the steps run or None)."""
    batch = latents.shape[0]
    guided = guidance > 1.0
    size = (int(latents.shape[-2]), int(latents.shape[-1]))
    contributions = None
    for index in range(begin, len(sched.timesteps)):
        model_input = sched.scale_model_input(latents, index)
        if guided:
            model_input = torch.cat([model_input, model_input])
        t = torch.full((model_input.shape[0],), sched.model_timestep(index), dtype=torch.float32)
        prediction, maps = _split_output(denoiser(model_input, t, text), size)
        if guided:
            uncond_pred, cond_pred = prediction.chunk(2)
            prediction = uncond_pred + guidance * (cond_pred - uncond_pred)
            maps = maps[batch:] if maps is not None else None
        if maps is not None:
            contributions = maps if contributions is None else contributions + maps
        latents = sched.step(prediction, index, latents)
        if on_step is not None:
            on_step(index, latents)
    if contributions is not None:
        contributions = contributions / (len(sched.timesteps) - begin)
    return latents, contributions

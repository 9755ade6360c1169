import json
import math

import pytest
import torch

from trainer.diffusion.schedules import NoiseSchedule, betas_from_config, min_snr_weights
from trainer.tests.golden import SCHEDULER_GOLDEN

GOLDEN = SCHEDULER_GOLDEN

SD15 = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def test_sd15_alphas_cumprod_endpoints():
    schedule = NoiseSchedule.from_config(SD15)
    assert schedule.betas.dtype == torch.float32
    assert schedule.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=5e-6)
    assert schedule.alphas_cumprod[999].item() == pytest.approx(0.0046601, rel=1e-5)
    sigma_max = ((1 - schedule.alphas_cumprod[999]) / schedule.alphas_cumprod[999]).sqrt().item()
    assert sigma_max == pytest.approx(14.6146, abs=1e-4)


def test_sd15_schedule_matches_golden_train_schedule():
    golden = json.loads(GOLDEN.read_text())["train_schedule"]
    schedule = NoiseSchedule.from_config(SD15)
    betas = torch.tensor(golden["betas"], dtype=torch.float64)
    ac = torch.tensor(golden["alphas_cumprod"], dtype=torch.float64)
    # a few ulp: CPU linspace/cumprod kernels differ by 1 ulp between builds
    assert torch.allclose(schedule.betas.double(), betas, rtol=1e-6, atol=0)
    assert torch.allclose(schedule.alphas_cumprod.double(), ac, rtol=1e-5, atol=0)


def test_linear_and_cosine_schedules():
    linear = betas_from_config({"beta_schedule": "linear"})  # diffusers defaults 1e-4 .. 0.02
    assert linear[0].item() == pytest.approx(1e-4) and linear[-1].item() == pytest.approx(0.02)
    cosine = betas_from_config({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})
    assert cosine.max().item() == pytest.approx(0.999)  # the cap
    ac = torch.cumprod(1 - cosine.double(), 0)
    expected = math.cos((500 / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert ac[499].item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        betas_from_config({"beta_schedule": "sigmoid"})


def test_zero_terminal_snr_rescale():
    schedule = NoiseSchedule.from_config({**SD15, "rescale_betas_zero_snr": True})
    plain = NoiseSchedule.from_config(SD15)
    assert schedule.alphas_cumprod[999].item() == 0.0
    assert schedule.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-6)
    assert bool((schedule.alphas_cumprod[1:] <= schedule.alphas_cumprod[:-1]).all())
    assert schedule.snr(torch.tensor([999])).item() == 0.0


def test_add_noise_velocity_and_targets_are_consistent():
    schedule = NoiseSchedule.from_config({**SD15, "prediction_type": "v_prediction"})
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g)
    noise = torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = schedule.add_noise(x0, noise, t)
    v = schedule.velocity(x0, noise, t)
    a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - schedule.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(xt, a * x0 + s * noise)
    # v-parameterisation identities: x0 = a·x_t - s·v, ε = s·x_t + a·v
    assert torch.allclose(a * xt - s * v, x0, atol=1e-5)
    assert torch.allclose(s * xt + a * v, noise, atol=1e-5)
    assert torch.equal(schedule.target(x0, noise, t), v)
    eps_schedule = NoiseSchedule.from_config(SD15)
    assert torch.equal(eps_schedule.target(x0, noise, t), noise)


def test_min_snr_weights():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0], dtype=torch.float64)
    eps = min_snr_weights(snr, 5.0, "epsilon")
    assert eps.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.25])
    v = min_snr_weights(snr, 5.0, "v_prediction")
    assert v.tolist() == pytest.approx([0.0, 0.5 / 1.5, 5 / 6, 5 / 21])
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()

    zsnr = NoiseSchedule.from_config({**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"})
    t = torch.tensor([0, 999])
    assert zsnr.min_snr_weights(t).tolist()[1] == 0.0
    capped = zsnr.capped_snr_weights(t, gamma=5.0)
    assert capped[1].item() == 1.0  # pure noise still trains
    assert capped[0].item() == pytest.approx(5.0 / (zsnr.snr(torch.tensor([0])).item() + 1), rel=1e-6)

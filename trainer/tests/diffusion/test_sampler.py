import json

import numpy as np
import pytest
import torch

from trainer.diffusion.sampler import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    decode_latents,
    initial_latents,
    make_scheduler,
    sample,
)
from trainer.tests.golden import GOLDEN_DIR, SCHEDULER_GOLDEN

GOLDEN = json.loads(SCHEDULER_GOLDEN.read_text())
CASES = [c for c in GOLDEN["cases"] if c["scheduler"] in ("DDIMScheduler", "EulerDiscreteScheduler")]
SD15 = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading", "set_alpha_to_one": False,
    "clip_sample": False,
}


def fake_model(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The golden file's model: eps = 0.5·x·cos(t/300) + 0.1·sin(t/50), in float64, rounded to float32."""
    t64 = t.double().view(-1, *([1] * (x.dim() - 1)))
    return (0.5 * x.double() * torch.cos(t64 / 300) + 0.1 * torch.sin(t64 / 50)).float()


def test_golden_file_has_ddim_and_euler_cases():
    names = {c["id"] for c in CASES}
    assert {"ddim_leading_50", "ddim_trailing_20", "euler_linspace_20", "euler_leading_karras_20"} <= names


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_trajectory_matches_diffusers_golden(case):
    name = "ddim" if case["scheduler"] == "DDIMScheduler" else "euler"
    steps = case["num_inference_steps"]
    sched = make_scheduler(name, case["config"], steps, karras=case["use_karras_sigmas"])
    assert sched.timesteps.tolist() == case["timesteps"]  # exact, incl. Euler's float32 values
    assert float(sched.init_noise_sigma) == pytest.approx(case["init_noise_sigma"], rel=1e-6)
    if case["sigmas"] is not None:
        assert np.allclose(sched.sigmas.numpy(), case["sigmas"], rtol=1e-6, atol=0)

    text = torch.zeros(1, 77, 8)
    per_step = []
    result = sample(
        fake_model, text, None, latent_shape=[1, 4, 8, 8], seed=1234, steps=steps, guidance=1.0,
        scheduler=name, scheduler_config=case["config"], karras=case["use_karras_sigmas"],
        on_step=lambda i, x: per_step.append(x.double().sum().item()),
    )
    gold = torch.tensor(case["x_final"], dtype=torch.float64).view(1, 4, 8, 8)
    x = result.latents.double()
    assert bool(((x - gold).abs() <= 1e-3 + 1e-5 * gold.abs()).all()), (x - gold).abs().max()
    assert per_step == pytest.approx(case["per_step_sum"], rel=1e-5, abs=1e-2)
    assert result.contributions is None


def test_initial_latents_use_one_generator_per_image():
    golden = json.loads((GOLDEN_DIR / "torch_randn_golden.json").read_text())["cases"][0]
    shape = golden["shape"]
    first = initial_latents([2] + shape[1:], golden["seed"] - 1, torch.tensor(1.0))
    assert first[1].flatten()[: len(golden["first"])].tolist() == pytest.approx(golden["first"], abs=1e-7)
    sigma = torch.tensor(14.6146)
    scaled = initial_latents([1] + shape[1:], golden["seed"], sigma)
    assert torch.allclose(scaled, first[1:] * sigma)


def test_old_config_without_spacing_uses_each_class_default():
    old = {k: v for k, v in SD15.items() if k != "timestep_spacing"}
    assert DDIMScheduler(old, 50).timesteps[:3].tolist() == [981, 961, 941]  # leading
    euler = EulerDiscreteScheduler(old, 20)
    assert euler.timesteps[0].item() == 999.0  # linspace
    assert float(euler.init_noise_sigma) == pytest.approx(14.6146, abs=1e-4)
    assert DDIMScheduler({**old, "clip_sample": None}, 10).config["clip_sample"] is True


def _zero_snr_config():
    # set_alpha_to_one: DDIM's last step then goes to ᾱ = 1 (no noise left) like Euler's σ = 0
    return {**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction",
            "timestep_spacing": "trailing", "set_alpha_to_one": True}


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_v_prediction_with_oracle_recovers_x0(name):
    """A perfect v-predictor for a point-mass data distribution lands exactly on that point."""
    config = _zero_snr_config()
    sched = make_scheduler(name, config, 10)
    assert sched.timesteps[0].item() == 999
    ac = sched.alphas_cumprod.double()
    target = torch.full((1, 4, 4, 4), 0.7, dtype=torch.float64)

    def oracle(x, t, text):
        a = ac[t.long()].view(-1, 1, 1, 1)
        if name == "euler":  # model input is x_t / √(σ²+1) = √ᾱ · (x0 + σ ε) = x_t in VP form
            pass
        eps = (x.double() - a.sqrt() * target) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * target).float()

    result = sample(oracle, torch.zeros(1, 77, 8), None, latent_shape=[1, 4, 4, 4], seed=3, steps=10,
                    guidance=1.0, scheduler=name, scheduler_config=config)
    assert torch.allclose(result.latents.double(), target, atol=1e-3)


def test_guidance_doubles_batch_and_combines_predictions():
    calls = []

    def denoiser(x, t, text):
        calls.append((x.shape[0], text.shape, t.shape))
        # uncond half predicts 0, cond half predicts its text value; weights: 2 experts
        pred = text[..., 0, 0].view(-1, 1, 1, 1).expand_as(x).clone()
        maps = torch.stack([torch.full(x.shape[-2:], 0.25), torch.full(x.shape[-2:], 0.75)])
        maps = maps.unsqueeze(0).repeat(x.shape[0], 1, 1, 1)
        maps[: x.shape[0] // 2] = 0.5
        return pred, [maps, maps[:, :, ::2, ::2]]

    cond = torch.ones(2, 77, 4)
    uncond = torch.zeros(1, 77, 4)
    config = {**SD15, "timestep_spacing": "leading"}
    guided = sample(denoiser, cond, uncond, latent_shape=[2, 4, 6, 6], seed=0, steps=3, guidance=7.5,
                    scheduler="ddim", scheduler_config=config)
    assert calls[0][0] == 4 and calls[0][1] == (4, 77, 4) and calls[0][2] == (4,)
    # with the prediction 0 + 7.5·(1 - 0), DDIM equals running a constant predictor of 7.5
    plain = sample(lambda x, t, c: torch.full_like(x, 7.5), cond, None, latent_shape=[2, 4, 6, 6], seed=0,
                   steps=3, guidance=1.0, scheduler="ddim", scheduler_config=config)
    assert torch.allclose(guided.latents, plain.latents)
    assert guided.contributions.shape == (2, 2, 6, 6)
    assert torch.allclose(guided.contributions[:, 0], torch.tensor(0.25))  # cond half only
    assert torch.allclose(guided.contributions.sum(1), torch.tensor(1.0))


def test_decode_latents_to_uint8_rgb():
    seen = {}

    def decoder(z):
        seen["z"] = z
        return torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 3, 1, 2)

    latents = torch.full((1, 4, 1, 2), 0.18215)
    images = decode_latents(decoder, latents, 0.18215)
    assert torch.allclose(seen["z"], torch.ones(1, 4, 1, 2))
    assert images.dtype == torch.uint8 and images.shape == (1, 1, 2, 3)
    # channel-last: pixel 0 = (R,G,B) = (-1.5, 0.0, 1.0) → (0, 128, 255)
    assert images[0, 0, 0].tolist() == [0, 128, 255]
    assert images[0, 0, 1].tolist() == [0, 255, 255]


@torch.no_grad()
def test_sampling_through_an_afa_ensemble():
    import copy

    from trainer.models.afa import AFAEnsemble
    from trainer.models.unet import UNet2DConditionModel, UNetConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.tiny(cross_attention_dim=16)).eval()
    ensemble = AFAEnsemble([copy.deepcopy(unet) for _ in range(2)], hidden=16, depth=1, heads=2, head_dim=8)
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 77, 16, generator=g)
    uncond = torch.randn(1, 77, 16, generator=g)
    common = dict(latent_shape=[2, 4, 8, 8], seed=11, steps=3, guidance=4.0, scheduler="euler", scheduler_config=SD15)

    # per-expert text embeddings [N,B,77,D]; identical experts → same as the single U-Net
    afa = sample(lambda x, t, c: ensemble(x, t, c), cond.expand(2, -1, -1, -1), uncond.expand(2, -1, -1, -1),
                 **common)
    single = sample(lambda x, t, c: unet(x, t, c), cond, uncond, **common)
    assert torch.allclose(afa.latents, single.latents, atol=1e-4, rtol=1e-4)
    assert single.contributions is None
    assert afa.contributions.shape == (2, 2, 8, 8)
    assert torch.allclose(afa.contributions, torch.full_like(afa.contributions, 0.5))

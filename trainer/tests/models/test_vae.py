import pytest
import torch
import torch.nn.functional as F

from trainer.models.vae import AutoencoderKL, VAEConfig, kl_divergence, vae_loss


def _tiny(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny(**overrides))


def test_sd15_preset_on_meta_has_diffusers_layout():
    vae = AutoencoderKL(VAEConfig.sd15(), device="meta")
    assert all(p.device.type == "meta" for p in vae.parameters())
    sd = vae.state_dict()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # diffusers AutoencoderKL for SD1.x
    assert len(sd) == 248
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down_blocks.0.resnets.1.conv2.weight": (128, 128, 3, 3),
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "encoder.down_blocks.2.downsamplers.0.conv.weight": (512, 512, 3, 3),
        "encoder.mid_block.attentions.0.group_norm.weight": (512,),
        "encoder.mid_block.attentions.0.to_q.weight": (512, 512),
        "encoder.mid_block.attentions.0.to_out.0.bias": (512,),
        "encoder.mid_block.resnets.1.norm2.weight": (512,),
        "encoder.conv_norm_out.weight": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.up_blocks.0.resnets.2.conv1.weight": (512, 512, 3, 3),
        "decoder.up_blocks.0.upsamplers.0.conv.weight": (512, 512, 3, 3),
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight": (256, 512, 1, 1),
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight": (128, 256, 1, 1),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("encoder.down_blocks.3.downsamplers") for k in sd)
    assert not any(k.startswith("decoder.up_blocks.3.upsamplers") for k in sd)
    assert VAEConfig.sd15().downsample_factor == 8


def test_mid_block_attention_switch():
    with_attn = AutoencoderKL(VAEConfig.tiny(), device="meta").state_dict()
    without = AutoencoderKL(VAEConfig.tiny(mid_block_attention=False), device="meta").state_dict()
    attn_keys = {k for k in with_attn if ".attentions." in k}
    assert attn_keys and set(with_attn) - set(without) == attn_keys


def test_encode_decode_shapes_and_latent_sampling():
    vae = _tiny(block_out_channels=(8, 16, 16), latent_channels=3).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (2, 3, 4, 6)
        z1 = vae.sample_latent(mean, logvar, torch.Generator().manual_seed(7))
        z2 = vae.sample_latent(mean, logvar, torch.Generator().manual_seed(7))
        z3 = vae.sample_latent(mean, logvar, torch.Generator().manual_seed(8))
        torch.testing.assert_close(z1, z2)
        assert (z1 - z3).abs().max() > 1e-3
        # Noise is scaled by exp(logvar / 2): with a tiny variance the sample is the mean.
        torch.testing.assert_close(vae.sample_latent(mean, torch.full_like(logvar, -30.0)), mean, atol=1e-5, rtol=0)
        out = vae.decode(z1)
    assert out.shape == (2, 3, 16, 24)


def test_downsampler_pads_right_and_bottom_only():
    vae = _tiny()
    down = vae.encoder.down_blocks[0].downsamplers[0]
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        torch.testing.assert_close(down(x), expected)
    assert down(x).shape == (1, 16, 4, 4)


def test_kl_and_loss_terms():
    mean = torch.zeros(1, 4, 2, 2)
    assert kl_divergence(mean, torch.zeros_like(mean)).item() == pytest.approx(0.0)
    assert kl_divergence(mean + 2.0, torch.zeros_like(mean)).item() == pytest.approx(2.0)  # 0.5 * mu^2
    vae = _tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    loss, recon, kl = vae_loss(vae, x, kl_weight=0.25, generator=torch.Generator().manual_seed(0))
    assert kl.item() >= 0 and recon.item() > 0
    assert loss.item() == pytest.approx(recon.item() + 0.25 * kl.item(), rel=1e-6)
    loss.backward()
    assert vae.encoder.conv_in.weight.grad is not None and vae.decoder.conv_out.weight.grad is not None


def test_a_few_training_steps_reduce_the_loss():
    vae = _tiny()
    torch.manual_seed(1)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    first = None
    for _ in range(25):
        loss, recon, _ = vae_loss(vae, x, kl_weight=1e-4, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else recon.item()
    assert recon.item() < 0.7 * first


def test_config_round_trip_and_validation():
    cfg = VAEConfig.tiny(block_out_channels=[16, 32, 32])
    assert cfg.downsample_factor == 4
    assert VAEConfig(**cfg.to_dict()) == cfg
    dc = cfg.diffusers_config()
    assert dc["down_block_types"] == ["DownEncoderBlock2D"] * 3 and dc["block_out_channels"] == [16, 32, 32]
    with pytest.raises(ValueError):
        VAEConfig(block_out_channels=(12, 24), norm_num_groups=8)



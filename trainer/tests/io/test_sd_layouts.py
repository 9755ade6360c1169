"""SD1.x single-file layouts: the CLIP text encoder and VAE name maps, the U-Net config read from LDM
shapes, EMA names, and reading some tensors of a .safetensors file."""
import json

import pytest
import torch

from trainer.io.safetensors import load_safetensors, save_safetensors
from trainer.io.sd_checkpoint import diffusers_to_ldm_unet_state_dict
from trainer.io.sd_text_encoder import (LDM_TEXT_PREFIX, config_from_hf, extract_ldm_text_encoder,
                                        hf_to_ldm_text_encoder_state_dict, infer_text_encoder_config,
                                        text_encoder_from_state_dict)
from trainer.io.ldm_ema import ema_name_to_ldm, ema_unet_names
from trainer.io.sd_unet_layout import check_ldm_unet, infer_unet_config
from trainer.io.sd_vae import (LDM_VAE_PREFIX, diffusers_to_ldm_vae_state_dict, infer_vae_config,
                               ldm_to_diffusers_vae_state_dict, vae_from_state_dict, vae_state_dict_from_any)
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.tests.golden import SD15_UNET_KEYS


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_clip_from_ldm_names_gives_the_same_outputs():
    config = TextEncoderConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                               intermediate_size=96, eos_token_id=49407, pad_token_id=49407)
    model = _randomize(CLIPTextEncoder(config))
    checkpoint = hf_to_ldm_text_encoder_state_dict(model.state_dict())
    assert all(k.startswith(LDM_TEXT_PREFIX + "text_model.") for k in checkpoint)
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in checkpoint.items()}
    legacy[LDM_TEXT_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
    for ckpt in (checkpoint, legacy):
        state = extract_ldm_text_encoder({**ckpt, "model.diffusion_model.out.2.bias": torch.zeros(4)})
        loaded = text_encoder_from_state_dict(state)
        assert loaded.config.num_hidden_layers == 2 and loaded.config.intermediate_size == 96
        ids = torch.randint(0, 299, (2, 77))
        ids[:, 10:] = 299
        loaded.config.eos_token_id = model.config.eos_token_id = 299
        assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_clip_config_of_sd15_is_read_from_shapes_and_from_the_hf_config():
    meta = CLIPTextEncoder(TextEncoderConfig.sd15(), device="meta")
    state = extract_ldm_text_encoder(hf_to_ldm_text_encoder_state_dict(meta.state_dict()))
    assert infer_text_encoder_config(state) == TextEncoderConfig.sd15()
    hf = {"vocab_size": 49408, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
          "intermediate_size": 3072, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 2}
    assert config_from_hf(hf) == TextEncoderConfig.sd15()


def test_vae_ldm_names_round_trip_and_match_sd15():
    config = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32)
    model = _randomize(AutoencoderKL(config))
    ldm = diffusers_to_ldm_vae_state_dict(model.state_dict())
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    full = {LDM_VAE_PREFIX + k: v for k, v in ldm.items()}
    full["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    for source in (full, ldm, dict(model.state_dict())):
        loaded = vae_from_state_dict(vae_state_dict_from_any(source))
        assert loaded.config == config
        x = torch.rand(1, 3, 8, 12) * 2 - 1
        assert torch.equal(loaded.decode(loaded.encode(x)[0]), model.decode(model.encode(x)[0]))
    old = {k.replace("attentions.0.to_q", "attentions.0.query").replace("attentions.0.to_out.0", "attentions.0.proj_attn"): v
           for k, v in model.state_dict().items()}
    assert set(vae_state_dict_from_any(old)) == set(model.state_dict())

    meta = AutoencoderKL(VAEConfig.sd15(), device="meta")
    sd15 = diffusers_to_ldm_vae_state_dict(meta.state_dict())
    assert len(sd15) == 248
    assert sd15["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up.0.upsample.conv.weight" not in sd15 and "encoder.down.3.downsample.conv.weight" not in sd15
    assert infer_vae_config(ldm_to_diffusers_vae_state_dict(sd15)) == VAEConfig.sd15()


def test_vae_weights_of_another_shape_are_named():
    model = AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32))
    state = dict(model.state_dict())
    del state["decoder.conv_in.bias"]
    with pytest.raises(ValueError, match="missing 1 tensor"):
        vae_from_state_dict(state, model.config)


def _sd15_ldm_meta():
    keys = json.loads(SD15_UNET_KEYS.read_text())["tensors"]
    meta = {k: torch.empty(v, device="meta") for k, v in keys.items()}
    return diffusers_to_ldm_unet_state_dict(meta, UNetConfig.sd15())


def test_unet_config_of_sd15_is_read_from_its_ldm_shapes():
    ldm = _sd15_ldm_meta()
    config = infer_unet_config(ldm, sample_size=64)
    assert config == UNetConfig.sd15()
    check_ldm_unet(ldm, config)
    ldm["input_blocks.1.1.proj_in.weight"] = torch.empty(320, 320, 3, 3, device="meta")
    with pytest.raises(ValueError, match="mis-shaped 1 tensor"):
        check_ldm_unet(ldm, config)


def test_unet_config_of_a_miniature_is_read_from_its_shapes():
    config = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                        attention_head_dim=8, norm_num_groups=32, transformer_layers_per_block=2)
    meta = UNet2DConditionModel(config, device="meta")
    ldm = diffusers_to_ldm_unet_state_dict(meta.state_dict(), config)
    assert infer_unet_config(ldm, sample_size=8) == config
    with pytest.raises(ValueError, match="not an SD U-Net"):
        infer_unet_config({"time_embed.0.weight": torch.empty(4, 4)})


def test_ema_names_map_back_to_ldm_names():
    ldm = _sd15_ldm_meta()
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): k for k in ldm}
    assert ema_name_to_ldm("model_ema.diffusion_modelinput_blocks110in_layers0weight") == \
        "input_blocks.11.0.in_layers.0.weight"
    assert ema_name_to_ldm("model_ema.decay") is None and ema_name_to_ldm("model_ema.num_updates") is None
    assert ema_unet_names(list(ema) + ["model_ema.decay"]) == {v: k for k, v in ema.items()}


def test_load_safetensors_reads_only_the_named_tensors(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.float16)}, path)
    assert list(load_safetensors(path, names=["b"])) == ["b"]
    with pytest.raises(KeyError, match="no tensor 'c'"):
        load_safetensors(path, names=["a", "c"])


def test_an_ema_only_single_file_loads_its_ema_copy(tmp_path):
    from trainer.io.sd_checkpoint import load_single_file_unet

    config = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                        attention_head_dim=8, norm_num_groups=32)
    model = _randomize(UNet2DConditionModel(config))
    ldm = diffusers_to_ldm_unet_state_dict(model.state_dict(), config)
    ema = {"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ldm.items()}
    ema["model_ema.decay"] = torch.tensor(0.999)
    save_safetensors(ema, tmp_path / "ema.safetensors")
    loaded = load_single_file_unet(tmp_path / "ema.safetensors", config)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

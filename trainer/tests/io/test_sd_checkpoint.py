import json

import pytest
import torch

from trainer.io.safetensors import load_safetensors, save_safetensors
from trainer.io.sd_checkpoint import (LDM_UNET_PREFIX, UNetWeightsError, diffusers_to_ldm_unet_state_dict,
                                      extract_ldm_unet, ldm_to_diffusers_unet_state_dict, load_diffusers_unet,
                                      load_single_file_unet, load_unet_weights, save_diffusers_unet)
from trainer.models.unet import UNet2DConditionModel, UNetConfig


def random_unet(config=None):
    model = UNet2DConditionModel(config or UNetConfig.tiny()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def outputs(model):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        return model(sample, torch.tensor([10, 900]), context)


def test_model_weights_round_trip_in_half_precision(tmp_path):
    model = random_unet()
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"w-{dtype}.safetensors"
        save_safetensors({k: v.to(dtype) for k, v in model.state_dict().items()}, path)
        restored = load_unet_weights(UNet2DConditionModel(UNetConfig.tiny()), load_safetensors(path))
        for k, v in restored.state_dict().items():
            assert v.dtype == torch.float32
            assert torch.equal(v, model.state_dict()[k].to(dtype).float()), k


def test_diffusers_folder_round_trip(tmp_path):
    model = random_unet()
    save_diffusers_unet(model, tmp_path / "pipe" / "unet")
    config = json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel" and config["block_out_channels"] == [32, 64, 64]
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "unet"):
        loaded = load_diffusers_unet(folder)
        assert loaded.config == model.config
        assert not any(p.is_meta for p in loaded.parameters())
        assert torch.equal(outputs(loaded), outputs(model))


def test_diffusers_folder_with_bin_weights(tmp_path):
    model = random_unet()
    unet_dir = tmp_path / "unet"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    torch.save(model.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    assert torch.equal(outputs(load_diffusers_unet(tmp_path)), outputs(model))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_unet(tmp_path / "nowhere")


def test_ldm_key_map_facts_on_sd15():
    model = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    diffusers_sd = model.state_dict()
    ldm = diffusers_to_ldm_unet_state_dict(diffusers_sd, UNetConfig.sd15())
    assert len(ldm) == 686
    # Names as they appear in the original SD1.x checkpoints.
    for key, shape in {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
        "input_blocks.11.0.out_layers.0.weight": (1280,),
        "middle_block.0.in_layers.0.weight": (1280,),
        "middle_block.1.transformer_blocks.0.attn1.to_out.0.weight": (1280, 1280),
        "middle_block.2.emb_layers.1.bias": (1280,),
        "output_blocks.0.0.in_layers.0.weight": (2560,),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.3.1.norm.weight": (1280,),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }.items():
        assert tuple(ldm[key].shape) == shape, key
    assert not any(k.startswith(("input_blocks.12", "output_blocks.12", "output_blocks.2.2")) for k in ldm)
    back = ldm_to_diffusers_unet_state_dict(ldm, UNetConfig.sd15())
    assert list(back) == list(diffusers_sd)


def test_single_file_checkpoint_gives_identical_outputs(tmp_path):
    model = random_unet()
    ldm = diffusers_to_ldm_unet_state_dict(model.state_dict(), model.config)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in ldm
    full = {LDM_UNET_PREFIX + k: v for k, v in ldm.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(3)  # VAE tensors are ignored
    full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(3)

    st_path = tmp_path / "model.safetensors"
    save_safetensors({k: v.half() for k, v in full.items()}, st_path)
    from_st = load_single_file_unet(st_path, UNetConfig.tiny())
    half_model = load_unet_weights(UNet2DConditionModel(UNetConfig.tiny()),
                                   {k: v.half() for k, v in model.state_dict().items()})
    assert torch.equal(outputs(from_st), outputs(half_model))

    ckpt_path = tmp_path / "model.ckpt"
    torch.save({"state_dict": full, "global_step": 470000}, ckpt_path)
    from_ckpt = load_single_file_unet(ckpt_path, UNetConfig.tiny())
    assert torch.equal(outputs(from_ckpt), outputs(model))


def test_single_file_ema_weights(tmp_path):
    model, ema_model = random_unet(), random_unet()
    full = {LDM_UNET_PREFIX + k: v for k, v in diffusers_to_ldm_unet_state_dict(model.state_dict(), model.config).items()}
    for k, v in diffusers_to_ldm_unet_state_dict(ema_model.state_dict(), model.config).items():
        full["model_ema." + "".join(("diffusion_model." + k).split("."))] = v
    assert "model_ema.diffusion_modelinput_blocks00weight" in full
    path = tmp_path / "ema.safetensors"
    save_safetensors(full, path)
    assert torch.equal(outputs(load_single_file_unet(path, UNetConfig.tiny(), use_ema=True)), outputs(ema_model))
    assert torch.equal(outputs(load_single_file_unet(path, UNetConfig.tiny())), outputs(model))
    with pytest.raises(ValueError, match="U-Net tensors"):
        extract_ldm_unet({"first_stage_model.x": torch.zeros(1)})


def test_weight_errors_name_missing_unexpected_and_shapes():
    model = UNet2DConditionModel(UNetConfig.tiny())
    sd = dict(random_unet().state_dict())
    sd.pop("conv_in.bias")
    sd["conv_in.extra"] = torch.zeros(1)
    sd["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(UNetWeightsError) as err:
        load_unet_weights(model, sd)
    message = str(err.value)
    assert "missing 1 tensor(s): conv_in.bias" in message
    assert "unexpected 1 tensor(s): conv_in.extra" in message
    assert "down_blocks.0.resnets.0.conv1.weight: checkpoint [32, 32, 1, 1] vs model [32, 32, 3, 3]" in message

    ldm_keys = diffusers_to_ldm_unet_state_dict(random_unet().state_dict(), UNetConfig.tiny())
    with pytest.raises(UNetWeightsError, match="load_single_file_unet"):
        load_unet_weights(model, ldm_keys)
    # A wrong config shows up as shape mismatches.
    sd15_like = UNet2DConditionModel(UNetConfig.tiny(cross_attention_dim=16))
    with pytest.raises(UNetWeightsError, match="attn2.to_k.weight: checkpoint \\[32, 16\\] vs model \\[32, 32\\]"):
        load_unet_weights(model, sd15_like.state_dict())


def test_load_into_meta_model_assigns_without_copy():
    source = random_unet()
    meta = UNet2DConditionModel(UNetConfig.tiny(), device="meta")
    sd = source.state_dict()
    load_unet_weights(meta, sd)
    assert not any(p.is_meta for p in meta.parameters())
    assert all(isinstance(p, torch.nn.Parameter) for p in meta.parameters())
    assert meta.conv_in.weight.data_ptr() == sd["conv_in.weight"].data_ptr()
    assert torch.equal(outputs(meta), outputs(source))

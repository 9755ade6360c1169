import pytest
import torch

from trainer.io.model_folders import (CheckpointError, load_aggregators, load_text_encoder, load_unet, load_vae,
                                      save_aggregators, save_text_encoder, save_unet, save_vae)
from trainer.models.afa import AFAEnsemble
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.tests.small_models import small_ensemble, small_text_encoder, small_tokenizer, small_unet, tensors_equal


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def test_model_folders_round_trip(tokenizer, tmp_path):
    unet, text_encoder = small_unet(), small_text_encoder(tokenizer)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    ensemble = small_ensemble(2)
    torch.nn.init.normal_(ensemble.aggregators[0].to_logits.weight)
    save_unet(unet, tmp_path / "unet")
    save_text_encoder(text_encoder, tmp_path / "text_encoder")
    save_vae(vae, tmp_path / "vae")
    save_aggregators(ensemble, tmp_path / "afa", {"expert_ids": ["x", "y"]})

    assert tensors_equal(load_unet(tmp_path).state_dict(), unet.state_dict())
    assert tensors_equal(load_text_encoder(tmp_path).state_dict(), text_encoder.state_dict())
    assert load_text_encoder(tmp_path).config == text_encoder.config
    assert tensors_equal(load_vae(tmp_path).state_dict(), vae.state_dict())
    other = small_ensemble(2)
    load_aggregators(other, tmp_path)
    assert tensors_equal(other.aggregators.state_dict(), ensemble.aggregators.state_dict())
    bigger = AFAEnsemble([small_unet(), small_unet()], hidden=32, depth=1, heads=2, head_dim=8)
    with pytest.raises(CheckpointError, match="hidden 16 .file. vs 32"):
        load_aggregators(bigger, tmp_path)

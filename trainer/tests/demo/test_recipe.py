import pytest

from trainer.demo import recipe as demo_recipe
from trainer.demo import shapes


def test_cuda_recipe_fits_ten_minutes_and_package_choices():
    r = demo_recipe.recipe("cuda")
    training = r["classifier"]["minutes"] + r["vae"]["minutes"] + r["base"]["minutes"] \
        + 3 * r["expert"]["minutes"] + r["afa"]["minutes"]
    assert training <= 8.5  # the rest of the 10 minutes: data, latents, evaluations, export
    assert r["scheduler"]["rescale_betas_zero_snr"] and r["scheduler"]["timestep_spacing"] == "trailing"
    assert r["scheduler"]["prediction_type"] == "v_prediction" and r["scheduler"]["clip_sample"] is False
    assert r["text_encoder"]["mask_padding"] is True
    assert demo_recipe.recipe("cpu", time_scale=0.5)["base"]["minutes"] == demo_recipe.recipe("cpu")["base"]["minutes"] / 2
    with pytest.raises(ValueError):
        demo_recipe.recipe("tpu")


def test_smoke_recipe_is_small_and_keeps_the_full_structure():
    full, smoke = demo_recipe.recipe("cpu"), demo_recipe.recipe("cpu", smoke=True)
    assert smoke["unet"]["down_block_types"] == full["unet"]["down_block_types"]
    assert smoke["unet"]["block_out_channels"] != full["unet"]["block_out_channels"]
    assert smoke["world"]["n_all"] < 1000 and smoke["base"]["steps"] <= 5


@pytest.mark.parametrize("device,smoke,side", [("cpu", False, 16), ("cuda", False, 32), ("cpu", True, 32)])
def test_unet_sample_size_is_the_vae_latent_side(device, smoke, side):
    r = demo_recipe.recipe(device, smoke)
    levels = len(r["vae"]["config"]["block_out_channels"])
    assert r["unet"]["sample_size"] == side == shapes.IMAGE_SIZE // 2 ** (levels - 1)

import json

import numpy as np
import pytest
import torch

from trainer.io.png import write_png
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.training.data import ImageFolder, LatentFile, StepBatches, encode_latents


def test_image_folder_and_latent_file(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    red = np.zeros((8, 8, 3), np.uint8)
    red[:, :, 0] = 255
    write_png(str(folder / "a.png"), red)
    (folder / "a.txt").write_text("a red square\n")
    np.save(folder / "b.npy", np.zeros((3, 8, 8), np.float32))
    (folder / "captions.json").write_text(json.dumps({"b.npy": ["grey", "a grey square"]}))
    data = ImageFolder(str(folder))
    assert len(data) == 2
    image, caption = data[0]
    assert caption == "a red square" and image.shape == (3, 8, 8)
    assert torch.equal(image[0], torch.ones(8, 8)) and torch.equal(image[1], -torch.ones(8, 8))
    assert data[1][1] == ["grey", "a grey square"]

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    encode_latents(vae, data, str(tmp_path / "latents.safetensors"), batch_size=1)
    latents = LatentFile(str(tmp_path / "latents.safetensors"))
    with torch.no_grad():
        mean, _ = vae.encode(data[0][0][None])
    assert len(latents) == 2 and latents[1][1] == ["grey", "a grey square"]
    assert torch.allclose(latents[0][0], mean[0] * vae.config.scaling_factor, atol=1e-6)

    (folder / "c.png").write_bytes((folder / "a.png").read_bytes())
    with pytest.raises(ValueError, match="no caption for 1 image"):
        ImageFolder(str(folder))


def test_step_batches_are_a_function_of_seed_and_step():
    data = [(torch.tensor([float(i)]), str(i)) for i in range(5)]
    batches = StepBatches(data, batch_size=2, seed=4)
    order = [i for step in range(5) for i in batches.indices(step)]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))
    assert order != list(range(5)) * 2
    fresh = StepBatches(data, batch_size=2, seed=4)
    assert fresh.indices(3) == batches.indices(3)
    assert StepBatches(data, batch_size=2, seed=5).indices(0) != batches.indices(0) or \
        StepBatches(data, batch_size=2, seed=5).indices(1) != batches.indices(1)
    x, captions = batches(1)
    assert x.shape == (2, 1) and captions == [str(int(v)) for v in x[:, 0]]

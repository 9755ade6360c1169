import copy

import torch

from trainer.demo import recipe as demo_recipe
from trainer.demo.routing_signal import point_weights, routing_signal
from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.text.bpe import CLIPTokenizer, train_bpe
from trainer.training.data import TensorExamples

CAPTIONS = ["a red circle", "a blue square on the left", "a green star, black background", "a small ring"]


def _setup(tmp_path, unets):
    train_bpe(CAPTIONS, vocab_size=560, out_dir=str(tmp_path))
    tok = CLIPTokenizer.from_dir(str(tmp_path))
    text_encoder = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id,
                                                          pad_token_id=tok.eos_token_id))
    ensemble = AFAEnsemble(unets, hidden=16, depth=1, heads=2, head_dim=8)
    g = torch.Generator().manual_seed(1)
    data = {f: TensorExamples(torch.randn(6, 4, 16, 16, generator=g), [CAPTIONS[k % 4] for k in range(6)])
            for f in ("a", "b")}
    return ensemble, text_encoder, tok, data


@torch.no_grad()
def test_identical_experts_give_no_routing_signal(tmp_path):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(UNetConfig.tiny())
    ensemble, text_encoder, tok, data = _setup(tmp_path, [copy.deepcopy(unet), copy.deepcopy(unet)])
    signal = routing_signal(ensemble, text_encoder, tok, data, ["a", "b"], demo_recipe.SCHEDULER_CONFIG, n=5,
                            batch_size=2)
    assert set(signal) == {"a", "b"}
    for s in signal.values():
        assert s["own"] > 0
        assert abs(s["uniform"] - s["own"]) < 1e-5 * s["own"] and abs(s["output_average"] - s["own"]) < 1e-5 * s["own"]
        assert abs(s["gain"]) < 1e-3


def _good_and_noisy_copy():
    """A U-Net and a copy of it with noise added to every weight: the first denoises everything better."""
    torch.manual_seed(3)
    good = UNet2DConditionModel(UNetConfig.tiny())
    bad = copy.deepcopy(good)
    for p in bad.parameters():
        p.add_(torch.randn_like(p) * 0.5)
    return [good, bad]


@torch.no_grad()
def test_a_useless_expert_makes_the_other_worth_routing_to(tmp_path):
    ensemble, text_encoder, tok, data = _setup(tmp_path, _good_and_noisy_copy())
    signal = routing_signal(ensemble, text_encoder, tok, data, ["a", "b"], demo_recipe.SCHEDULER_CONFIG, n=6)
    # family "a" is the good expert's: its own loss beats the blend with the noisy copy; "b" is the reverse
    assert signal["a"]["gain"] > 0 and signal["b"]["gain"] < 0
    assert signal["a"]["own"] < signal["b"]["own"]


@torch.no_grad()
def test_point_weights_are_uniform_for_fresh_aggregators_and_sum_to_one(tmp_path):
    torch.manual_seed(3)
    ensemble, text_encoder, tok, data = _setup(tmp_path, [UNet2DConditionModel(UNetConfig.tiny()) for _ in range(2)])
    table = point_weights(ensemble, text_encoder, tok, data, demo_recipe.SCHEDULER_CONFIG, n=4)
    assert set(table) == {"a", "b"} and len(table["a"]) == len(ensemble.points)
    assert all(abs(v - 0.5) < 1e-3 for rows in table.values() for row in rows for v in row)
    with torch.no_grad():
        ensemble.aggregators[0].to_logits.bias.copy_(torch.tensor([2.0, 0.0]))
    first = point_weights(ensemble, text_encoder, tok, data, demo_recipe.SCHEDULER_CONFIG, n=4)["a"][0]
    assert first[0] > 0.8 and abs(sum(first) - 1) < 1e-2


@torch.no_grad()
def test_half_routing_finds_the_expert_that_denoises_each_half_best(tmp_path):
    from trainer.demo.routing_signal import half_routing

    ensemble, text_encoder, tok, _ = _setup(tmp_path, _good_and_noisy_copy())
    latents = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    half_family = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 0]])  # the last scene is skipped
    table = half_routing(ensemble, text_encoder, tok, latents, CAPTIONS + CAPTIONS[:1], half_family,
                         demo_recipe.SCHEDULER_CONFIG, window=0.5, temperature=0.2)
    assert table[0]["halves"] == table[1]["halves"] == 4
    assert len(table[0]["error"]) == 3  # each expert alone, then the ensemble
    assert table[0]["own_best"] == 1.0 and table[1]["own_best"] == 0.0
    assert table[0]["target"] > 0.5 > table[1]["target"]
    assert abs(table[0]["weight"] - 0.5) < 1e-6  # fresh aggregators are uniform

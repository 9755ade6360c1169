import pytest
import torch
from torch import nn

from trainer.tests.small_models import CLIP_BOS, CLIP_EOS, clip_ids, tiny_clip_text_encoder
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig, padding_mask_from_ids, quick_gelu



def _reference_forward(model: CLIPTextEncoder, input_ids: torch.Tensor):
    """The same network computed through torch.nn.MultiheadAttention, as an independent check."""
    cfg = model.config
    tm = model.text_model
    n = input_ids.shape[1]
    h = tm.embeddings.token_embedding.weight[input_ids] + tm.embeddings.position_embedding.weight[:n]
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    act = quick_gelu if cfg.hidden_act == "quick_gelu" else nn.functional.gelu
    for layer in tm.encoder.layers:
        mha = nn.MultiheadAttention(cfg.hidden_size, cfg.num_attention_heads, batch_first=True)
        a = layer.self_attn
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            mha.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            mha.out_proj.weight.copy_(a.out_proj.weight)
            mha.out_proj.bias.copy_(a.out_proj.bias)
        x = layer.layer_norm1(h)
        h = h + mha(x, x, x, attn_mask=causal, need_weights=False)[0]
        h = h + layer.mlp.fc2(act(layer.mlp.fc1(layer.layer_norm2(h))))
    h = tm.final_layer_norm(h)
    eos_pos = [row.tolist().index(CLIP_EOS) for row in input_ids]
    return h, h[torch.arange(len(eos_pos)), eos_pos]


def test_hf_clip_key_layout_and_sd15_size_on_meta():
    model = CLIPTextEncoder(TextEncoderConfig.sd15(), device="meta")
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480  # openai/clip-vit-large-patch14 text tower
    assert len(sd) == 196
    expected = {
        "text_model.embeddings.token_embedding.weight": (49408, 768),
        "text_model.embeddings.position_embedding.weight": (77, 768),
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
        "text_model.encoder.layers.11.self_attn.out_proj.bias": (768,),
        "text_model.encoder.layers.5.layer_norm1.weight": (768,),
        "text_model.encoder.layers.5.layer_norm2.bias": (768,),
        "text_model.encoder.layers.3.mlp.fc1.weight": (3072, 768),
        "text_model.encoder.layers.3.mlp.fc2.weight": (768, 3072),
        "text_model.final_layer_norm.weight": (768,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_independent_reference(act):
    model = tiny_clip_text_encoder(hidden_act=act)
    ids = clip_ids([320, 1125, 539, 320, 2368], [736, 7117])
    with torch.no_grad():
        last, pooled = model(ids)
        ref_last, ref_pooled = _reference_forward(model, ids)
    assert last.shape == (2, 77, 32) and pooled.shape == (2, 32)
    torch.testing.assert_close(last, ref_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=1e-5)
    # Pooled is the state at the *first* EOS (padding also uses the EOS id).
    torch.testing.assert_close(pooled[0], last[0, 6])
    torch.testing.assert_close(pooled[1], last[1, 3])


def test_causal_later_tokens_do_not_change_earlier_positions():
    model = tiny_clip_text_encoder()
    a = clip_ids([320, 1125, 539, 320, 2368])
    b = a.clone()
    b[0, 4] = 999
    with torch.no_grad():
        la, _ = model(a)
        lb, _ = model(b)
    torch.testing.assert_close(la[0, :4], lb[0, :4])
    assert (la[0, 4] - lb[0, 4]).abs().max() > 1e-3


def test_attention_mask_hides_padding_keys():
    model = tiny_clip_text_encoder()
    ids = clip_ids([320, 1125])
    mask = padding_mask_from_ids(ids, CLIP_EOS)
    assert mask[0, :4].tolist() == [1, 1, 1, 1] and mask[0, 4:].sum() == 0
    altered = ids.clone()
    altered[0, 10] = 555  # a padding slot
    with torch.no_grad():
        plain, pooled_plain = model(ids)
        masked, pooled_masked = model(ids, attention_mask=mask)
        masked_altered, _ = model(altered, attention_mask=mask)
        plain_altered, _ = model(altered)
    # Real tokens only see earlier real tokens either way; pooled output is unchanged.
    torch.testing.assert_close(masked[0, :4], plain[0, :4])
    torch.testing.assert_close(pooled_masked, pooled_plain)
    # Padding positions no longer attend to other padding slots.
    torch.testing.assert_close(masked_altered[0, 11:], masked[0, 11:])
    assert (plain_altered[0, 11:] - plain[0, 11:]).abs().max() > 1e-4
    assert (masked[0, 20] - plain[0, 20]).abs().max() > 1e-4


def test_mask_padding_config_derives_mask_from_ids():
    plain = tiny_clip_text_encoder()
    auto = tiny_clip_text_encoder(mask_padding=True)
    auto.load_state_dict(plain.state_dict())
    ids = clip_ids([320, 1125, 539])
    with torch.no_grad():
        expected, _ = plain(ids, attention_mask=padding_mask_from_ids(ids, CLIP_EOS))
        got, _ = auto(ids)
    torch.testing.assert_close(got, expected)


def test_loads_hf_state_dict_with_legacy_position_ids():
    src = tiny_clip_text_encoder()
    sd = dict(src.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    dst = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=49408))
    dst.load_hf_state_dict(sd)
    ids = clip_ids([320])
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(ids)[0], src(ids)[0])


def test_rejects_unknown_activation():
    with pytest.raises(ValueError):
        CLIPTextEncoder(TextEncoderConfig.tiny(hidden_act="relu"))



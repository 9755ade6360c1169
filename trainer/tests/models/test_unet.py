import io
import json
import math
from typing import List

import pytest
import torch

from trainer.models.unet import PointSpec, UNet2DConditionModel, UNetConfig, count_parameters
from trainer.models.unet_blocks import Attention, timestep_embedding
from trainer.tests.golden import SD15_UNET_KEYS

KEYS_JSON = SD15_UNET_KEYS

# unet/config.json of runwayml/stable-diffusion-v1-5 as diffusers writes it.
SD15_DIFFUSERS_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def tiny_model(**overrides) -> UNet2DConditionModel:
    cfg = UNetConfig.tiny()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    model = UNet2DConditionModel(cfg).eval()
    # Zero-initialised layers would hide wiring mistakes: give every parameter a non-trivial value.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def inputs(batch=2, size=(16, 16), context_dim=32, tokens=7):
    sample = torch.randn(batch, 4, *size)
    context = torch.randn(batch, tokens, context_dim)
    return sample, context


def run_layerwise(model, sample, timestep, context) -> torch.Tensor:
    temb = model.embed_time(timestep, sample.shape[0], sample.dtype)
    skips: List[torch.Tensor] = []
    h = sample
    for i, p in enumerate(model.points):
        h = model.run_point(i, h, temb, context, skips)
        if p.pushes_skip:
            skips.append(h)
    assert skips == []
    return h


def run_ensemble(models, weights, sample, timestep, context) -> torch.Tensor:
    """How an AFA ensemble drives the points: one shared skip stack of aggregated features."""
    tembs = [m.embed_time(timestep, sample.shape[0], sample.dtype) for m in models]
    skips: List[torch.Tensor] = []
    h = sample
    for i, p in enumerate(models[0].points):
        outs = [m.run_point(i, h, t, context, list(skips)) for m, t in zip(models, tembs)]
        if p.pops_skip:
            skips.pop()
        h = sum(w * o for w, o in zip(weights, outs))
        if p.pushes_skip:
            skips.append(h)
    assert skips == []
    return h


def test_sd15_on_meta_has_sd15_size_without_allocating():
    model = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    assert len(model.state_dict()) == 686
    assert count_parameters(model) == 859_520_964
    assert all(p.is_meta for p in model.parameters())


def test_sd15_on_meta_matches_diffusers_keys_and_shapes():
    with open(KEYS_JSON) as f:
        reference = json.load(f)
    model = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference["tensors"]
    assert reference["count"] == 686 and reference["parameters"] == 859_520_964


def test_sd15_points():
    model = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    points = model.points
    assert len(points) == 25
    kinds = [p.kind for p in points]
    assert kinds == (["conv_in"] + ["down", "down", "downsample"] * 3 + ["down", "down"] + ["mid"]
                     + ["up"] * 11 + ["out"])
    assert [p.name for p in points[:4]] == ["conv_in", "down.0.0", "down.0.1", "down.0.downsample"]
    assert points[12].name == "mid" and points[13].name == "up.0.0" and points[23].name == "up.3.1"
    assert sum(p.pushes_skip for p in points) == sum(p.pops_skip for p in points) == 12
    assert all(p.pushes_skip == (p.kind in ("conv_in", "down", "downsample")) for p in points)
    assert all(p.pops_skip == (p.kind in ("up", "out")) for p in points)
    assert points[-1] == PointSpec("out", "out", 4, 1, False, True)
    assert [p.channels for p in points if p.kind == "up"] == [1280] * 6 + [640] * 3 + [320] * 2
    assert [p.downscale for p in points if p.kind == "up"] == [8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]


def test_sd15_point_shapes_on_meta():
    model = UNet2DConditionModel(UNetConfig.sd15(), device="meta")
    sample = torch.empty(2, 4, 64, 48, device="meta")
    context = torch.empty(2, 77, 768, device="meta")
    temb = model.embed_time(torch.tensor(981), 2, torch.float32)
    assert temb.shape == (2, 1280)
    skips, h = [], sample
    for i, p in enumerate(model.points):
        h = model.run_point(i, h, temb, context, skips)
        assert tuple(h.shape) == (2, p.channels, 64 // p.downscale, 48 // p.downscale), p.name
        if p.pushes_skip:
            skips.append(h)
    assert skips == []


def test_layerwise_loop_equals_forward():
    model = tiny_model()
    sample, context = inputs()
    t = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        expected = model(sample, t, context)
        got = run_layerwise(model, sample, t, context)
    assert expected.shape == sample.shape
    assert torch.equal(expected, got)


def test_shared_skip_stack_ensemble():
    a, b = tiny_model(), tiny_model()
    sample, context = inputs()
    t = torch.tensor([3, 700])
    with torch.no_grad():
        ref_a, ref_b = a(sample, t, context), b(sample, t, context)
        assert not torch.allclose(ref_a, ref_b)
        # All weight on one model reproduces that model; two copies of one model average to itself.
        assert torch.allclose(run_ensemble([a, b], [1.0, 0.0], sample, t, context), ref_a, atol=1e-6)
        assert torch.allclose(run_ensemble([a, b], [0.0, 1.0], sample, t, context), ref_b, atol=1e-6)
        assert torch.allclose(run_ensemble([a, a], [0.5, 0.5], sample, t, context), ref_a, atol=1e-5)
        mixed = run_ensemble([a, b], [0.5, 0.5], sample, t, context)
    assert not torch.allclose(mixed, 0.5 * (ref_a + ref_b), atol=1e-3)  # features, not outputs, are mixed


def test_odd_spatial_sizes():
    model = tiny_model()
    sample, context = inputs(batch=1, size=(15, 9))
    with torch.no_grad():
        out = model(sample, 50, context)
        assert out.shape == sample.shape
        assert torch.equal(out, run_layerwise(model, sample, 50, context))


def test_up_point_without_skips_is_a_clear_error():
    model = tiny_model()
    up = next(i for i, p in enumerate(model.points) if p.kind == "up")
    with pytest.raises(ValueError, match="skip"):
        model.run_point(up, torch.zeros(1, 64, 4, 4), torch.zeros(1, 128), torch.zeros(1, 7, 32), [])


def test_timestep_forms_agree():
    model = tiny_model()
    sample, context = inputs(batch=3)
    with torch.no_grad():
        ref = model(sample, torch.tensor([250.0, 250.0, 250.0]), context)
        for t in (250, 250.0, torch.tensor(250), torch.tensor([250]), torch.tensor([250.0]),
                  torch.tensor([250, 250, 250], dtype=torch.int64)):
            assert torch.equal(model(sample, t, context), ref)
        per_item = model(sample, torch.tensor([1, 500, 999]), context)
        first = model(sample[:1], torch.tensor([1]), context[:1])
    assert torch.allclose(per_item[:1], first, atol=1e-5)
    assert not torch.allclose(per_item[1:2], model(sample[1:2], 1, context[1:2]), atol=1e-4)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 100.0]), 4, flip_sin_to_cos=True, freq_shift=0)
    t = torch.tensor([0.0, 1.0, 100.0])[:, None]
    freqs = torch.tensor([1.0, math.exp(-math.log(10000.0) / 2)])  # exp(-ln(1e4) * k / half)
    expected = torch.cat([torch.cos(t * freqs), torch.sin(t * freqs)], dim=1)
    assert torch.allclose(emb, expected, atol=1e-6)
    unflipped = timestep_embedding(torch.tensor([1.0]), 4, flip_sin_to_cos=False, freq_shift=1)
    freqs1 = torch.tensor([1.0, math.exp(-math.log(10000.0) / 1)])
    assert torch.allclose(unflipped, torch.cat([torch.sin(freqs1), torch.cos(freqs1)])[None], atol=1e-6)


def test_attention_matches_per_head_reference():
    attn = Attention(query_dim=12, heads=3, head_dim=4, context_dim=5)
    x, ctx = torch.randn(2, 6, 12), torch.randn(2, 9, 5)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    heads = []
    for hd in range(3):
        s = slice(4 * hd, 4 * hd + 4)
        w = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        heads.append(w @ v[..., s])
    expected = attn.to_out[0](torch.cat(heads, dim=-1))
    assert torch.allclose(attn(x, ctx), expected, atol=1e-6)


def test_encoder_attention_mask_equals_dropping_tokens():
    model = tiny_model()
    sample, context = inputs(batch=2, tokens=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    junk = context.clone()
    junk[:, 3:] = torch.randn(2, 3, 32) * 10
    with torch.no_grad():
        masked = model(sample, 10, junk, encoder_attention_mask=mask)
        truncated = model(sample, 10, context[:, :3])
        unmasked = model(sample, 10, junk)
    assert torch.allclose(masked, truncated, atol=1e-5)
    assert not torch.allclose(unmasked, truncated, atol=1e-3)


def test_config_from_diffusers_json_and_back():
    cfg = UNetConfig.from_dict(SD15_DIFFUSERS_CONFIG)
    assert cfg == UNetConfig.sd15()
    d = cfg.to_dict()
    assert d["_class_name"] == "UNet2DConditionModel"
    assert d["block_out_channels"] == [320, 640, 1280, 1280]
    json.dumps(d)
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == cfg
    for key, value in SD15_DIFFUSERS_CONFIG.items():
        if not key.startswith("_"):
            assert d[key] == value, key
    tiny = UNetConfig.tiny()
    assert UNetConfig.from_dict(tiny.to_dict()) == tiny


def test_config_rejects_unsupported_features():
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNetConfig.from_dict({**SD15_DIFFUSERS_CONFIG, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNetConfig.from_dict({**SD15_DIFFUSERS_CONFIG, "resnet_time_scale_shift": "scale_shift"})
    # Newer diffusers write these keys with inert values: accepted.
    UNetConfig.from_dict({**SD15_DIFFUSERS_CONFIG, "dropout": 0.0, "only_cross_attention": [False] * 4,
                          "addition_embed_type": None, "addition_embed_type_num_heads": 64,
                          "resnet_out_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn"})
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(block_out_channels=(30, 64, 64, 64))


def test_sd2_style_options_run():
    cfg = UNetConfig(block_out_channels=(32, 64), layers_per_block=(1, 2),
                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
                     cross_attention_dim=16, norm_num_groups=8, transformer_layers_per_block=2,
                     downsample_padding=0, mid_block_scale_factor=1.5)
    model = UNet2DConditionModel(cfg).eval()
    assert model.down_blocks[0].attentions[0].proj_in.weight.shape == (32, 32)
    assert len(model.down_blocks[0].attentions[0].transformer_blocks) == 2
    assert model.up_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 2
    assert len(model.up_blocks[0].resnets) == 3 and len(model.up_blocks[1].resnets) == 2
    sample, context = inputs(batch=2, size=(8, 8), context_dim=16)
    with torch.no_grad():
        out = model(sample, 5, context)
        assert torch.equal(out, run_layerwise(model, sample, 5, context))
    assert out.shape == sample.shape


def test_class_embedding_projection():
    model = tiny_model(class_embed_type="projection", projection_class_embeddings_input_dim=32)
    assert model.state_dict()["class_embedding.linear_1.weight"].shape == (128, 32)
    sample, context = inputs()
    pooled = torch.randn(2, 32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="class_labels"):
            model(sample, 5, context)
        a = model(sample, 5, context, class_labels=pooled)
        b = model(sample, 5, context, class_labels=pooled * 2)
    assert not torch.allclose(a, b)


def test_dtype_and_device_reach_every_layer():
    model = UNet2DConditionModel(UNetConfig.tiny(), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    sample, context = inputs()
    with torch.no_grad():
        out = model(sample.double(), 5, context.double())
    assert out.dtype == torch.float64


@pytest.mark.filterwarnings("ignore")  # tracer/shape-inference notes from torch.onnx
def test_exports_to_onnx_opset17():
    onnx = pytest.importorskip("onnx")
    model = tiny_model()
    sample, context = inputs(batch=2)
    kwargs = {}
    if "dynamo" in torch.onnx.export.__code__.co_varnames:
        kwargs["dynamo"] = False
    buf = io.BytesIO()
    torch.onnx.export(model, (sample, torch.tensor([1.0, 2.0]), context), buf, opset_version=17,
                      input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                      dynamic_axes={"sample": {0: "b", 2: "h", 3: "w"}, "timestep": {0: "b"},
                                    "encoder_hidden_states": {0: "b", 1: "n"}}, **kwargs)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMul" in ops and "Softmax" in ops and "Resize" in ops

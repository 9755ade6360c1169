"""The training-free variance fusion (trainer/models/fusion.py)."""
import copy

import pytest
import torch

from trainer.models.afa import AFAEnsemble, contribution_map
from trainer.models.fusion import FusionEnsemble, VarianceFusion, fusion_weights, relative_variance
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.tests.small_models import ensemble_inputs

TEXT_DIM = 32


def make_unets(n, seed=100):
    unets = []
    for k in range(n):
        torch.manual_seed(seed + k)
        unets.append(UNet2DConditionModel(UNetConfig.tiny(cross_attention_dim=TEXT_DIM)).eval())
    return unets


def inputs(batch=2, n=3, size=8, seed=0):
    return ensemble_inputs(batch, n, size, seed, text_dim=TEXT_DIM)


def random_features(batch=2, n=3, channels=8, size=6, seed=1):
    return torch.randn(batch, n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_weights_sum_to_one_per_pixel():
    w = fusion_weights(random_features(), temperature=0.5)
    assert w.shape == (2, 3, 6, 6)
    assert torch.allclose(w.sum(1), torch.ones(2, 6, 6), atol=1e-6)
    assert (w >= 0).all() and w.max() - w.min() > 0.1  # not uniform on random features


def test_an_expert_with_constant_features_gets_no_weight():
    f = random_features()
    f[:, 1] = 0.7  # the same value in every channel at every pixel: variance 0
    w = fusion_weights(f, temperature=1.0)
    assert w[:, 1].max() < 1e-4
    assert torch.allclose(w[:, 0] + w[:, 2], torch.ones(2, 6, 6), atol=1e-4)


def test_equal_experts_get_equal_weights():
    one = random_features(n=1)
    w = fusion_weights(one.expand(-1, 4, -1, -1, -1), temperature=0.3)
    assert torch.allclose(w, torch.full_like(w, 0.25), atol=1e-6)


def test_the_weights_follow_the_relative_variance():
    """Where an expert varies more across channels than it does on average, it gets more weight; a global
    scale of an expert's features changes nothing (the per-expert normalisation)."""
    f = random_features(batch=1, n=2, channels=16, size=4)
    f[0, 0, :, 1, 2] *= 5.0  # expert 0 strongly expresses something at (1, 2)
    w = fusion_weights(f, temperature=1.0)
    assert w[0, 0, 1, 2] > 0.9
    r = relative_variance(f)
    assert torch.allclose(w, r / r.sum(1, keepdim=True), atol=1e-5)  # T = 1: proportional to r
    scaled = f.clone()
    scaled[:, 1] *= 100.0
    assert torch.allclose(fusion_weights(scaled, 1.0), w, atol=1e-5)


def test_temperature_to_zero_takes_the_argmax_and_to_infinity_the_average():
    f = random_features()
    r = relative_variance(f)
    hard = fusion_weights(f, temperature=1e-3)
    assert torch.equal(hard.argmax(1), r.argmax(1))
    assert torch.allclose(hard.max(1).values, torch.ones(2, 6, 6), atol=1e-3)
    soft = fusion_weights(f, temperature=1e4)
    assert torch.allclose(soft, torch.full_like(soft, 1 / 3), atol=1e-3)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        fusion_weights(f, temperature=0.0)


def test_absent_experts_get_exactly_zero_and_their_features_are_unused():
    f = random_features()
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    fused, w = VarianceFusion(1e-3)(f, None, None, mask)
    assert (w[0, 1] == 0).all() and (w[1, :2] == 0).all() and (w[1, 2] == 1).all()
    assert torch.allclose(w.sum(1), torch.ones(2, 6, 6), atol=1e-6)
    other = f.clone()
    other[:, 1] = 1e3 * torch.randn_like(other[:, 1])  # garbage in the absent expert changes nothing
    fused2, w2 = VarianceFusion(1e-3)(other, None, None, mask)
    assert torch.equal(w, w2) and torch.equal(fused, fused2)


@torch.no_grad()
def test_identical_experts_reproduce_the_single_network():
    (unet,) = make_unets(1)
    ensemble = FusionEnsemble([copy.deepcopy(unet) for _ in range(3)], temperature=0.5)
    sample, timestep, ehs = inputs()
    out, weights = ensemble(sample, timestep, ehs[0])
    assert torch.allclose(out, unet(sample, timestep, ehs[0]), atol=1e-5, rtol=1e-5)
    assert len(weights) == len(unet.points)
    for w, point in zip(weights, unet.points):
        assert w.shape == (2, 3, 8 // point.downscale, 8 // point.downscale)
        assert torch.allclose(w, torch.full_like(w, 1 / 3), atol=1e-6)
    assert ensemble.count_parameters() == 0 and ensemble.aggregator_parameters() == []


@torch.no_grad()
def test_the_mask_behaves_like_afa():
    """One present expert: weight exactly 1 and the output of that expert alone, as AFA's subsets."""
    unets = make_unets(3)
    fusion = FusionEnsemble(unets, temperature=0.5)
    sample, timestep, ehs = inputs()
    out, weights = fusion(sample, timestep, ehs, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(out, unets[1](sample, timestep, ehs[1]), atol=1e-5, rtol=1e-5)
    maps = contribution_map(weights, sample.shape[-2:])
    assert (maps[:, 1] == 1).all() and (maps[:, 0] == 0).all() and (maps[:, 2] == 0).all()
    with pytest.raises(ValueError, match="at least one expert"):
        fusion(sample, timestep, ehs, torch.zeros(3))
    # the same checks as AFA's, so the engine can treat both alike
    afa = AFAEnsemble(unets, hidden=16, depth=1, heads=2, head_dim=8)
    with pytest.raises(ValueError, match="at least one expert"):
        afa(sample, timestep, ehs, torch.zeros(3))


@torch.no_grad()
def test_different_experts_get_varying_maps_and_a_blend_of_their_predictions():
    unets = make_unets(2)
    fusion = FusionEnsemble(unets, temperature=0.5)
    sample, timestep, ehs = inputs(n=2)
    out, weights = fusion(sample, timestep, ehs)
    maps = contribution_map(weights, sample.shape[-2:])
    assert maps.shape == (2, 2, 8, 8)
    assert torch.allclose(maps.sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert maps.max() - maps.min() > 0.05
    alone = [u(sample, timestep, ehs[k]) for k, u in enumerate(unets)]
    assert not torch.allclose(out, alone[0], atol=1e-3) and not torch.allclose(out, alone[1], atol=1e-3)


@torch.no_grad()
def test_text_weighting_changes_the_weights_only_where_there_is_cross_attention():
    unets = make_unets(2)
    plain = FusionEnsemble(unets, temperature=0.5)
    text = FusionEnsemble(unets, temperature=0.5, text=True)
    sample, timestep, ehs = inputs(n=2)
    _, w_plain = plain(sample, timestep, ehs)
    out_text, w_text = text(sample, timestep, ehs)
    assert out_text.shape == (2, 4, 8, 8)
    # conv_in has no cross-attention: the same weights; a point with a transformer differs
    assert torch.allclose(w_plain[0], w_text[0])
    differs = [not torch.allclose(a, b, atol=1e-4) for a, b in zip(w_plain, w_text)]
    assert any(differs)
    for w in w_text:
        assert torch.allclose(w.sum(1), torch.ones_like(w[:, 0]), atol=1e-5)
    # hooks are gone afterwards: the experts alone are unchanged
    assert all(not m._forward_hooks and not m._forward_pre_hooks for u in unets for m in u.modules())


def test_a_fused_ensemble_needs_compatible_experts():
    with pytest.raises(ValueError, match="at least 2"):
        FusionEnsemble(make_unets(1))
    a = make_unets(1)[0]
    config = UNetConfig.tiny(cross_attention_dim=TEXT_DIM)
    config.layers_per_block = 2  # more points
    b = UNet2DConditionModel(config)
    with pytest.raises(ValueError):
        FusionEnsemble([a, b])


@pytest.mark.parametrize("text", [False, True])
def test_the_exported_graph_computes_the_fusion(tmp_path, text):
    """export_afa writes a fused ensemble with AFA's inputs and outputs; onnxruntime matches PyTorch on
    another batch and (odd) latent size, with all experts and with a subset (the parity check raises)."""
    from trainer.export import ort_check
    from trainer.export.graphs import export_afa
    from trainer.export.onnx_io import graph_signature

    config = UNetConfig.tiny(cross_attention_dim=TEXT_DIM)
    config.block_out_channels, config.norm_num_groups = (8, 16, 16), 4
    unets = []
    for k in range(2):
        torch.manual_seed(200 + k)
        unets.append(UNet2DConditionModel(config).eval())
    path = str(tmp_path / "fuse.onnx")
    report = export_afa(FusionEnsemble(unets, temperature=0.5, text=text), path, subsets=True, check="auto",
                        name="fuse", compact=True)
    inputs, outputs = graph_signature(path)
    assert list(inputs) == ["sample", "timestep", "encoder_hidden_states", "expert_mask"]
    assert outputs == {"out_sample": "float32[batch,4,height,width]", "contributions": "float32[batch,2,height,width]"}
    if ort_check.unavailable_reason() is None:
        assert report.max_abs_error is not None and max(report.max_abs_error.values()) <= 1e-4

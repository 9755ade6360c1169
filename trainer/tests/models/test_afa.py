import copy
import dataclasses

import pytest
import torch

from trainer.models.afa import (SABW, AFAEnsemble, AFAExport, contribution_map, random_expert_mask,
                                routing_divergence, routing_targets)
from trainer.models.unet import UNet2DConditionModel, UNetConfig
from trainer.tests.small_models import ensemble_inputs

TEXT_DIM = 32
SMALL = dict(hidden=32, depth=1, heads=4, head_dim=8)


def make_unets(n, seeds=None):
    unets = []
    for k in range(n):
        torch.manual_seed(100 + (k if seeds is None else seeds[k]))
        unets.append(UNet2DConditionModel(UNetConfig.tiny(cross_attention_dim=TEXT_DIM)))
    return unets


def inputs(batch=2, n=3, size=8, seed=0):
    return ensemble_inputs(batch, n, size, seed, text_dim=TEXT_DIM)


def feature_average_reference(unets, sample, timestep, ehs):
    """The network whose every point's output is the plain mean of the experts' outputs."""
    tembs = [u.embed_time(timestep, sample.shape[0], sample.dtype) for u in unets]
    skips, h = [], sample
    for i, point in enumerate(unets[0].points):
        outs = [u.run_point(i, h, tembs[k], ehs[k], list(skips)) for k, u in enumerate(unets)]
        if point.pops_skip:
            skips.pop()
        h = torch.stack(outs).mean(0)
        if point.pushes_skip:
            skips.append(h)
    return h


@torch.no_grad()
def test_identical_experts_reproduce_the_single_network():
    (unet,) = make_unets(1)
    ensemble = AFAEnsemble([copy.deepcopy(unet) for _ in range(3)], **SMALL)
    sample, timestep, ehs = inputs()
    out, weights = ensemble(sample, timestep, ehs[0])  # one text embedding shared by all
    expected = unet(sample, timestep, ehs[0])
    assert out.shape == expected.shape == (2, 4, 8, 8)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    assert len(weights) == len(unet.points)
    for w, point in zip(weights, unet.points):
        assert w.shape == (2, 3, 8 // point.downscale, 8 // point.downscale)
        assert torch.allclose(w, torch.full_like(w, 1 / 3))


@torch.no_grad()
def test_at_init_afa_is_the_per_point_feature_average():
    unets = make_unets(3)
    ensemble = AFAEnsemble(unets, **SMALL)
    sample, timestep, ehs = inputs()
    out, _ = ensemble(sample, timestep, ehs)
    reference = feature_average_reference(unets, sample, timestep, ehs)
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-4)
    # ...which is not the average of the experts' separate forwards (the test would be vacuous otherwise)
    separate = torch.stack([u(sample, timestep, ehs[k]) for k, u in enumerate(unets)]).mean(0)
    assert (out - separate).abs().max() > 1e-3
    # a shared [B,77,D] text embedding means every expert gets that one
    shared, _ = ensemble(sample, timestep, ehs[1])
    assert torch.allclose(shared, feature_average_reference(unets, sample, timestep, ehs[1].expand(3, -1, -1, -1)),
                          atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_masked_expert_has_zero_weight_and_no_influence():
    unets = make_unets(3)
    ensemble = AFAEnsemble(unets, **SMALL)
    # make the aggregators non-trivial so that the weights depend on the inputs
    torch.manual_seed(7)
    for agg in ensemble.aggregators:
        torch.nn.init.normal_(agg.to_logits.weight, std=0.5)
        torch.nn.init.normal_(agg.to_logits.bias, std=0.5)
    sample, timestep, ehs = inputs()
    mask = torch.tensor([1.0, 0.0, 1.0])
    out, weights = ensemble(sample, timestep, ehs, mask)
    for w in weights:
        assert torch.all(w[:, 1] == 0)
        assert torch.allclose(w.sum(1), torch.ones_like(w[:, 0]))
        assert w[:, 0].std() > 0  # genuinely spatial, not uniform

    for p in unets[1].parameters():
        p.add_(torch.randn_like(p))
    ehs2 = ehs.clone()
    ehs2[1] = torch.randn_like(ehs2[1]) * 10
    out2, weights2 = ensemble(sample, timestep, ehs2, mask)
    assert torch.equal(out, out2)
    assert all(torch.equal(a, b) for a, b in zip(weights, weights2))
    # and the present experts do matter
    for p in unets[2].parameters():
        p.add_(torch.randn_like(p) * 0.1)
    out3, _ = ensemble(sample, timestep, ehs2, mask)
    assert not torch.allclose(out, out3)


@torch.no_grad()
def test_masked_ensemble_at_init_averages_only_present_experts():
    unets = make_unets(3)
    ensemble = AFAEnsemble(unets, **SMALL)
    sample, timestep, ehs = inputs()
    out, weights = ensemble(sample, timestep, ehs, torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(weights[0][:, :2], torch.full_like(weights[0][:, :2], 0.5))
    reference = feature_average_reference(unets[:2], sample, timestep, ehs[:2])
    assert torch.allclose(out, reference, atol=1e-5, rtol=1e-4)
    # one expert left: the ensemble is exactly that expert's own forward
    single, _ = ensemble(sample, timestep, ehs, torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(single, unets[2](sample, timestep, ehs[2]), atol=1e-5, rtol=1e-4)  # BLAS-dependent summation order
    # per-sample masks: row b uses its own subset
    rows, _ = ensemble(sample, timestep, ehs, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(rows[0], out[0], atol=1e-6) and torch.allclose(rows[1], single[1], atol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        ensemble(sample, timestep, ehs, torch.zeros(3))


def test_only_aggregators_receive_gradients():
    unets = make_unets(2)
    ensemble = AFAEnsemble(unets, **SMALL).train()
    assert all(not u.training for u in ensemble.unets)
    assert all(not p.requires_grad for u in unets for p in u.parameters())
    trainable = {id(p) for p in ensemble.aggregator_parameters()}
    assert trainable == {id(p) for p in ensemble.parameters() if p.requires_grad}
    assert ensemble.count_parameters() == sum(p.numel() for p in ensemble.aggregator_parameters())

    sample, timestep, ehs = inputs(n=2)
    optimizer = torch.optim.SGD(ensemble.aggregator_parameters(), lr=1.0)
    for _ in range(2):  # at init only the (zero) logit convs get gradient; after a step, everything
        optimizer.zero_grad()
        out, _ = ensemble(sample, timestep, ehs)
        out.square().mean().backward()
        optimizer.step()
    assert all(p.grad is None for u in unets for p in u.parameters())
    for name, p in ensemble.aggregators.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mismatched_experts_are_rejected():
    tiny = UNetConfig.tiny(cross_attention_dim=TEXT_DIM)
    other = dataclasses.replace(tiny, block_out_channels=(32, 64, 128))
    with pytest.raises(ValueError, match="point"):
        AFAEnsemble([UNet2DConditionModel(tiny), UNet2DConditionModel(other)], **SMALL)
    wide_text = UNetConfig.tiny(cross_attention_dim=48)
    with pytest.raises(ValueError, match="text width"):
        AFAEnsemble([UNet2DConditionModel(tiny), UNet2DConditionModel(wide_text)], **SMALL)
    with pytest.raises(ValueError, match="at least 2"):
        AFAEnsemble([UNet2DConditionModel(tiny)], **SMALL)


def test_contribution_map_resizes_and_averages():
    fine = torch.tensor([[[[0.2, 0.4], [0.6, 0.8]]]])
    fine = torch.cat([fine, 1 - fine], 1)  # [1,2,2,2]
    coarse = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1)
    maps = contribution_map([fine, coarse], (2, 2))
    assert maps.shape == (1, 2, 2, 2)
    assert torch.allclose(maps[0, 0], torch.tensor([[0.55, 0.65], [0.75, 0.85]]))
    assert torch.allclose(maps.sum(1), torch.ones(1, 2, 2))


def test_export_wrapper_returns_contributions_at_latent_resolution():
    ensemble = AFAEnsemble(make_unets(2), **SMALL)
    sample, timestep, ehs = inputs(n=2)
    with torch.no_grad():
        out, contributions = AFAExport(ensemble)(sample, timestep, ehs, torch.ones(2))
        expected, weights = ensemble(sample, timestep, ehs)
    assert torch.equal(out, expected)
    assert contributions.shape == (2, 2, 8, 8)
    assert torch.allclose(contributions, contribution_map(weights, (8, 8)))
    assert torch.allclose(contributions.sum(1), torch.ones(2, 8, 8))


def test_onnx_export_of_the_fused_graph(tmp_path):
    onnx = pytest.importorskip("onnx")
    # torch 1.13's ONNX shape inference grows superlinearly with graph size: keep this graph small
    two_level = UNetConfig(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                           attention_head_dim=2, norm_num_groups=4, cross_attention_dim=TEXT_DIM)
    ensemble = AFAEnsemble([UNet2DConditionModel(two_level) for _ in range(2)], hidden=16, depth=1, heads=2,
                           head_dim=8)
    sample, timestep, ehs = inputs(n=2)
    path = tmp_path / "afa.onnx"
    kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
    torch.onnx.export(
        AFAExport(ensemble).eval(), (sample, timestep, ehs, torch.ones(2)), str(path), opset_version=17,
        input_names=["sample", "timestep", "encoder_hidden_states", "expert_mask"],
        output_names=["out_sample", "contributions"],
        dynamic_axes={"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"},
                      "encoder_hidden_states": {1: "B"}, "out_sample": {0: "B", 2: "h", 3: "w"},
                      "contributions": {0: "B", 2: "h", 3: "w"}},
        **kwargs,
    )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes and all(n.input[3] not in constants for n in resizes)  # sizes follow the input
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "encoder_hidden_states", "expert_mask"]
    assert [o.name for o in model.graph.output] == ["out_sample", "contributions"]


def test_random_expert_mask():
    g = torch.Generator().manual_seed(0)
    masks = random_expert_mask(4, 500, 0.5, g)
    assert masks.shape == (500, 4) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert bool((masks.sum(1) >= 2).all())
    assert 0.25 < 1 - masks.mean().item() < 0.5  # drops happen, fewer than p because of the floor
    assert len({tuple(row) for row in masks.tolist()}) > 5
    again = random_expert_mask(4, 500, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)
    assert torch.equal(random_expert_mask(3, None, 0.0, g), torch.ones(3))
    all_dropped = random_expert_mask(5, 200, 1.0, g)
    assert bool((all_dropped.sum(1) == 2).all())
    assert bool((all_dropped.mean(0) > 0.2).all())  # the forced survivors are spread over experts
    assert bool((random_expert_mask(3, 50, 1.0, g, min_keep=1).sum(1) == 1).all())


def _expected_sabw_size(n, channels, hidden, depth, inner, temb, text):
    attn_self = 4 * inner * inner + inner
    attn_cross = 2 * inner * inner + 2 * text * inner + inner
    ff = inner * 8 * inner + 8 * inner + 4 * inner * inner + inner  # GEGLU to 4×inner, then back
    block = 3 * 2 * inner + attn_self + attn_cross + ff
    transformer = 2 * hidden + (hidden * inner + inner) + depth * block + (inner * hidden + hidden)
    resnet = 2 * (2 * hidden + 9 * hidden * hidden + hidden) + temb * hidden + hidden
    return (n * channels * hidden + hidden) + resnet + transformer + (hidden * n + n)


def test_sabw_architecture_size():
    sabw = SABW(3, 320, 1280, 768, hidden=128, depth=2, heads=8, head_dim=16)
    assert sum(p.numel() for p in sabw.parameters()) == _expected_sabw_size(3, 320, 128, 2, 128, 1280, 768)
    assert torch.all(sabw.to_logits.weight == 0) and torch.all(sabw.to_logits.bias == 0)
    assert sabw.resnet.norm1.num_groups == 32
    assert SABW(2, 8, 16, 8, hidden=24, depth=1, heads=2, head_dim=4).resnet.norm1.num_groups == 8


def test_parameter_count_for_three_sd15_unets():
    unets = [UNet2DConditionModel(UNetConfig.sd15(), device="meta") for _ in range(3)]
    ensemble = AFAEnsemble(unets, hidden=128, depth=2, heads=8, head_dim=16)
    assert len(ensemble.points) == 25
    count = ensemble.count_parameters()
    print(f"\nSABW parameters for 3 SD1.5 U-Nets (hidden 128, depth 2, 25 points): {count:,}")
    expected = sum(_expected_sabw_size(3, p.channels, 128, 2, 128, 1280, 768) for p in ensemble.points)
    assert count == expected
    assert 40e6 < count < 50e6  # the design page: ≈45 M ("about 50 M" in the paper)


def test_routing_targets_follow_the_expert_with_the_lower_error_around_each_pixel():
    errors = torch.ones(1, 2, 8, 8)
    errors[0, 0, :, :4] = 0.5  # expert 0 is twice as good on the left half
    errors[0, 1, :, 4:] = 0.5  # expert 1 on the right half
    q = routing_targets(errors, window=1 / 8, temperature=0.25)
    assert torch.allclose(q.sum(1), torch.ones(1, 8, 8))
    assert torch.allclose(q[0, 0, :, :4], torch.full((8, 4), 16 / 17))  # 2 ** (1 / 0.25) : 1
    assert torch.allclose(q[0, 1, :, 4:], torch.full((8, 4), 16 / 17))
    # a wide window spreads an error gap into the pixels around it
    spot = torch.ones(1, 2, 8, 8)
    spot[0, 0, 0, 0] = 0.01
    assert routing_targets(spot, 1 / 8, 0.25)[0, 0, 3, 3] == pytest.approx(0.5)
    assert routing_targets(spot, 7 / 8, 0.25)[0, 0, 3, 3] > 0.51
    # an absent expert gets no target, however low its error
    masked = routing_targets(errors, 1 / 8, 0.25, mask=torch.tensor([[0.0, 1.0]]))
    assert float(masked[0, 0].max()) == 0.0 and torch.allclose(masked[0, 1], torch.ones(8, 8))


def test_routing_divergence_is_zero_only_where_every_point_matches_the_targets():
    q = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    coarse = torch.nn.functional.interpolate(q, size=(4, 4), mode="area")
    assert float(routing_divergence([q, coarse], q)) == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((2, 3, 4, 4), 1 / 3)
    assert float(routing_divergence([q, uniform], q)) > 0.01


@torch.no_grad()
def test_each_alone_is_every_expert_run_by_itself():
    unets = make_unets(3)
    ensemble = AFAEnsemble(unets, **SMALL)
    sample, timestep, ehs = inputs()
    alone = ensemble.each_alone(sample, timestep, ehs)
    assert len(alone) == 3
    for k, unet in enumerate(unets):
        assert torch.equal(alone[k], unet(sample, timestep, ehs[k]))
    shared = ensemble.each_alone(sample, timestep, ehs[0])
    assert torch.equal(shared[2], unets[2](sample, timestep, ehs[0]))

"""trainer.export.large_graph: the AFA graph written without holding the experts twice computes what
graphs.export_afa writes, from the ensemble's own weights or streamed from state dicts onto meta U-Nets."""
import os

import numpy as np
import onnx
import pytest
import torch

from trainer.export import graphs, large_graph, ort_check
from trainer.export.errors import ExportError
from trainer.models.afa import AFAEnsemble
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig

N = 2


def _ensemble(device=None) -> AFAEnsemble:
    torch.manual_seed(4)
    config = UNetConfig(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
                        attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
    unets = [UNet2DConditionModel(config, device=device) for _ in range(N)]
    ensemble = AFAEnsemble(unets, hidden=16, depth=1, heads=2, head_dim=8, device="cpu")
    with torch.no_grad():  # non-zero logits, so the experts' weights differ from pixel to pixel
        for sabw in ensemble.aggregators:
            sabw.to_logits.weight.normal_(0, 0.5)
            sabw.to_logits.bias.normal_(0, 0.5)
    return ensemble.eval()


def _feeds(subsets: bool):
    g = torch.Generator().manual_seed(11)
    feeds = []
    for batch, h, w, mask in ((2, 9, 12, [1.0, 1.0]), (1, 8, 8, [0.0, 1.0])):
        feed = {"sample": torch.randn(batch, 4, h, w, generator=g).numpy(),
                "timestep": np.array([917.0, 3.0][:batch], dtype=np.float32),
                "encoder_hidden_states": torch.randn(N, batch, 77, 32, generator=g).numpy()}
        if subsets:
            feed["expert_mask"] = np.array(mask, dtype=np.float32)
        feeds.append(feed)
    return feeds


def _same_outputs(a: str, b: str, subsets: bool, tolerance: float) -> None:
    feeds = _feeds(subsets)
    for got, want in zip(ort_check.run_onnx_many(b, feeds), ort_check.run_onnx_many(a, feeds)):
        assert sorted(got) == sorted(want) == ["contributions", "out_sample"]
        for name in want:
            assert got[name].shape == want[name].shape
            assert np.max(np.abs(got[name] - want[name])) <= tolerance, name
    # the outputs depend on the input and on the experts' weights (not a constant graph)
    assert np.std(want["out_sample"]) > 1e-3 and np.std(want["contributions"]) > 1e-3


def test_streamed_export_equals_the_normal_export(tmp_path):
    ort_check.skip_unless_available()
    ensemble = _ensemble()
    normal = str(tmp_path / "normal" / "model.onnx")
    streamed = str(tmp_path / "streamed" / "model.onnx")
    graphs.export_afa(ensemble, normal, check=False)
    report = large_graph.export_afa_streamed(ensemble, streamed, check=True)
    assert report.max_abs_error is not None  # its own parity check against PyTorch ran
    assert report.inputs == graphs.graph_signature(normal)[0]
    assert report.outputs == graphs.graph_signature(normal)[1]
    assert os.path.getsize(streamed + "_data") > os.path.getsize(streamed)  # weights live outside the graph
    _same_outputs(normal, streamed, subsets=True, tolerance=2e-5)


def test_streamed_from_files_onto_meta_experts_in_float16(tmp_path):
    ort_check.skip_unless_available()
    real = _ensemble()
    with torch.no_grad():  # weights a float16 checkpoint can hold exactly (small tensors stay float32 in graphs)
        for p in real.unets.parameters():
            p.copy_(p.half().float())
    states = [{k: v.clone() for k, v in unet.state_dict().items()} for unet in real.unets]
    skeleton = _ensemble(device="meta")
    skeleton.aggregators.load_state_dict(real.aggregators.state_dict())
    loaded = []

    def weights(i):
        loaded.append(i)
        return {k: v.half() for k, v in states[i].items()}  # as a float16 checkpoint would give them

    in_memory = str(tmp_path / "in-memory" / "model.onnx")
    streamed = str(tmp_path / "streamed" / "model.onnx")
    # from the ensemble's own weights, checked against PyTorch with float16-rounded weights
    checked = large_graph.export_afa_streamed(real, in_memory, fp16=True, subsets=False, check=True)
    assert checked.max_abs_error is not None and checked.weights_dtype == "float16"
    report = large_graph.export_afa_streamed(skeleton, streamed, weights, fp16=True, subsets=False)
    assert loaded == list(range(N))  # each expert read once, one after the other
    assert report.weights_dtype == "float16" and report.max_abs_error is None
    assert "streamed" in report.skipped_reason
    model = onnx.load(streamed, load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    assert sum(i.data_type == onnx.TensorProto.FLOAT16 for i in inits.values()) > 100
    # weights read by a Transpose were written transposed: no Transpose of a weight is left to onnxruntime
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert not [i.name for i in model.graph.input if i.name.startswith("ensemble.")]
    _same_outputs(in_memory, streamed, subsets=False, tolerance=1e-6)


def test_missing_weights_are_named(tmp_path):
    skeleton = _ensemble(device="meta")
    with pytest.raises(ExportError, match="no weights"):
        large_graph.export_afa_streamed(skeleton, str(tmp_path / "m.onnx"))

    def partial(i):
        state = _ensemble().unets[i].state_dict()
        state.pop("conv_in.weight")
        return state

    with pytest.raises(ExportError, match=r"no weights for 2 graph input\(s\): ensemble\.unets\.0\.conv_in\.weight"):
        large_graph.export_afa_streamed(skeleton, str(tmp_path / "m.onnx"), partial, check=False)


def test_a_unet_streamed_onto_the_meta_device_equals_the_normal_export(tmp_path):
    ort_check.skip_unless_available()
    real = _ensemble().unets[0]
    state = {k: v.clone() for k, v in real.state_dict().items()}
    skeleton = UNet2DConditionModel(real.config, device="meta")
    normal = str(tmp_path / "normal" / "model.onnx")
    streamed = str(tmp_path / "streamed" / "model.onnx")
    graphs.export_unet(real, normal, check=False)
    checked = large_graph.export_unet_streamed(real, str(tmp_path / "checked" / "model.onnx"), check=True)
    assert checked.max_abs_error is not None  # from its own weights: parity against PyTorch
    report = large_graph.export_unet_streamed(skeleton, streamed, lambda: state)
    assert report.inputs == graphs.graph_signature(normal)[0] and report.max_abs_error is None
    g = torch.Generator().manual_seed(5)
    feeds = [{"sample": torch.randn(2, 4, 9, 12, generator=g).numpy(),
              "timestep": np.array([917.0, 3.0], dtype=np.float32),
              "encoder_hidden_states": torch.randn(2, 77, 32, generator=g).numpy()}]
    want, got = ort_check.run_onnx_many(normal, feeds)[0], ort_check.run_onnx_many(streamed, feeds)[0]
    assert np.max(np.abs(got["out_sample"] - want["out_sample"])) <= 2e-5
    assert np.std(want["out_sample"]) > 1e-3

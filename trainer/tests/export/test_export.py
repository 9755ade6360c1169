import copy
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trainer.export import fp16, graphs, ort_check, parity
from trainer.export import spec as export_spec
from trainer.export.errors import ExportDriftError
from trainer.export.manifest import validate_manifest
from trainer.export.onnx_io import graph_signature
from trainer.models.afa import AFAEnsemble
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, PLAIN_DOWN, PLAIN_UP, UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig

D = 16


def small_unet(seed, levels=2):
    torch.manual_seed(seed)
    if levels == 1:
        config = UNetConfig(sample_size=8, block_out_channels=(8,), layers_per_block=1,
                            down_block_types=(CROSS_ATTN_DOWN,), up_block_types=(CROSS_ATTN_UP,),
                            attention_head_dim=2, cross_attention_dim=D, norm_num_groups=4)
    else:
        config = UNetConfig(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                            down_block_types=(CROSS_ATTN_DOWN, PLAIN_DOWN), up_block_types=(PLAIN_UP, CROSS_ATTN_UP),
                            attention_head_dim=2, cross_attention_dim=D, norm_num_groups=4)
    return UNet2DConditionModel(config).eval()


def small_ensemble():
    ensemble = AFAEnsemble([small_unet(1, levels=1), small_unet(2, levels=1)], hidden=8, depth=1, heads=2,
                           head_dim=4).eval()
    torch.manual_seed(3)
    for sabw in ensemble.aggregators:
        torch.nn.init.normal_(sabw.to_logits.weight, std=0.5)
    return ensemble


def elem_type(model, name):
    for value in model.graph.input:
        if value.name == name:
            return value.type.tensor_type.elem_type
    raise KeyError(name)


def dims(model, name):
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == name:
            return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    raise KeyError(name)


# --- the four graph kinds ----------------------------------------------------------------------


def test_text_encoder_graph(tmp_path):
    ort_check.skip_unless_available()
    torch.manual_seed(0)
    model = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=300, hidden_size=D, eos_token_id=299,
                                                   pad_token_id=299, mask_padding=True))
    path = str(tmp_path / "text_encoder" / "model.onnx")
    report = graphs.export_text_encoder(model, path, check=True)
    assert report.inputs == {"input_ids": "int64[batch,77]"}
    assert list(report.outputs) == ["last_hidden_state", "pooler_output"]
    assert report.max_abs_error["last_hidden_state"] <= 1e-4 and report.max_abs_error["pooler_output"] <= 1e-4
    # a padded prompt through onnxruntime equals PyTorch
    ids = torch.full((1, 77), 299)
    ids[0, :4] = torch.tensor([298, 5, 17, 299])
    got = ort_check.run_onnx(path, {"input_ids": ids.numpy()})
    want = model(ids)[1].detach().numpy()
    np.testing.assert_allclose(got["pooler_output"], want, atol=1e-5)


def test_vae_decoder_graph_has_dynamic_size(tmp_path):
    ort_check.skip_unless_available()
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16, 16), norm_num_groups=4)).eval()
    path = str(tmp_path / "vae.onnx")
    report = graphs.export_vae_decoder(vae, path, check=True)
    assert report.inputs == {"latent_sample": "float32[batch,4,height,width]"}
    assert report.outputs == {"sample": "float32[batch,3,pixel_height,pixel_width]"}
    z = torch.randn(1, 4, 3, 7)
    out = ort_check.run_onnx(path, {"latent_sample": z.numpy()})["sample"]
    assert out.shape == (1, 3, 12, 28)
    np.testing.assert_allclose(out, vae.decode(z).detach().numpy(), atol=1e-4)


def test_unet_graph_with_float_and_int64_timesteps(tmp_path):
    ort_check.skip_unless_available()
    unet = small_unet(0)
    float_path, int_path = str(tmp_path / "f.onnx"), str(tmp_path / "i.onnx")
    report = graphs.export_unet(unet, float_path, check=True, name="unet f")
    assert report.inputs == {"sample": "float32[batch,4,height,width]", "timestep": "float32[batch]",
                             "encoder_hidden_states": f"float32[batch,77,{D}]"}
    assert report.outputs == {"out_sample": "float32[batch,4,height,width]"}
    assert report.max_abs_error["out_sample"] <= 1e-4
    report = graphs.export_unet(unet, int_path, timestep_dtype="int64", check=True, compact=True)
    assert report.inputs["timestep"] == "int64[batch]"

    g = torch.Generator().manual_seed(1)
    sample, ehs = torch.randn(2, 4, 6, 10, generator=g), torch.randn(2, 77, D, generator=g)
    t = torch.tensor([981.0, 1.0])
    want = unet(sample, t, ehs).detach().numpy()
    by_float = ort_check.run_onnx(float_path, {"sample": sample.numpy(), "timestep": t.numpy(),
                                               "encoder_hidden_states": ehs.numpy()})["out_sample"]
    by_int = ort_check.run_onnx(int_path, {"sample": sample.numpy(), "timestep": t.long().numpy(),
                                           "encoder_hidden_states": ehs.numpy()})["out_sample"]
    np.testing.assert_allclose(by_float, want, atol=1e-4)
    np.testing.assert_allclose(by_int, want, atol=1e-4)


def test_unet_graph_with_attention_mask_and_class_labels(tmp_path):
    ort_check.skip_unless_available()
    torch.manual_seed(0)
    config = UNetConfig(sample_size=4, block_out_channels=(8,), layers_per_block=1, down_block_types=(CROSS_ATTN_DOWN,),
                        up_block_types=(CROSS_ATTN_UP,), attention_head_dim=2, cross_attention_dim=D,
                        norm_num_groups=4, class_embed_type="projection", projection_class_embeddings_input_dim=D)
    unet = UNet2DConditionModel(config).eval()
    report = graphs.export_unet(unet, str(tmp_path / "u.onnx"), attention_mask=True, check=True)
    assert list(report.inputs) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                                   "class_labels"]
    assert report.inputs["class_labels"] == f"float32[batch,{D}]"


def test_fused_afa_graph(tmp_path):
    ort_check.skip_unless_available()
    ensemble = small_ensemble()
    path = str(tmp_path / "ensembles" / "duo" / "model.onnx")
    report = graphs.export_afa(ensemble, path, check=True, compact=True)
    assert report.inputs == {"sample": "float32[batch,4,height,width]", "timestep": "float32[batch]",
                             "encoder_hidden_states": f"float32[2,batch,77,{D}]", "expert_mask": "float32[2]"}
    assert report.outputs == {"out_sample": "float32[batch,4,height,width]",
                              "contributions": "float32[batch,2,height,width]"}
    assert max(report.max_abs_error.values()) <= 1e-4

    g = torch.Generator().manual_seed(5)
    sample, ehs = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 2, 77, D, generator=g)
    t = torch.tensor([500.0, 20.0])
    runs = ort_check.run_onnx_many(path, [
        {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy(),
         "expert_mask": np.array([1, 1], np.float32)},
        {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy(),
         "expert_mask": np.array([0, 1], np.float32)},
    ])
    maps = runs[0]["contributions"]
    assert maps.shape == (2, 2, 5, 6)
    np.testing.assert_allclose(maps.sum(1), 1.0, atol=1e-5)
    assert maps.std() > 0.01  # the random logit weights make the maps non-uniform
    np.testing.assert_array_equal(runs[1]["contributions"][:, 0], 0.0)
    # with expert 0 masked out the ensemble is expert 1 alone
    alone = ensemble.unets[1](sample, t, ehs[1]).detach().numpy()
    np.testing.assert_allclose(runs[1]["out_sample"], alone, atol=1e-4)


def test_fp16_storage(tmp_path):
    ort_check.skip_unless_available()
    unet = small_unet(0)
    path32, path16 = str(tmp_path / "u32.onnx"), str(tmp_path / "u16.onnx")
    graphs.export_unet(unet, path32, check=True)
    report = graphs.export_unet(unet, path16, fp16=True, check=True)
    assert report.weights_dtype == "float16"
    assert report.max_abs_error["out_sample"] <= 1e-4  # against the fp16-rounded weights
    model = onnx.load(path16)
    big = [i for i in model.graph.initializer if np.prod(i.dims) >= fp16.FP16_MIN_ELEMENTS]
    assert big and all(i.data_type == TensorProto.FLOAT16 for i in big)
    assert elem_type(model, "sample") == TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert os.path.getsize(path16) < 0.8 * os.path.getsize(path32)
    # weights keep their names, so a weight-space merge still lines them up
    names32 = {i.name for i in onnx.load(path32).graph.initializer}
    assert {i.name for i in big} <= names32

    g = torch.Generator().manual_seed(2)
    feeds = {"sample": torch.randn(1, 4, 8, 8, generator=g).numpy(), "timestep": np.array([400.0], np.float32),
             "encoder_hidden_states": torch.randn(1, 77, D, generator=g).numpy()}
    full = ort_check.run_onnx(path32, feeds)["out_sample"]
    half = ort_check.run_onnx(path16, feeds)["out_sample"]
    scale = np.abs(full).max()
    assert 0 < np.abs(half - full).max() <= 2e-2 * scale  # the looser tolerance of float16 weights


def test_drift_is_reported_with_graph_output_and_error(tmp_path):
    ort_check.skip_unless_available()
    unet = small_unet(0)
    path = str(tmp_path / "u.onnx")
    graphs.export_unet(unet, path, check=True)
    drifted = copy.deepcopy(unet)
    with torch.no_grad():
        drifted.conv_out.bias.add_(1e-2)
    g = torch.Generator().manual_seed(0)
    feeds = {"sample": torch.randn(1, 4, 8, 8, generator=g), "timestep": torch.tensor([10.0]),
             "encoder_hidden_states": torch.randn(1, 77, D, generator=g)}
    with pytest.raises(ExportDriftError) as err:
        parity.check_parity("unet alpha", path, graphs.UNetGraph(drifted, list(feeds)), [feeds], ["out_sample"])
    message = str(err.value)
    assert "unet alpha" in message and "'out_sample'" in message and "max abs error 0.01" in message
    errors, skipped = parity.check_parity("unet alpha", path, graphs.UNetGraph(unet, list(feeds)), [feeds],
                                          ["out_sample"])
    assert skipped is None and errors["out_sample"] <= 1e-4


def test_export_fails_loudly_when_the_graph_cannot_follow_the_module(tmp_path):
    """A module whose Python control flow depends on values: the traced graph drifts on other inputs."""
    ort_check.skip_unless_available()

    class ValueBranch(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            out = self.unet(sample, timestep, encoder_hidden_states)
            return out * 2 if float(timestep[0]) > 900 else out  # frozen at trace time

    unet = small_unet(0)
    original = graphs.UNetGraph

    class Patched(original):
        def __init__(self, unet, names):
            super().__init__(ValueBranch(unet), names)

        def forward(self, *inputs):
            return self.unet(*inputs[:3])

    graphs.UNetGraph = Patched
    try:
        with pytest.raises(ExportDriftError, match=r"unet x: onnxruntime output 'out_sample'"):
            graphs.export_unet(unet, str(tmp_path / "u.onnx"), check=True, name="unet x")
    finally:
        graphs.UNetGraph = original


def test_fp16_conversion_keeps_small_and_out_of_range_tensors():
    big = numpy_helper.from_array(np.linspace(-1, 1, 32, dtype=np.float32), "w")
    small = numpy_helper.from_array(np.array([1e-5], np.float32), "eps")
    huge = numpy_helper.from_array(np.full(20, 1e6, np.float32), "huge")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["a"]), helper.make_node("Add", ["a", "eps"], ["b"]),
         helper.make_node("Add", ["b", "huge"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32])], [big, small, huge])
    model = fp16.store_weights_fp16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    types = {i.name: i.data_type for i in model.graph.initializer}
    assert types == {"w": TensorProto.FLOAT16, "eps": TensorProto.FLOAT, "huge": TensorProto.FLOAT}
    assert model.graph.node[0].op_type == "Cast" and list(model.graph.node[1].input) == ["x", "w__float32"]


# --- packages from model folders --------------------------------------------------------------


def test_cli_builds_a_package_from_model_folders(tmp_path):
    from trainer.io import model_folders
    from trainer.text.bpe import train_bpe

    vocab, _ = train_bpe(["a red circle", "a blue square on the left"], 520, str(tmp_path / "tok"))
    torch.manual_seed(0)
    text_encoder = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=len(vocab), hidden_size=D,
                                                          eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1))
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    ensemble = small_ensemble()
    model_folders.save_text_encoder(text_encoder, tmp_path / "base" / "text_encoder")
    model_folders.save_vae(vae, tmp_path / "vae")
    for k, eid in enumerate(["a", "b"]):
        model_folders.save_unet(ensemble.unets[k], tmp_path / eid / "unet")
    model_folders.save_aggregators(ensemble, tmp_path / "duo" / "afa")
    spec = {
        "name": "cli", "version": "0.1.0", "tokenizer": "tok", "text_encoder": "base", "vae": "vae",
        "scheduler": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        "experts": [{"id": "a", "title": "A", "unet": "a"}, {"id": "b", "unet": "b", "timestep": "int64"}],
        "ensembles": [{"id": "duo", "experts": ["a", "b"], "afa": "duo", "subsets": False}],
        "defaults": {"steps": 4, "guidance": 3.0, "scheduler": "euler", "width": 16, "height": 16},
        "size": {"min": 8, "max": 32},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    out = tmp_path / "pkg"
    assert export_spec.main(["--spec", str(tmp_path / "spec.json"), "--out", str(out), "--fp16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    validate_manifest(manifest, str(out))
    assert manifest["latent"] == {"channels": 4, "downsample": 2, "scale_factor": 0.18215}
    assert [e["id"] for e in manifest["experts"]] == ["a", "b"] and manifest["experts"][0]["title"] == "A"
    assert manifest["experts"][0]["architecture"] == manifest["experts"][1]["architecture"]
    assert manifest["ensembles"][0]["subsets"] is False
    # the VAE's encoder too (image-to-image), after the decoder
    assert manifest["vae_encoder"] == "vae_encoder/model.onnx"
    assert list(manifest).index("vae_encoder") == list(manifest).index("vae_decoder") + 1
    assert list(graph_signature(str(out / "vae_encoder" / "model.onnx"))[1]) == ["latent_parameters"]
    # without subsets the fused graph has no expert_mask input
    duo_inputs = graph_signature(str(out / "ensembles" / "duo" / "model.onnx"))[0]
    assert list(duo_inputs) == ["sample", "timestep", "encoder_hidden_states"]
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert graph_signature(str(out / "experts" / "b" / "unet" / "model.onnx"))[0]["timestep"] == "int64[batch]"
    duo = onnx.load(str(out / "ensembles" / "duo" / "model.onnx"))
    assert any(i.data_type == TensorProto.FLOAT16 for i in duo.graph.initializer)
    # the aggregators' trained (here: random) logit weights made it into the graph
    want = ensemble.aggregators[0].to_logits.weight.detach().numpy().astype(np.float16)
    have = {i.name: numpy_helper.to_array(i) for i in duo.graph.initializer}["ensemble.aggregators.0.to_logits.weight"]
    np.testing.assert_array_equal(have, want)

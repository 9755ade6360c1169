"""The VAE encoder graph (image-to-image): its bare exporter, the parity-checked one, and its place in a package."""
import io
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from trainer import REPO_ROOT
from trainer.export import graphs, ort_check
from trainer.export.errors import ExportDriftError, ManifestError
from trainer.export.manifest import write_manifest
from trainer.export.onnx_io import VAEEncoderGraph, export_vae_encoder_onnx
from trainer.models.vae import AutoencoderKL, VAEConfig

FIXTURE = os.path.join(REPO_ROOT, "test", "fixtures", "tiny")


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16, 16), norm_num_groups=4)).eval()


def test_the_graph_module_is_the_posterior_mean_then_logvar():
    vae = tiny_vae()
    x = torch.rand(2, 3, 12, 20) * 2 - 1
    with torch.no_grad():
        params = VAEEncoderGraph(vae)(x)
        mean, logvar = vae.encode(x)
    assert params.shape == (2, 8, 3, 5)
    torch.testing.assert_close(params[:, :4], mean)
    # unclamped, as diffusers' latent_dist.parameters: the reader clamps
    torch.testing.assert_close(params[:, 4:].clamp(-30, 20), logvar)
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(-50.0)
        params = VAEEncoderGraph(vae)(x)
        _, clamped = vae.encode(x)
    assert float(params[:, 4:].max()) < -30 and bool((clamped == -30).all())


def test_bare_onnx_export_names_and_dynamic_axes():
    buf = io.BytesIO()
    export_vae_encoder_onnx(tiny_vae(), buf, latent_size=4)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["sample"]
    assert [o.name for o in graph.graph.output] == ["latent_parameters"]
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(graph.graph.input[0]) == ["batch", 3, "pixel_height", "pixel_width"]
    assert dims(graph.graph.output[0]) == ["batch", 8, "height", "width"]
    assert graph.opset_import[0].version == 17


def test_encoder_graph_matches_pytorch_in_onnxruntime(tmp_path):
    """Parity-checked like the decoder: another batch and other (odd) sizes than the traced ones."""
    ort_check.skip_unless_available()
    vae = tiny_vae()
    path = str(tmp_path / "vae_encoder" / "model.onnx")
    report = graphs.export_vae_encoder(vae, path, check=True)
    assert report.graph == "vae_encoder"
    assert report.inputs == {"sample": "float32[batch,3,pixel_height,pixel_width]"}
    assert report.outputs == {"latent_parameters": "float32[batch,8,height,width]"}
    assert report.max_abs_error["latent_parameters"] <= 1e-4
    # a picture of yet another size, straight through onnxruntime-node
    x = torch.rand(1, 3, 28, 12) * 2 - 1
    got = ort_check.run_onnx(path, {"sample": x.numpy()})["latent_parameters"]
    assert got.shape == (1, 8, 7, 3)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
    np.testing.assert_allclose(got[:, :4], mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.clip(got[:, 4:], -30, 20), logvar.numpy(), atol=1e-5)


def test_fp16_encoder_is_checked_against_rounded_weights(tmp_path):
    ort_check.skip_unless_available()
    report = graphs.export_vae_encoder(tiny_vae(), str(tmp_path / "enc.onnx"), fp16=True, check=True)
    assert report.weights_dtype == "float16" and report.max_abs_error["latent_parameters"] <= 1e-4


def test_encoder_drift_is_reported(tmp_path, monkeypatch):
    """A graph that does not follow the module stops the export, naming the graph and the output."""
    ort_check.skip_unless_available()
    vae = tiny_vae()
    path = str(tmp_path / "enc.onnx")
    real = graphs.torch_export

    def export_other_weights(module, *args, **kwargs):
        other = VAEEncoderGraph(AutoencoderKL(vae.config).eval())
        return real(other, *args, **kwargs)

    monkeypatch.setattr(graphs, "torch_export", export_other_weights)
    with pytest.raises(ExportDriftError, match=r"vae_encoder: onnxruntime output 'latent_parameters'"):
        graphs.export_vae_encoder(vae, path, check=True)


def _fixture_copy(tmp_path):
    if not os.path.isfile(os.path.join(FIXTURE, "manifest.json")):
        pytest.skip("test/fixtures/tiny is not built")
    package = tmp_path / "pkg"
    shutil.copytree(FIXTURE, package)
    with open(package / "manifest.json", encoding="utf-8") as f:
        return package, json.load(f)


def test_the_fixture_has_an_encoder_and_the_manifest_checks_its_role(tmp_path):
    package, m = _fixture_copy(tmp_path)
    assert m["vae_encoder"] == "vae_encoder/model.onnx"
    write_manifest(str(package), m)
    # a graph without a latent output is not an encoder
    m["vae_encoder"] = "vae_decoder/model.onnx"
    with pytest.raises(ManifestError, match=r"vae_encoder graph lacks input 'sample'"):
        write_manifest(str(package), m)
    m["vae_encoder"] = "experts/alpha/unet/model.onnx"
    with pytest.raises(ManifestError, match=r"vae_encoder graph lacks output 'latent_parameters'"):
        write_manifest(str(package), m)
    m["vae_encoder"] = "vae_encoder/missing.onnx"
    with pytest.raises(ManifestError, match=r"vae_encoder: vae_encoder/missing.onnx is missing"):
        write_manifest(str(package), m)
    # packages without one stay valid
    del m["vae_encoder"]
    write_manifest(str(package), m)

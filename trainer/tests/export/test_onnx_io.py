"""The bare single-graph exporters of trainer.export.onnx_io (text encoder, VAE decoder)."""
import io

import onnx
import pytest
import torch
from torch import nn

from trainer import REPO_ROOT
from trainer.export.onnx_io import export_text_encoder_onnx, export_vae_decoder_onnx
from trainer.tests.small_models import CLIP_BOS, CLIP_EOS, clip_ids, tiny_clip_text_encoder
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.vae import AutoencoderKL, VAEConfig, VAEDecoderOnly



def _tiny_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(VAEConfig.tiny(**overrides))


def test_text_encoder_onnx_export():
    model = tiny_clip_text_encoder()
    buf = io.BytesIO()
    export_text_encoder_onnx(model, buf)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    inputs = {i.name: i for i in graph.graph.input}
    assert list(inputs) == ["input_ids"]
    assert inputs["input_ids"].type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = inputs["input_ids"].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 77
    assert [o.name for o in graph.graph.output] == ["last_hidden_state", "pooler_output"]
    ops = {n.op_type for n in graph.graph.node}
    assert "Softmax" in ops and "MatMul" in ops
    assert graph.opset_import[0].version == 17


TEXT_ENCODER_ORT_SCRIPT = """
import ort from 'onnxruntime-node';
import fs from 'fs';
const [model, idsPath] = process.argv.slice(1);
const ids = JSON.parse(fs.readFileSync(idsPath, 'utf8'));
const session = await ort.InferenceSession.create(model);
const out = await session.run({ input_ids: new ort.Tensor('int64', BigInt64Array.from(ids.flat().map(BigInt)), [ids.length, ids[0].length]) });
console.log(JSON.stringify({ last: Array.from(out.last_hidden_state.data), pooled: Array.from(out.pooler_output.data) }));
"""


def test_text_encoder_graph_matches_torch_in_onnxruntime(tmp_path):
    """Runs the exported graph (batch 2, derived padding mask) in onnxruntime-node when the repo has it."""
    import json
    import os
    import shutil
    import subprocess

    repo = REPO_ROOT
    if shutil.which("node") is None or not os.path.isdir(os.path.join(repo, "node_modules", "onnxruntime-node")):
        pytest.skip("node with onnxruntime-node is not available")
    model = tiny_clip_text_encoder(mask_padding=True)
    path = tmp_path / "text_encoder.onnx"
    export_text_encoder_onnx(model, str(path))
    ids = clip_ids([320, 1125, 539], [736])
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    result = subprocess.run(
        ["node", "--input-type=module", "-e", TEXT_ENCODER_ORT_SCRIPT, str(path), str(tmp_path / "ids.json")],
        cwd=repo, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    with torch.no_grad():
        last, pooled = model(ids)
    torch.testing.assert_close(torch.tensor(got["last"]).reshape(last.shape), last, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(got["pooled"]).reshape(pooled.shape), pooled, atol=1e-5, rtol=1e-4)


def test_decoder_only_onnx_export():
    vae = _tiny_vae().eval()
    module = VAEDecoderOnly(vae)
    z = torch.randn(1, 4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(module(z), vae.decode(z))
    buf = io.BytesIO()
    export_vae_decoder_onnx(vae, buf, latent_size=4)
    graph = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["latent_sample"]
    assert [o.name for o in graph.graph.output] == ["sample"]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 4, "height", "width"]
    assert graph.opset_import[0].version == 17


VAE_ORT_SCRIPT = """
import ort from 'onnxruntime-node';
import fs from 'fs';
const [model, inputPath] = process.argv.slice(1);
const { data, dims } = JSON.parse(fs.readFileSync(inputPath, 'utf8'));
const session = await ort.InferenceSession.create(model);
const out = await session.run({ latent_sample: new ort.Tensor('float32', Float32Array.from(data), dims) });
console.log(JSON.stringify({ data: Array.from(out.sample.data), dims: out.sample.dims }));
"""


def test_decoder_graph_matches_torch_in_onnxruntime(tmp_path):
    """Runs the exported decoder at another batch and latent size in onnxruntime-node when the repo has it."""
    import json
    import os
    import shutil
    import subprocess

    repo = REPO_ROOT
    if shutil.which("node") is None or not os.path.isdir(os.path.join(repo, "node_modules", "onnxruntime-node")):
        pytest.skip("node with onnxruntime-node is not available")
    vae = _tiny_vae().eval()
    path = tmp_path / "vae_decoder.onnx"
    export_vae_decoder_onnx(vae, str(path), latent_size=4)
    z = torch.randn(2, 4, 6, 5)
    (tmp_path / "z.json").write_text(json.dumps({"data": z.flatten().tolist(), "dims": list(z.shape)}))
    result = subprocess.run(
        ["node", "--input-type=module", "-e", VAE_ORT_SCRIPT, str(path), str(tmp_path / "z.json")],
        cwd=repo, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    with torch.no_grad():
        expected = vae.decode(z)
    assert got["dims"] == [2, 3, 12, 10]
    torch.testing.assert_close(torch.tensor(got["data"]).reshape(expected.shape), expected, atol=1e-5, rtol=1e-4)

"""Float16-compute graphs (trainer.export.fp16_graph / fp16_compute): well-formed, float16 where it
should be, float32 where it must be, same inputs and outputs, and numerically close to float32.

Tolerance: every output within max abs error 1e-2 · max(1, max |float32 output|) of the float32 graph
on random inputs (float16 has 11 significant bits, ≈ 5e-4 relative per rounding; the tiny graphs
stay around 2e-3 relative). Two runs are compared with the float32 graph in onnxruntime-node's CPU
provider: the float16 graph itself (ORT 1.30's CPU provider lacks float16 kernels for most ops and
inserts Casts to float32 around them, so it rounds less often than a GPU) and its emulation
(emulate_fp16: every float16 value rounded, as a GPU computing in float16 would).
"""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from trainer import REPO_ROOT
from trainer.export import ort_check
from trainer.export.errors import ExportError, ManifestError
from trainer.export.fp16_compute import add_fp16_variants, fp16_path, main, parse_graph_kinds
from trainer.export.fp16_emulate import emulate_fp16
from trainer.export.fp16_graph import to_fp16_compute, value_types
from trainer.export.graphs import export_unet
from trainer.tests.small_models import TEXT_DIM, small_unet

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
TINY = os.path.join(REPO_ROOT, "test", "fixtures", "tiny")
RELATIVE_TOLERANCE = 1e-2
MUST_BE_FP32 = {"InstanceNormalization", "Softmax", "Sin", "Cos", "ReduceSum", "ReduceMean", "Exp", "Pow", "Sqrt"}
HEAVY = {"Conv", "MatMul", "Gemm"}

rng = np.random.default_rng(0)


def _unet_feeds(batch=3, h=5, w=7, text=32, timestep=np.float32, experts=None):
    t = np.array([999, 500, 1][:batch], dtype=timestep)
    ehs = (batch, 77, text) if experts is None else (experts, batch, 77, text)
    feeds = {"sample": rng.standard_normal((batch, 4, h, w)).astype(np.float32), "timestep": t,
             "encoder_hidden_states": rng.standard_normal(ehs).astype(np.float32)}
    if experts is not None:
        feeds["expert_mask"] = np.ones(experts, np.float32)
    return feeds


GRAPHS = {
    "experts/alpha/unet": lambda: _unet_feeds(),
    "experts/odd/unet": lambda: _unet_feeds(batch=2, h=6, w=10, timestep=np.int64),
    "ensembles/duo": lambda: _unet_feeds(batch=2, experts=2),
    "ensembles/fuse": lambda: _unet_feeds(batch=2, h=4, w=4, experts=2),
    "text_encoder": lambda: {"input_ids": np.array([[598, 12, 40, 599] + [599] * 73,
                                                    [598] + list(range(20, 95)) + [599]], np.int64)},
    "vae_decoder": lambda: {"latent_sample": rng.standard_normal((2, 4, 5, 3)).astype(np.float32)},
    "vae_encoder": lambda: {"sample": rng.uniform(-1, 1, (1, 3, 20, 12)).astype(np.float32)},
}


@pytest.fixture(scope="module")
def converted():
    out = {}
    for rel in GRAPHS:
        model = onnx.load(os.path.join(TINY, rel, "model.onnx"))
        out[rel] = (model, *to_fp16_compute(model))
    return out


def _node_input_types(model):
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    return inferred, value_types(inferred)


@pytest.mark.parametrize("rel", list(GRAPHS))
def test_float16_graph_is_well_formed_and_keeps_its_interface(converted, rel):
    model, model16, _ = converted[rel]
    onnx.checker.check_model(model16, full_check=True)
    _node_input_types(model16)  # strict: every value gets a type, every node its input types

    def io(m):
        init = {i.name for i in m.graph.initializer}
        return ([(v.name, v.type.tensor_type.elem_type) for v in m.graph.input if v.name not in init],
                [(v.name, v.type.tensor_type.elem_type) for v in m.graph.output])
    assert io(model16) == io(model)


@pytest.mark.parametrize("rel", list(GRAPHS))
def test_heavy_ops_compute_in_float16_and_sensitive_ops_in_float32(converted, rel):
    _, model16, report = converted[rel]
    _, types = _node_input_types(model16)
    heavy = [n for n in model16.graph.node if n.op_type in HEAVY]
    assert heavy
    for n in heavy:
        assert [types[x] for x in n.input if x] == [FLOAT16] * len([x for x in n.input if x]), n.op_type
    for n in model16.graph.node:
        if n.op_type in MUST_BE_FP32:
            assert types[n.input[0]] == FLOAT and types[n.output[0]] == FLOAT, f"{n.op_type} {n.name}"
    weights = [i for i in model16.graph.initializer if int(np.prod(i.dims)) >= 16]
    fp16_bytes = sum(np.prod(i.dims) for i in weights if i.data_type == FLOAT16)
    assert fp16_bytes >= 0.95 * sum(np.prod(i.dims) for i in weights)
    assert report.fp16_nodes > 0 and "Softmax" in report.fp32_nodes


def test_timestep_embedding_is_formed_in_float32(converted):
    """t · freq reaches Sin/Cos in float32: the Mul before them and the timestep's Cast stay float32."""
    for rel in ("experts/alpha/unet", "experts/odd/unet", "ensembles/duo", "ensembles/fuse"):
        _, model16, _ = converted[rel]
        _, types = _node_input_types(model16)
        producer = {o: n for n in model16.graph.node for o in n.output}
        sines = [n for n in model16.graph.node if n.op_type in ("Sin", "Cos")]
        assert sines
        for n in sines:
            mul = producer[n.input[0]]
            assert mul.op_type == "Mul" and all(types[x] == FLOAT for x in mul.input), rel


def _compare(reference, got, what):
    for name, want in reference.items():
        have = got[name].astype(np.float32)
        assert have.shape == want.shape and np.all(np.isfinite(have)), f"{what} {name}"
        err = float(np.max(np.abs(have - want)))
        bound = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(want))))
        assert err <= bound, f"{what} {name}: max abs error {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("rel", list(GRAPHS))
def test_float16_graph_matches_float32_in_onnxruntime(converted, rel, tmp_path):
    ort_check.skip_unless_available()
    _, model16, _ = converted[rel]
    feeds = GRAPHS[rel]()
    paths = {}
    for kind, m in (("fp16", model16), ("emulated", emulate_fp16(model16))):
        paths[kind] = str(tmp_path / f"{kind}.onnx")
        onnx.save(m, paths[kind])
    reference = ort_check.run_onnx(os.path.join(TINY, rel, "model.onnx"), feeds)
    for kind, path in paths.items():
        got = ort_check.run_onnx(path, feeds)
        assert set(got) == set(reference)
        assert all(v.dtype == reference[k].dtype for k, v in got.items())
        _compare(reference, got, f"{rel} ({kind})")
    if rel.startswith("ensembles/"):
        maps = ort_check.run_onnx(paths["emulated"], feeds)["contributions"]
        assert np.allclose(maps.sum(1), 1.0, atol=2e-3)


def test_a_freshly_exported_unet_with_float16_storage(tmp_path):
    """The `--fp16` export (float16 weights cast to float32 inside) converts too: its storage casts go."""
    path = str(tmp_path / "unet" / "model.onnx")
    export_unet(small_unet(), path, fp16=True, check=False)
    model = onnx.load(path)
    model16, _ = to_fp16_compute(model)
    onnx.checker.check_model(model16, full_check=True)
    _, types = _node_input_types(model16)
    casts = [n for n in model16.graph.node if n.op_type == "Cast" and types.get(n.input[0]) in (FLOAT, FLOAT16)]
    assert not [n for n in casts if types[n.input[0]] == next(a.i for a in n.attribute if a.name == "to")]
    assert len(casts) < sum(1 for n in model.graph.node if n.op_type == "Cast") / 2
    if ort_check.available():
        feeds = _unet_feeds(batch=2, h=3, w=5, text=TEXT_DIM)
        reference = ort_check.run_onnx(path, feeds)
        onnx.save(emulate_fp16(model16), str(tmp_path / "emulated.onnx"))
        _compare(reference, ort_check.run_onnx(str(tmp_path / "emulated.onnx"), feeds), "fresh unet")


def _graph(nodes, inputs, outputs, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_decomposed_layer_norm_keeps_its_statistics_in_float32():
    x = helper.make_tensor_value_info("x", FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 8])
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    gamma = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) + 1, "gamma")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    eps = numpy_helper.from_array(np.array(1e-5, np.float32), "eps")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["y"]),
    ]
    model16, _ = to_fp16_compute(_graph(nodes, [x], [y], [w, gamma, two, eps]))
    onnx.checker.check_model(model16, full_check=True)
    _, types = _node_input_types(model16)
    by_output = {n.output[0]: n for n in model16.graph.node}
    for name in ("mean", "d", "sq", "var", "ve", "std", "n"):
        assert types[name] == FLOAT, name
    assert types["h"] == FLOAT16 and types[by_output["y"].input[0]] == FLOAT  # the affine follows in float32
    assert {i.name: i.data_type for i in model16.graph.initializer}["w"] == FLOAT16
    assert types["y"] == FLOAT


def test_a_variance_of_large_activations_does_not_overflow(tmp_path):
    """The fuse ensemble's statistic, mean((x − mean x)²) then Log, on activations near 1000 (squares
    past float16's 65504): the square and what follows stay float32, so the result stays finite."""
    x = helper.make_tensor_value_info("x", FLOAT, [2, 16])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 1])
    w = numpy_helper.from_array((np.eye(16) * 1000).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Log", ["var"], ["y"]),
    ]
    model = _graph(nodes, [x], [y], [w])
    model16, _ = to_fp16_compute(model)
    _, types = _node_input_types(model16)
    assert types["h"] == FLOAT16 and all(types[v] == FLOAT for v in ("mean", "d", "sq", "var"))
    ort_check.skip_unless_available()
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    onnx.save(emulate_fp16(model16), str(tmp_path / "emulated.onnx"))
    feeds = {"x": rng.uniform(-1, 1, (2, 16)).astype(np.float32)}
    _compare(ort_check.run_onnx(str(tmp_path / "fp32.onnx"), feeds),
             ort_check.run_onnx(str(tmp_path / "emulated.onnx"), feeds), "variance")


def test_constants_past_the_float16_range_are_clamped_and_control_flow_stays_float32():
    x = helper.make_tensor_value_info("x", FLOAT, [4])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", FLOAT, [4])
    big = numpy_helper.from_array(np.array([1e6, -1e6, 3.0, 0.5] * 4, np.float32).reshape(4, 4), "big")
    then_g = helper.make_graph([helper.make_node("Neg", ["h"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", FLOAT, [4])])
    nodes = [helper.make_node("MatMul", ["big", "x"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_g, else_branch=else_g)]
    model16, report = to_fp16_compute(_graph(nodes, [x, flag], [y], [big]))
    onnx.checker.check_model(model16, full_check=True)
    assert report.clamped_values == 8
    stored = {i.name: numpy_helper.to_array(i) for i in model16.graph.initializer}["big"]
    assert stored.dtype == np.float16 and float(np.max(np.abs(stored))) == 65504.0
    if_node = next(n for n in model16.graph.node if n.op_type == "If")
    read = [n.input[0] for a in if_node.attribute for n in a.g.node]
    _, types = _node_input_types(model16)
    assert all(types[name] == FLOAT for name in read) and "h" not in read


# ------------------------------------------------------------------------------------------ packages

def _schema_has_precision_variants() -> bool:
    """Contract C1's object references, in the schema and in the trainer's reader (graph_path)."""
    from trainer.export import manifest_schema
    with open(os.path.join(REPO_ROOT, "docs", "manifest.schema.json"), encoding="utf-8") as f:
        return '"fp16"' in f.read() and hasattr(manifest_schema, "graph_path")


@pytest.fixture
def package(tmp_path):
    dst = tmp_path / "pkg"
    shutil.copytree(TINY, dst, ignore=shutil.ignore_patterns("reference"))
    return str(dst)


def test_the_cli_writes_variants_beside_the_graphs_and_names_them_in_the_manifest(package, capsys):
    if not _schema_has_precision_variants():
        pytest.skip("the manifest readers take no {fp32, fp16} graph references yet (helper engine-sessions)")
    assert main(["--package", package, "--graphs", "unets,ensembles"]) == 0
    with open(os.path.join(package, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["experts"][0]["unet"] == {"fp32": "experts/alpha/unet/model.onnx",
                                              "fp16": "experts/alpha/unet/model.fp16.onnx"}
    assert manifest["ensembles"][0]["graph"]["fp16"] == "ensembles/duo/model.fp16.onnx"
    assert manifest["text_encoder"] == "text_encoder/model.onnx"  # not chosen: left as it was
    assert os.path.isfile(os.path.join(package, "experts", "odd", "unet", "model.fp16.onnx"))
    assert not os.path.exists(os.path.join(package, "text_encoder", "model.fp16.onnx"))
    # a second run leaves existing variants alone; --force rewrites them
    assert add_fp16_variants(package, parse_graph_kinds("unets"), log=None) == {}
    assert len(add_fp16_variants(package, parse_graph_kinds("unets"), force=True, log=None)) == 3
    assert len(add_fp16_variants(package, parse_graph_kinds("all"), log=None)) == 3  # the text and VAE graphs


def test_cli_errors_are_one_clear_line(package, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--package", package, "--graphs", "unets,vaes"])
    assert "unknown graph kind 'vaes'" in capsys.readouterr().err
    assert main(["--package", str(tmp_path)]) == 1
    assert "has no manifest.json" in capsys.readouterr().err
    os.remove(os.path.join(package, "experts", "beta", "unet", "model.onnx"))
    with pytest.raises(ExportError, match="expert 'beta' unet: .* is missing"):
        add_fp16_variants(package, ("unets",), log=None)


def test_graph_kinds_and_paths():
    assert parse_graph_kinds("all") == ("unets", "ensembles", "text_encoder", "vae_decoder", "vae_encoder")
    assert parse_graph_kinds("vae, unet") == ("vae_decoder", "vae_encoder", "unets")
    assert fp16_path("experts/a/unet/model.onnx") == "experts/a/unet/model.fp16.onnx"
    with pytest.raises(ValueError):
        parse_graph_kinds(" , ")
    assert issubclass(ManifestError, ValueError)  # main() tells them apart from bad --graphs


def test_the_export_commands_take_cuda_fp16(package):
    """`python3 -m trainer.export --add-to … --cuda-fp16` converts the new graph alone."""
    if not _schema_has_precision_variants():
        pytest.skip("the manifest readers take no {fp32, fp16} graph references yet (helper engine-sessions)")
    from trainer.export.spec import main as export_main
    assert export_main(["--add-to", package, "--method", "fuse", "--experts", "alpha,beta", "--id", "f2",
                        "--cuda-fp16", "--check", "off"]) == 0
    with open(os.path.join(package, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    graphs = {e["id"]: e["graph"] for e in manifest["ensembles"]}
    assert isinstance(graphs["f2"], dict) and graphs["f2"]["fp16"] == fp16_path(graphs["f2"]["fp32"])
    assert os.path.isfile(os.path.join(package, graphs["f2"]["fp16"]))
    assert all(isinstance(graphs[k], str) for k in graphs if k != "f2")  # the other ensembles untouched
    assert all(isinstance(e["unet"], str) for e in manifest["experts"])


def test_attention_softmax_in_float16_leaves_the_sabw_softmax_in_float32(converted, tmp_path):
    """--attention-softmax fp16: the Softmax over a MatMul's scores computes in float16, the SABW
    weights' Softmax (over the experts axis, of a Conv's logits) stays float32; numbers still close."""
    model, default16, _ = converted["ensembles/duo"]
    model16, _ = to_fp16_compute(model, attention_softmax="fp16")
    onnx.checker.check_model(model16, full_check=True)
    _, types = _node_input_types(model16)
    softmaxes = [n for n in model16.graph.node if n.op_type == "Softmax"]
    half = [n for n in softmaxes if types[n.input[0]] == FLOAT16]
    whole = [n for n in softmaxes if types[n.input[0]] == FLOAT]
    axes = {n.name: next((a.i for a in n.attribute if a.name == "axis"), -1) for n in softmaxes}
    assert half and whole and all(axes[n.name] == -1 for n in half) and all(axes[n.name] == 1 for n in whole)
    assert len(whole) == sum(1 for n in default16.graph.node if n.op_type == "Softmax") - len(half)
    with pytest.raises(ValueError):
        to_fp16_compute(model, attention_softmax="bf16")
    ort_check.skip_unless_available()
    feeds = GRAPHS["ensembles/duo"]()
    onnx.save(emulate_fp16(model16), str(tmp_path / "emulated.onnx"))
    _compare(ort_check.run_onnx(os.path.join(TINY, "ensembles/duo/model.onnx"), feeds),
             ort_check.run_onnx(str(tmp_path / "emulated.onnx"), feeds), "duo, attention softmax fp16")

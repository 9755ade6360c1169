import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trainer.export import ort_check


def test_tensor_files_round_trip_every_dtype(tmp_path):
    tensors = {
        "f32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        "f16": np.array([1.5, -2.25], dtype=np.float16),
        "i64": np.array([[2**40, -3]], dtype=np.int64),
        "i32": np.array([7], dtype=np.int32),
        "u8": np.array([0, 255], dtype=np.uint8),
        "flag": np.array([True, False]),
        "scalar": np.array(3.0, dtype=np.float32),
    }
    path = str(tmp_path / "t.safetensors")
    ort_check.write_tensors(path, tensors)
    back = ort_check.read_tensors(path)
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape
        np.testing.assert_array_equal(back[name], value)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert header_len % 8 == 0
        assert json.loads(f.read(header_len))["i64"] == {"dtype": "I64", "shape": [1, 2], "data_offsets": [28, 44]}


def test_ort_run_passes_dtypes_through_and_reports_metadata(tmp_path):
    ort_check.skip_unless_available()
    io = [("f", TensorProto.FLOAT, ["b", 3]), ("h", TensorProto.FLOAT16, [2]), ("l", TensorProto.INT64, [2]),
          ("k", TensorProto.BOOL, [2])]
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [n + "_out"]) for n, _, _ in io]
        + [helper.make_node("Add", ["f", "f"], ["twice"])],
        "identity",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in io],
        [helper.make_tensor_value_info(n + "_out", t, s) for n, t, s in io]
        + [helper.make_tensor_value_info("twice", TensorProto.FLOAT, ["b", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = str(tmp_path / "id.onnx")
    onnx.save(model, path)
    feeds = {"f": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32),
             "h": np.array([0.5, -7.0], dtype=np.float16), "l": np.array([2**50, -1], dtype=np.int64),
             "k": np.array([True, False])}
    out = ort_check.run_onnx(path, feeds)
    for name, value in feeds.items():
        assert out[name + "_out"].dtype == value.dtype
        np.testing.assert_array_equal(out[name + "_out"], value)
    np.testing.assert_array_equal(out["twice"], feeds["f"] * 2)
    meta = ort_check.session_metadata(path)
    assert {m["name"]: m["type"] for m in meta["inputs"]} == {"f": "float32", "h": "float16", "l": "int64", "k": "bool"}
    assert meta["inputs"][0]["shape"] == ["b", 3]


def test_ort_errors_name_the_graph(tmp_path):
    ort_check.skip_unless_available()
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a graph")
    with pytest.raises(ort_check.OrtRunError, match="broken.onnx"):
        ort_check.run_onnx(str(path), {"x": np.zeros(1, np.float32)})

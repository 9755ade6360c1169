"""Graphs past protobuf's 2 GiB: torch.onnx.export writes them with one external file per tensor;
trainer.export.onnx_io rewrites them with all weights in `model.onnx_data` (or inline), and a later
rewrite does not append to the old data file. Shown on a small graph with the threshold lowered."""
import os

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from trainer.export import onnx_io
from trainer.export.onnx_io import consolidate_external_data, save_onnx, torch_export


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _per_tensor_layout(path):
    """What torch.onnx.export leaves for a graph past 2 GiB: each weight in a file named after it."""
    model = onnx.load(path)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)


def _weight_bytes(path):
    model = onnx.load(path)
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _outputs(path, module):
    """The graph's weights equal the module's (the graph itself is checked by onnx.checker)."""
    onnx.checker.check_model(path)
    model = onnx.load(path)
    stored = sorted(np.sort(onnx.numpy_helper.to_array(t).ravel())[:3].tolist() for t in model.graph.initializer)
    expected = sorted(np.sort(p.detach().numpy().ravel())[:3].tolist() for p in module.state_dict().values())
    return stored, expected


@pytest.mark.parametrize("threshold", [onnx_io.EXTERNAL_DATA_BYTES, 0])
def test_a_per_tensor_export_becomes_one_data_file_or_inline(tmp_path, monkeypatch, threshold):
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", threshold)
    module = Small().eval()
    path = str(tmp_path / "model.onnx")
    torch_export(module, (torch.zeros(1, 64),), path, ["x"], ["y"], {"x": {0: "batch"}})
    _per_tensor_layout(path)
    assert len(os.listdir(tmp_path)) == 5  # the graph and its four weights
    consolidate_external_data(path)
    expected_files = ["model.onnx"] + (["model.onnx_data"] if threshold == 0 else [])
    assert sorted(os.listdir(tmp_path)) == expected_files
    stored, expected = _outputs(path, module)
    assert stored == expected
    if threshold == 0:
        size = os.path.getsize(tmp_path / "model.onnx_data")
        assert 0 < size <= _weight_bytes(path)
        save_onnx(onnx.load(path), path)  # a rewrite (as fp16 storage does) replaces, never appends
        assert os.path.getsize(tmp_path / "model.onnx_data") == size


def test_torch_export_consolidates_what_torch_writes_per_tensor(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def large_export(module, args, path, **kwargs):
        real_export(module, args, path, **kwargs)
        _per_tensor_layout(path)  # as torch does past 2 GiB

    monkeypatch.setattr(torch.onnx, "export", large_export)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    module = Small().eval()
    path = str(tmp_path / "unet" / "model.onnx")
    torch_export(module, (torch.zeros(1, 64),), path, ["x"], ["y"], {"x": {0: "batch"}})
    assert sorted(os.listdir(tmp_path / "unet")) == ["model.onnx", "model.onnx_data"]
    stored, expected = _outputs(path, module)
    assert stored == expected


def test_an_inline_rewrite_removes_a_stale_data_file(tmp_path, monkeypatch):
    module = Small().eval()
    path = str(tmp_path / "model.onnx")
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 0)
    torch_export(module, (torch.zeros(1, 64),), path, ["x"], ["y"], {"x": {0: "batch"}})
    consolidate_external_data(path)
    save_onnx(onnx.load(path), path)
    assert os.path.exists(tmp_path / "model.onnx_data")
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_BYTES", 1 << 40)
    save_onnx(onnx.load(path), path)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]
    onnx.checker.check_model(path)

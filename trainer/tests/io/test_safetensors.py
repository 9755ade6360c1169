import json
import struct

import pytest
import torch

from trainer.io.safetensors import (load_safetensors, load_safetensors_metadata, load_state_dict_file,
                                    read_safetensors_header, save_safetensors)


def test_safetensors_round_trip_all_dtypes(tmp_path):
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "f32": torch.randn(5),
        "f16": torch.randn(2, 3).half(),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.tensor([-(2 ** 40), 3]),
        "i32": torch.tensor([[1, -2], [3, 4]], dtype=torch.int32),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i8": torch.tensor([-5, 7, 1], dtype=torch.int8),
        "u8": torch.tensor([255, 0], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt", "note": "hi"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        assert torch.equal(loaded[name], t), name
    assert load_safetensors_metadata(path) == {"format": "pt", "note": "hi"}

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["bf16"]["dtype"] == "BF16" and header["bool"]["dtype"] == "BOOL"
    assert header["f16"] == {"dtype": "F16", "shape": [2, 3], "data_offsets": header["f16"]["data_offsets"]}
    begin, end = header["f32"]["data_offsets"]
    assert raw[8 + n + begin: 8 + n + end] == tensors["f32"].numpy().astype("<f4").tobytes()
    for entry in (v for k, v in header.items() if k != "__metadata__"):
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}.get(entry["dtype"], 1)
        assert entry["data_offsets"][0] % size == 0  # aligned


def test_reads_a_file_written_byte_by_byte(tmp_path):
    """A file assembled by hand from the format description (as another writer would produce it)."""
    a = torch.tensor([[1.0, -2.0]], dtype=torch.float16)
    b = torch.tensor([7, 8, 9], dtype=torch.int32)
    header = {"__metadata__": {"k": "v"},
              "b": {"dtype": "I32", "shape": [3], "data_offsets": [0, 12]},
              "a": {"dtype": "F16", "shape": [1, 2], "data_offsets": [12, 16]}}
    hb = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + b.numpy().astype("<i4").tobytes()
                     + a.numpy().astype("<f2").tobytes())
    loaded = load_safetensors(path)
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b)
    entries, metadata, start = read_safetensors_header(path)
    assert metadata == {"k": "v"} and start == 8 + len(hb) and set(entries) == {"a", "b"}


def test_corrupt_safetensors_are_rejected(tmp_path):
    def write(header, data=b""):
        hb = json.dumps(header).encode()
        p = tmp_path / "bad.safetensors"
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
        return p

    with pytest.raises(ValueError, match="data_offsets"):
        load_safetensors(write({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4))
    with pytest.raises(ValueError, match="dtype"):
        load_safetensors(write({"x": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    with pytest.raises(ValueError, match="overlap"):
        load_safetensors(write({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                "y": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10 ** 9) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        load_safetensors(huge)


class TrainerCallbackState:
    """Stands for the pickled training objects some .ckpt files carry (not on any torch allow-list)."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "callbacks": TrainerCallbackState()}, path)
    with pytest.raises(ValueError, match="pickled objects"):
        load_state_dict_file(path)

import os

import pytest
import torch

from trainer.io.model_folders import CheckpointError
from trainer.io.training_checkpoints import list_checkpoints, load_checkpoint, save_checkpoint
from trainer.tests.small_models import tensors_equal
from trainer.training.loop import EMA


def test_checkpoint_round_trip_and_pruning(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    torch.rand(7, generator=generator)
    ema = EMA(dict(model.named_parameters()), 0.99)
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, {"net": model}, optimizer, generator, ema.state_dict(),
                               {"note": "x"}, keep=2)
    os.makedirs(tmp_path / "checkpoints" / ".tmp-step-00000040-1")  # an interrupted save is ignored
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 30]

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    fresh_gen = torch.Generator().manual_seed(99)
    loaded = load_checkpoint(path, {"net": fresh}, fresh_opt, fresh_gen)
    assert loaded.step == 30 and loaded.config["note"] == "x"
    assert tensors_equal(fresh.state_dict(), model.state_dict())
    assert torch.equal(torch.rand(5, generator=fresh_gen), torch.rand(5, generator=generator))
    saved, restored = optimizer.state_dict(), fresh_opt.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    assert saved["state"].keys() == restored["state"].keys()
    for index, entries in saved["state"].items():
        assert entries.keys() == restored["state"][index].keys()
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][index][name])), name
    assert tensors_equal(loaded.ema_state, ema.state_dict())

    wrong = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    with pytest.raises(CheckpointError, match=r"0\.weight: file \[4, 3\] vs model \[5, 3\]"):
        load_checkpoint(path, {"net": wrong})
    with pytest.raises(CheckpointError, match="does not train: net.0.bias"):
        load_checkpoint(path, {"other": model})

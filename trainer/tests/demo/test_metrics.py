import pytest
import torch

from trainer.demo import shapes
from trainer.demo.metrics import cross_family_pairs, routing_share
from trainer.demo.recipe import FAMILY_IDS


def test_cross_family_pairs_and_routing_share():
    batch = shapes.sample_batch(64, seed=4, two_object_prob=1.0, omit_prob=0.0)
    pairs = cross_family_pairs(batch)
    assert len(pairs) > 0
    for b in range(len(pairs)):
        families = {shapes.family_of(shapes.SHAPES[int(pairs.shape[b, k])]) for k in range(2)}
        assert len(families) == 2
    fam = {f: i for i, f in enumerate(FAMILY_IDS)}
    ideal = torch.zeros(len(pairs), 3, 32, 32)
    for b in range(len(pairs)):
        left = fam[shapes.family_of(shapes.SHAPES[int(pairs.shape[b, 0])])]
        right = fam[shapes.family_of(shapes.SHAPES[int(pairs.shape[b, 1])])]
        ideal[b, left, :, :16] = 1
        ideal[b, right, :, 16:] = 1
    assert routing_share(ideal, pairs) == 1.0
    assert routing_share(torch.full((len(pairs), 3, 32, 32), 1 / 3), pairs) == pytest.approx(1 / 3, abs=1e-4)

import json

import numpy as np
import onnx
import pytest
import torch

from trainer.demo import classifier as clf
from trainer.demo import shapes

TINY = clf.ClassifierConfig(widths=(8, 8, 16, 16), squeeze_channels=8, feature_dim=32)


def test_heads_and_features_have_the_documented_shapes():
    model = clf.AttributeClassifier(TINY).eval()
    out = model(torch.rand(3, 3, 64, 64))
    assert set(out) == set(clf.OUTPUT_NAMES)
    for head, classes in clf.WHOLE_HEADS.items():
        assert out[head].shape == (3, len(classes))
    for half in clf.HALVES:
        for head, classes in clf.HALF_HEADS.items():
            assert out[f"{half}_{head}"].shape == (3, len(classes))
    assert out["features"].shape == (3, 32)


def test_half_heads_read_their_own_half_of_the_feature_map():
    model = clf.AttributeClassifier(TINY).eval()
    a = shapes.sample_batch(2, seed=3, two_object_prob=1.0).images
    b = a.clone()
    b[..., 56:] = 0  # change only the right-most 8 pixel columns
    with torch.no_grad():
        fa = model.squeeze(model.backbone(clf.images_to_input(a) * 2 - 1))
        fb = model.squeeze(model.backbone(clf.images_to_input(b) * 2 - 1))
    assert fa.shape[-2:] == (8, 8)
    # the left half's columns lie outside the receptive field of the change; the last column does not
    assert torch.allclose(fa[..., :4], fb[..., :4], atol=1e-6)
    assert not torch.allclose(fa[..., 7], fb[..., 7])


def test_training_runs_checkpoints_and_resumes(tmp_path):
    path = str(tmp_path / "state.pt")
    torch.manual_seed(0)
    model = clf.AttributeClassifier(TINY)
    first = clf.train_classifier(model, steps=2, batch_size=8, seed=0, checkpoint_path=path, eval_n=16)
    assert first.steps == 2 and len(first.losses) == 2 and all(np.isfinite(first.losses))
    assert set(first.accuracy) >= {"background", "shape", "left_colour", "right_size", "min"}
    resumed = clf.train_classifier(clf.AttributeClassifier(TINY), steps=3, batch_size=8, seed=0, checkpoint_path=path,
                                   eval_n=16)
    assert resumed.steps == 3 and len(resumed.losses) == 1  # only the missing step ran


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = clf.AttributeClassifier(TINY)
    result = clf.train_classifier(model, steps=12, batch_size=16, lr=3e-3, seed=1, eval_n=16)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])


def test_onnx_export_names_every_head(tmp_path):
    model = clf.AttributeClassifier(TINY)
    path = str(tmp_path / "eval" / "classifier.onnx")
    meta_path = clf.export_classifier_onnx(model, path, accuracy={"shape": 0.5}, fp16=True)
    graph = onnx.load(path)
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.graph.initializer)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == list(clf.OUTPUT_NAMES)
    meta = json.load(open(meta_path))
    assert meta["heads"]["shape"] == list(shapes.SHAPES)
    assert meta["heads"]["left_colour"] == list(shapes.COLOURS)
    assert meta["accuracy_on_renders"] == {"shape": 0.5}
    assert meta["features"]["dim"] == 32


def _perfect(batch):
    """Predictions that read every label back exactly."""
    pred = {"background": batch.background.clone(), "count": batch.num_objects - 1}
    for a in ("colour", "shape", "size", "position"):
        pred[a] = getattr(batch, a)[:, 0].clamp(min=0)
    for slot, half in enumerate(clf.HALVES):
        for a in clf.HALF_HEADS:
            pred[f"{half}_{a}"] = getattr(batch, a)[:, slot].clamp(min=0)
    return pred


def test_adherence_of_perfect_and_wrong_readings():
    batch = shapes.sample_batch(200, seed=11, two_object_prob=0.4)
    pred = _perfect(batch)
    scores = clf.adherence(pred, batch)
    for key in ("background", "colour", "shape", "size", "position", "count", "full", "single_full", "pair_full"):
        assert scores[key] == 1.0, key
    single = (batch.num_objects == 1) & batch.stated[:, 0, shapes.ATTRIBUTES.index("colour")]
    wrong = dict(pred)
    wrong["colour"] = (pred["colour"] + 1) % len(shapes.COLOURS)
    scores = clf.adherence(wrong, batch)
    stated_colours = single.sum() + batch.stated[batch.num_objects == 2][:, :, 0].sum()
    assert scores["colour"] == pytest.approx(1 - float(single.sum()) / float(stated_colours), abs=1e-6)
    assert scores["single_full"] < 1.0 and scores["pair_full"] == 1.0


def _pair(positions_stated: bool):
    batch = shapes.sample_batch(1, seed=0, two_object_prob=1.0, omit_prob=0.0)
    batch.colour[0] = torch.tensor([0, 4])
    batch.shape[0] = torch.tensor([0, 2])
    batch.stated[0, :, shapes.ATTRIBUTES.index("position")] = positions_stated
    return batch


@pytest.mark.parametrize("positions_stated", [True, False])
def test_a_swapped_pair_fails_only_when_positions_were_stated(positions_stated):
    batch = _pair(positions_stated)
    pred = _perfect(batch)
    for a in clf.HALF_HEADS:  # the model drew the right object on the left and vice versa
        pred[f"left_{a}"], pred[f"right_{a}"] = pred[f"right_{a}"].clone(), pred[f"left_{a}"].clone()
    scores = clf.adherence(pred, batch)
    if positions_stated:
        assert scores["position"] == 0.0 and scores["shape"] == 0.0 and scores["full"] == 0.0
    else:
        assert np.isnan(scores["position"]) and scores["shape"] == 1.0 and scores["full"] == 1.0


def test_a_pair_with_one_object_missing_is_not_placed():
    batch = _pair(True)
    pred = _perfect(batch)
    pred["count"] = torch.tensor([0])
    scores = clf.adherence(pred, batch)
    assert scores["position"] == 0.0 and scores["count"] == 0.0 and scores["full"] == 0.0


def test_frechet_distance():
    rng = np.random.RandomState(0)
    a = rng.randn(4000, 8)
    b = rng.randn(4000, 8)
    assert clf.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert clf.frechet_distance(a, b) < 0.05
    shift = np.array([3.0, 0, 0, 0, 0, 0, 0, 0])
    assert clf.frechet_distance(a, b + shift) == pytest.approx(9.0, abs=0.3)
    # doubled spread in every dimension: Tr(Σa + Σb - 2√(ΣaΣb)) = 8 · (1 + 4 - 2·2) = 8
    assert clf.frechet_distance(a, 2 * b) == pytest.approx(8.0, abs=0.5)


def test_augment_is_seeded_and_stays_in_range():
    x = clf.images_to_input(shapes.sample_batch(6, seed=2).images)
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    a, b = clf.augment(x, g1), clf.augment(x, g2)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0


@pytest.mark.parametrize("fp16,tolerance", [(False, 1e-4), (True, 2e-2)])
def test_exported_graph_matches_torch_in_onnxruntime(tmp_path, fp16, tolerance):
    from trainer.export import ort_check

    ort_check.skip_unless_available()
    torch.manual_seed(1)
    model = clf.AttributeClassifier(TINY)
    clf.train_classifier(model, steps=2, batch_size=8, seed=0, eval_n=8)  # non-trivial BatchNorm statistics
    model.eval()
    path = str(tmp_path / "classifier.onnx")
    clf.export_classifier_onnx(model, path, fp16=fp16)
    assert not model.training  # exporting leaves the model as it was
    images = clf.images_to_input(shapes.sample_batch(3, seed=9, two_object_prob=0.5).images)
    outputs = ort_check.run_onnx(path, {"image": images.numpy()})
    with torch.no_grad():
        expected = model(images)
    for name in clf.OUTPUT_NAMES:
        assert np.allclose(outputs[name], expected[name].numpy(), atol=tolerance, rtol=tolerance), name

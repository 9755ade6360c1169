"""Re-laying a package so that every U-Net-bearing graph reads one weights file (trainer.export.shared_weights),
on a copy of the tiny fixture (experts alpha, beta, odd; ensembles duo = afa and fuse = fuse over alpha + beta)."""
import json
import os
import shutil

import numpy as np
import pytest

from trainer import REPO_ROOT
from trainer.export import ort_check, shared_weights
from trainer.export import spec as export_spec
from trainer.export.errors import ExportError
from trainer.export.manifest import validate_manifest
from trainer.export.shared_weights import (DATA_NAME, check_unchanged, external_files, random_feeds,
                                           relayout_package)

TINY = os.path.join(REPO_ROOT, "test", "fixtures", "tiny")
IDS = ["alpha", "beta", "odd", "duo", "fuse"]


def manifest_of(package):
    with open(os.path.join(package, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def files_of(package):
    return sorted(os.path.relpath(os.path.join(root, f), package) for root, _, files in os.walk(package)
                  for f in files)


@pytest.fixture(scope="module")
def relaid(tmp_path_factory):
    """A copy of the tiny fixture re-laid (checked in onnxruntime), with the graphs' outputs before and after."""
    ort_check.skip_unless_available()
    root = tmp_path_factory.mktemp("relayout")
    before, package = str(root / "before"), str(root / "pkg")
    shutil.copytree(TINY, before)
    shutil.copytree(TINY, package)
    old = manifest_of(before)
    graphs = {e["id"]: e["unet"] for e in old["experts"]} | {e["id"]: e["graph"] for e in old["ensembles"]}
    stats = relayout_package(package, check=True, log=None)
    return {"before": before, "package": package, "graphs": graphs, "stats": stats}


def test_every_unet_bearing_graph_moves_into_unets_and_reads_one_data_file(relaid):
    package, manifest = relaid["package"], manifest_of(relaid["package"])
    assert {e["id"]: e["unet"] for e in manifest["experts"]} == {i: f"unets/{i}.onnx" for i in ("alpha", "beta", "odd")}
    assert {e["id"]: e["graph"] for e in manifest["ensembles"]} == {"duo": "unets/duo.onnx", "fuse": "unets/fuse.onnx"}
    validate_manifest(manifest, package)
    unets = sorted(f for f in files_of(package) if f.startswith("unets/"))
    assert unets == sorted([f"unets/{i}.onnx" for i in IDS] + [f"unets/{i}.config.json" for i in ("alpha", "beta", "odd")]
                           + [f"unets/{DATA_NAME}"])
    assert not os.path.exists(os.path.join(package, "experts")) and not os.path.exists(os.path.join(package, "ensembles"))
    for i in IDS:
        assert external_files(os.path.join(package, "unets", f"{i}.onnx")) == [DATA_NAME]
    for i in ("alpha", "beta", "odd"):  # the config beside each expert graph moved with it, unchanged
        with open(os.path.join(relaid["before"], "experts", i, "unet", "config.json"), "rb") as f:
            want = f.read()
        with open(os.path.join(package, "unets", f"{i}.config.json"), "rb") as f:
            assert f.read() == want
    # everything outside the graphs is as it was
    rest = [f for f in files_of(relaid["before"]) if not f.startswith(("experts/", "ensembles/", "manifest.json"))]
    assert rest and all(f in files_of(package) for f in rest)


def test_each_tensor_is_stored_once(relaid):
    stats, before = relaid["stats"], relaid["before"]
    assert stats["graphs"] == 5 and stats["unique"] < stats["tensors"]
    old = sum(os.path.getsize(os.path.join(before, g)) for g in relaid["graphs"].values())
    new = sum(os.path.getsize(os.path.join(relaid["package"], "unets", f)) for f in os.listdir(
        os.path.join(relaid["package"], "unets")) if f.endswith((".onnx", DATA_NAME)))
    # duo and fuse hold alpha's and beta's weights again: those bytes are now stored once
    assert new < old - 0.9 * (os.path.getsize(os.path.join(before, relaid["graphs"]["alpha"])) +
                              os.path.getsize(os.path.join(before, relaid["graphs"]["beta"])))
    assert os.path.getsize(os.path.join(relaid["package"], "unets", DATA_NAME)) == stats["bytes"]


def test_the_moved_graphs_compute_bit_identical_outputs(relaid):
    for ident, old in relaid["graphs"].items():
        before = os.path.join(relaid["before"], old)
        feeds = random_feeds(before, seed=11)
        want = ort_check.run_onnx(before, feeds)
        got = ort_check.run_onnx(os.path.join(relaid["package"], "unets", f"{ident}.onnx"), feeds)
        assert set(got) == set(want)
        for name in want:
            assert np.array_equal(got[name], want[name]), (ident, name)


def test_running_it_again_changes_no_path(relaid, tmp_path):
    again = str(tmp_path / "again")
    shutil.copytree(relaid["package"], again)
    relayout_package(again, check=True, log=None)
    assert manifest_of(again) == manifest_of(relaid["package"])
    assert files_of(again) == files_of(relaid["package"])


def test_the_check_refuses_a_graph_whose_outputs_change(relaid):
    before = relaid["before"]
    alpha, beta = (os.path.join(before, relaid["graphs"][i]) for i in ("alpha", "beta"))
    with pytest.raises(ExportError, match="changes output 'out_sample'"):
        check_unchanged([(alpha, beta)], check=True)
    assert check_unchanged([(alpha, alpha)], check=True) == 1


def test_a_failed_check_leaves_the_package_as_it_was(tmp_path, monkeypatch):
    package = str(tmp_path / "pkg")
    shutil.copytree(TINY, package)
    listed, manifest = files_of(package), manifest_of(package)

    def differs(pairs, check, log=None):
        raise ExportError(f"{pairs[0][0]}: its rewritten copy changes output 'out_sample'")
    monkeypatch.setattr(shared_weights, "check_unchanged", differs)
    with pytest.raises(ExportError, match="changes output"):
        relayout_package(package, check=True, log=None)
    assert files_of(package) == listed and manifest_of(package) == manifest


def test_the_command(tmp_path, capsys):
    package = str(tmp_path / "pkg")
    shutil.copytree(TINY, package)
    assert export_spec.main(["--relayout", package, "--folder", "graphs", "--check", "off"]) == 0
    assert manifest_of(package)["experts"][0]["unet"] == "graphs/alpha.onnx"
    assert export_spec.main(["--relayout", str(tmp_path / "nothing")]) == 1
    assert "has no manifest.json" in capsys.readouterr().err
    assert export_spec.main(["--relayout", package, "--folder", "../out"]) == 1
    assert "a folder name inside the package" in capsys.readouterr().err

import copy
import json
import os
import shutil

import pytest

from trainer import REPO_ROOT
from trainer.export.errors import ManifestError
from trainer.export.manifest import validate_manifest, write_manifest

FIXTURE = os.path.join(REPO_ROOT, "test", "fixtures", "tiny")


def fixture_manifest():
    with open(os.path.join(FIXTURE, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def test_the_fixture_manifest_is_valid():
    if not os.path.isfile(os.path.join(FIXTURE, "manifest.json")):
        pytest.skip("test/fixtures/tiny is not built")
    validate_manifest(fixture_manifest(), FIXTURE)


@pytest.mark.parametrize("mutate, problem", [
    (lambda m: m.update(format_version=2), "format_version must be 1"),
    (lambda m: m.update(format="other"), "format must be 'ensemble-diffusion-package'"),
    (lambda m: m["ensembles"][0]["experts"].append("nobody"), "names unknown expert 'nobody'"),
    (lambda m: m["experts"].append(dict(m["experts"][0])), "the id 'alpha' is used twice"),
    (lambda m: m["defaults"].update(width=30), "defaults.width 30 is not a multiple of latent.downsample 4"),
    (lambda m: m["defaults"].update(scheduler="plms"), "defaults.scheduler must be one of"),
    (lambda m: m["size"].update(min=128), "size.min 128 > size.max 64"),
    (lambda m: m["experts"][0].pop("unet"), "needs \"unet\" (a graph) or \"path\""),
    (lambda m: m.update(extra=1), "unknown key 'extra'"),
    (lambda m: m["latent"].update(scale_factor=0), "latent.scale_factor must be a positive number"),
    (lambda m: m["ensembles"][0].update(experts=["alpha"]), "ensembles[0].experts must be a list of at least 2 items"),
])
def test_manifest_problems_are_named(mutate, problem):
    m = copy.deepcopy(fixture_manifest()) if os.path.isfile(os.path.join(FIXTURE, "manifest.json")) else None
    if m is None:
        pytest.skip("test/fixtures/tiny is not built")
    mutate(m)
    with pytest.raises(ManifestError) as err:
        validate_manifest(m)
    assert problem in str(err.value)


def test_manifest_files_and_graph_io_are_checked(tmp_path):
    if not os.path.isfile(os.path.join(FIXTURE, "manifest.json")):
        pytest.skip("test/fixtures/tiny is not built")
    package = tmp_path / "pkg"
    shutil.copytree(FIXTURE, package)
    m = fixture_manifest()
    os.remove(package / "experts" / "beta" / "unet" / "model.onnx")
    with pytest.raises(ManifestError, match=r"expert 'beta' unet: experts/beta/unet/model.onnx is missing"):
        write_manifest(str(package), m)
    shutil.copyfile(package / "experts" / "alpha" / "unet" / "model.onnx",
                    package / "experts" / "beta" / "unet" / "model.onnx")
    # the ensemble graph must take expert_mask when the manifest promises subsets: alpha's U-Net does not
    m["ensembles"][0]["graph"] = "experts/alpha/unet/model.onnx"
    with pytest.raises(ManifestError, match=r"ensemble 'duo' graph lacks input 'expert_mask', output 'contributions'"):
        write_manifest(str(package), m)
    m["ensembles"][0]["graph"] = "../outside.onnx"
    with pytest.raises(ManifestError, match="leaves the package folder"):
        write_manifest(str(package), m)
    m = fixture_manifest()
    path = write_manifest(str(package), m)
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == m

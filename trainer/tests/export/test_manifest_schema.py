"""trainer/export/manifest_schema.py accepts and rejects the same examples as the engine's zod reader
(test/manifest-schema.test.ts runs over the same folder, test/fixtures/manifest/) and fills in the
same defaults; both read the rules from docs/manifest.schema.json."""
import copy
import json
import os

import jsonschema
import pytest

from trainer.export import manifest_schema as ms


def _repo_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    while not os.path.isfile(os.path.join(here, "package.json")):
        parent = os.path.dirname(here)
        assert parent != here, "no package.json above this test: where is the repository?"
        here = parent
    return here


ROOT = _repo_root()
EXAMPLES = os.path.join(ROOT, "test", "fixtures", "manifest")


def read_json(*parts: str):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def examples(kind: str):
    return sorted(f for f in os.listdir(os.path.join(EXAMPLES, kind)) if f.endswith(".json") and f != "reasons.json")


REASONS = read_json(EXAMPLES, "invalid", "reasons.json")


def test_the_schema_is_the_repositorys_and_a_valid_json_schema():
    assert os.path.samefile(ms.find_schema(), os.path.join(ROOT, "docs", "manifest.schema.json"))
    schema = ms.load_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_invalid_example_has_its_reason():
    assert len(examples("valid")) >= 4 and len(examples("invalid")) >= 10
    assert examples("invalid") == sorted(REASONS)


@pytest.mark.parametrize("name", examples("valid"))
def test_accepts_valid_example(name):
    assert ms.manifest_problems(read_json(EXAMPLES, "valid", name)) == []


@pytest.mark.parametrize("real", ["models/demo/manifest.json", "test/fixtures/tiny/manifest.json"])
def test_accepts_the_real_manifests(real):
    if not os.path.isfile(os.path.join(ROOT, real)):
        pytest.skip(f"{real} is not there")
    ms.validate(read_json(ROOT, real))


@pytest.mark.parametrize("name", examples("invalid"))
def test_rejects_invalid_example(name):
    problems = ms.manifest_problems(read_json(EXAMPLES, "invalid", name))
    assert problems, f"accepted {name} ({REASONS[name]['reason']})"
    for line in problems:
        assert line and "\n" not in line
    mentions = REASONS[name]["mentions"]
    if mentions:
        assert any(mentions in line for line in problems), f"no problem names {mentions}: {problems}"
    with pytest.raises(ms.ManifestSchemaError) as err:
        ms.validate(read_json(EXAMPLES, "invalid", name))
    assert err.value.problems == problems and isinstance(err.value, ValueError)


def test_defaults_are_what_the_engine_fills_in():
    # with-defaults.json is checked against zod's output by test/manifest-schema.test.ts
    want = read_json(EXAMPLES, "with-defaults.json")
    assert want
    for name, full in want.items():
        given = read_json(EXAMPLES, "valid", name)
        before = copy.deepcopy(given)
        assert ms.with_defaults(given) == full, name
        assert given == before, "with_defaults changed its argument"


def test_an_ensemble_without_subsets_is_not_promised_to_run_on_a_subset():
    full = ms.with_defaults(read_json(EXAMPLES, "valid", "minimal.json"))
    assert full["ensembles"][0]["subsets"] is False
    assert ms.load_schema()["properties"]["ensembles"]["items"]["properties"]["subsets"]["default"] is False


def test_messages_name_the_field():
    m = read_json(EXAMPLES, "valid", "minimal.json")
    m["defaults"]["steps"] = 0
    m["latent"]["scale_factor"] = "big"
    m["experts"][1]["id"] = "b c"
    m["ensembles"][0]["extra"] = 1
    del m["name"]
    problems = ms.manifest_problems(m)
    assert "defaults.steps must be an integer in 1..1000, got 0" in problems
    assert "latent.scale_factor must be a positive number, got 'big'" in problems
    assert any(p.startswith("experts[1].id must be a string matching") for p in problems)
    assert "unknown key 'ensembles[0].extra'" in problems
    assert "name is required" in problems
    assert ms.manifest_problems("nope") == ["the manifest must be an object, got 'nope'"]


def test_patterns_read_as_javascript_does():
    m = read_json(EXAMPLES, "valid", "minimal.json")
    m["experts"].append({"id": "c\n", "unet": "c.onnx"})
    assert ms.manifest_problems(m) == [
        "experts[2].id must be a string matching ^[A-Za-z0-9][A-Za-z0-9_.-]*$, got 'c\\n'"]


def test_cross_field_rules_run_once_the_schema_passes():
    m = read_json(EXAMPLES, "valid", "minimal.json")
    m["ensembles"][0]["experts"] = ["a", "nobody"]
    m["defaults"]["steps"] = 0
    assert ms.manifest_problems(m) == ["defaults.steps must be an integer in 1..1000, got 0"]
    m["defaults"]["steps"] = 4
    assert ms.manifest_problems(m) == ["ensembles[0].experts[1] names unknown expert 'nobody'"]


def test_graph_path_picks_a_precision_as_the_engine_does():
    assert ms.graph_path("unet/model.onnx") == "unet/model.onnx"
    assert ms.graph_path("unet/model.onnx", "fp16") == "unet/model.onnx"  # a plain path computes in fp32
    both = {"fp32": "u/model.onnx", "fp16": "u/model.fp16.onnx"}
    assert ms.graph_path(both) == "u/model.onnx" and ms.graph_path(both, "fp16") == "u/model.fp16.onnx"
    assert ms.graph_path({"fp16": "u/model.fp16.onnx"}) == "u/model.fp16.onnx"  # the other one when absent
    assert ms.graph_path({"fp32": "u/model.onnx"}, "fp16") == "u/model.onnx"
    assert ms.graph_variants(both) == both
    for bad in ({}, {"bf16": "x"}, {"fp32": "x", "int8": "y"}, 7):
        with pytest.raises(ValueError, match="graph reference"):
            ms.graph_path(bad)
    with pytest.raises(ValueError, match="precision"):
        ms.graph_path("x", "fp64")


def test_every_graph_variant_of_a_package_is_checked(tmp_path):
    from trainer.export.manifest import validate_manifest
    from trainer.export.errors import ManifestError
    tiny = os.path.join(ROOT, "test", "fixtures", "tiny")
    manifest = read_json(tiny, "manifest.json")
    validate_manifest(manifest, tiny)
    variants = copy.deepcopy(manifest)
    variants["vae_decoder"] = {"fp32": manifest.get("vae_decoder", "vae_decoder/model.onnx"),
                               "fp16": "vae_decoder/model.fp16.onnx"}
    with pytest.raises(ManifestError, match=r"vae_decoder \(fp16\): vae_decoder/model.fp16.onnx is missing"):
        validate_manifest(variants, tiny)
    # a variant must have its role's inputs too: the text encoder's graph is no VAE decoder
    variants["vae_decoder"]["fp16"] = manifest.get("text_encoder", "text_encoder/model.onnx")
    with pytest.raises(ManifestError, match="vae_decoder graph lacks input 'latent_sample'"):
        validate_manifest(variants, tiny)

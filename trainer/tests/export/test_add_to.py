"""`python3 -m trainer.export --add-to PKG --method fuse|afa` (trainer/export/add_to.py)."""
import copy
import hashlib
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch

from trainer.export import add_to, ort_check, shared_weights
from trainer.export import spec as export_spec
from trainer.export.errors import ExportError
from trainer.export.fp16 import round_weights_fp16
from trainer.export.manifest import validate_manifest
from trainer.export.onnx_io import graph_signature
from trainer.export.package import EnsembleSpec, save_package
from trainer.export.shared_weights import DATA_NAME, external_files, random_feeds
from trainer.io import model_folders
from trainer.models.afa import AFAEnsemble
from trainer.models.fusion import FusionEnsemble
from trainer.models.text_encoder import CLIPTextEncoder, TextEncoderConfig
from trainer.models.unet import CROSS_ATTN_DOWN, CROSS_ATTN_UP, UNet2DConditionModel, UNetConfig
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.text.bpe import train_bpe

D = 16
AFA_INPUTS = ["sample", "timestep", "encoder_hidden_states", "expert_mask"]


def unet(seed):
    torch.manual_seed(seed)
    return UNet2DConditionModel(UNetConfig(
        sample_size=8, block_out_channels=(8,), layers_per_block=1, down_block_types=(CROSS_ATTN_DOWN,),
        up_block_types=(CROSS_ATTN_UP,), attention_head_dim=2, cross_attention_dim=D, norm_num_groups=4)).eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A package exported from PyTorch models (float16 storage): experts a, b, c and the AFA ensemble duo = [a, b]."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("add-to")
    vocab, _ = train_bpe(["a red circle", "a blue square on the left"], 520, str(root / "tok"))
    torch.manual_seed(0)
    text_encoder = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=len(vocab), hidden_size=D,
                                                          eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1))
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    experts = {"a": unet(1), "b": unet(2), "c": unet(3)}
    duo = AFAEnsemble([experts["a"], experts["b"]], hidden=8, depth=1, heads=2, head_dim=4).eval()
    torch.manual_seed(4)
    for sabw in duo.aggregators:
        torch.nn.init.normal_(sabw.to_logits.weight, std=0.5)
    fields = {"name": "made", "defaults": {"steps": 4, "guidance": 3.0, "scheduler": "ddim", "width": 16, "height": 16},
              "size": {"min": 8, "max": 32}}
    save_package(str(root / "pkg"), str(root / "tok"), text_encoder, vae, experts,
                 {"duo": EnsembleSpec(duo, ["a", "b"], subsets=True)}, {"num_train_timesteps": 1000}, fields,
                 fp16=True, check=False, vae_encoder=False, log=None)
    return {"root": root, "package": str(root / "pkg"), "experts": experts, "duo": duo}


@pytest.fixture
def package(made, tmp_path):
    path = str(tmp_path / "pkg")
    shutil.copytree(made["package"], path)
    return path


def manifest(package):
    with open(os.path.join(package, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def snapshot(package):
    """Every file of the package with the hash of its bytes."""
    out = {}
    for folder, _, files in os.walk(package):
        for f in files:
            path = os.path.join(folder, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, package)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def external_places(path):
    """(offset, length) of every external tensor of a graph, each place once."""
    model = onnx.load(path, load_external_data=False)
    places = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            places.add((int(info["offset"]), int(info["length"])))
    return places


def feeds(n, batch=2, size=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, 4, *size, generator=g).numpy(),
            "timestep": np.array([900.0, 30.0][:batch], np.float32),
            "encoder_hidden_states": torch.randn(n, batch, 77, D, generator=g).numpy(),
            "expert_mask": np.ones(n, np.float32)}


def torch_run(module, f):
    with torch.no_grad():
        out, weights = module(*(torch.from_numpy(v) for v in (f["sample"], f["timestep"], f["encoder_hidden_states"],
                                                              f["expert_mask"])))
    from trainer.models.afa import contribution_map
    return out.numpy(), contribution_map(weights, f["sample"].shape[-2:]).numpy()


def trained_run(made, run):
    """An AFA ensemble over experts b and c with non-trivial aggregators, saved as a training run saves it."""
    trained = AFAEnsemble([made["experts"]["b"], made["experts"]["c"]], hidden=8, depth=1, heads=2, head_dim=4)
    torch.manual_seed(9)
    for sabw in trained.aggregators:
        torch.nn.init.normal_(sabw.to_logits.weight, std=0.5)
    model_folders.save_aggregators(trained, run / "final" / "afa", {"expert_ids": ["b", "c"]})
    return trained


def assert_computes(graph, trained):
    """The graph gives the float16-stored ensemble's outputs and contribution maps."""
    f = feeds(2, seed=5)
    rounded = copy.deepcopy(trained)
    rounded.unets = torch.nn.ModuleList([round_weights_fp16(u) for u in trained.unets])
    rounded.aggregators = round_weights_fp16(trained.aggregators)
    want_out, want_maps = torch_run(rounded.eval(), f)
    got = ort_check.run_onnx(graph, f)
    np.testing.assert_allclose(got["out_sample"], want_out, atol=1e-4)
    np.testing.assert_allclose(got["contributions"], want_maps, atol=1e-5)


def test_add_fuse_writes_a_valid_manifest_and_a_graph_that_computes_the_fusion(made, package):
    before = snapshot(package)
    entry = add_to.add_fuse(package, ["a", "b", "c"], ens_id="fuse3", temperature=0.7, check="auto", log=None)
    m = manifest(package)
    validate_manifest(m, package)
    assert m["ensembles"][-1] == entry
    assert entry == {"id": "fuse3", "title": "Fuse3 (Fuse)", "method": "fuse", "experts": ["a", "b", "c"],
                     "graph": "ensembles/fuse3/model.onnx", "subsets": True, "description": entry["description"]}
    assert "temperature 0.7" in entry["description"]
    inputs, outputs = graph_signature(os.path.join(package, entry["graph"]))
    assert list(inputs) == AFA_INPUTS and list(outputs) == ["out_sample", "contributions"]
    assert outputs["contributions"] == "float32[batch,3,height,width]"
    # nothing else changed but the manifest
    after = snapshot(package)
    assert {k: v for k, v in after.items() if k != "manifest.json" and not k.startswith("ensembles/fuse3/")} == \
        {k: v for k, v in before.items() if k != "manifest.json"}
    assert not [f for f in os.listdir(os.path.join(package, "ensembles")) if f.startswith(".")]
    # the graph is the fusion of the ORIGINAL experts (read back from the package's graphs: float16-rounded)
    ort_check.skip_unless_available()
    experts = [round_weights_fp16(made["experts"][e]) for e in ("a", "b", "c")]
    f = feeds(3)
    want_out, want_maps = torch_run(FusionEnsemble(experts, temperature=0.7).eval(), f)
    got = ort_check.run_onnx(os.path.join(package, entry["graph"]), f)
    np.testing.assert_allclose(got["out_sample"], want_out, atol=1e-4)
    np.testing.assert_allclose(got["contributions"], want_maps, atol=1e-5)
    np.testing.assert_allclose(got["contributions"].sum(1), 1.0, atol=1e-5)


def test_a_fuse_graph_over_the_experts_of_an_afa_graph_shares_its_weights(made, package):
    duo_before = os.path.join(str(made["root"]), "pkg", "ensembles", "duo", "model.onnx")
    entry = add_to.add_fuse(package, ["a", "b"], ens_id="fuse", check="auto", log=None)
    assert entry["graph"] == "ensembles/duo/fuse.onnx"
    folder = os.path.join(package, "ensembles", "duo")
    assert sorted(os.listdir(folder)) == sorted(["model.onnx", "fuse.onnx", DATA_NAME])
    assert external_files(os.path.join(folder, "model.onnx")) == [DATA_NAME]
    assert external_files(os.path.join(folder, "fuse.onnx")) == [DATA_NAME]
    validate_manifest(manifest(package), package)
    # one copy of the experts' weights: every weight of the fuse graph is one the AFA graph reads too
    afa, fuse = (external_places(os.path.join(folder, f)) for f in ("model.onnx", "fuse.onnx"))
    assert len(fuse) >= 10 and fuse <= afa
    assert os.path.getsize(os.path.join(folder, DATA_NAME)) < sum(length for _, length in afa) + 64 * len(afa)
    # the AFA graph computes exactly what it did; the fuse graph runs
    ort_check.skip_unless_available()
    f = feeds(2)
    old, new = ort_check.run_onnx(duo_before, f), ort_check.run_onnx(os.path.join(folder, "model.onnx"), f)
    for name in ("out_sample", "contributions"):
        np.testing.assert_array_equal(old[name], new[name])
    fused = ort_check.run_onnx(os.path.join(folder, "fuse.onnx"), f)
    want_out, _ = torch_run(FusionEnsemble([round_weights_fp16(made["experts"][e]) for e in "ab"]).eval(), f)
    np.testing.assert_allclose(fused["out_sample"], want_out, atol=1e-4)


def test_duplicates_and_bad_requests_are_refused_and_nothing_is_written(package, capsys):
    add_to.add_fuse(package, ["a", "c"], ens_id="ac", check=False, log=None)
    before = snapshot(package)
    with pytest.raises(ExportError, match="already has an ensemble 'ac'.*--force"):
        add_to.add_fuse(package, ["a", "c"], ens_id="ac", check=False, log=None)
    with pytest.raises(ExportError, match="already has an ensemble 'duo'"):
        add_to.add_fuse(package, ["a", "b"], ens_id="duo", check=False, log=None)
    with pytest.raises(ExportError, match="'a' is an expert"):
        add_to.add_fuse(package, ["b", "c"], ens_id="a", check=False, log=None)
    with pytest.raises(ExportError, match="no expert 'zz'"):
        add_to.add_fuse(package, ["a", "zz"], ens_id="x", check=False, log=None)
    with pytest.raises(ExportError, match="at least 2 distinct"):
        add_to.add_fuse(package, ["a", "a"], ens_id="x", check=False, log=None)
    # the command: one line, exit status 1
    assert export_spec.main(["--add-to", package, "--method", "fuse", "--experts", "a,c", "--id", "ac",
                             "--check", "off"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("add-to failed:") and "already has an ensemble 'ac'" in err[0]
    assert export_spec.main(["--add-to", package, "--method", "afa", "--check", "off"]) == 1
    assert "--aggregator RUN_DIR" in capsys.readouterr().err
    assert export_spec.main(["--add-to", package, "--method", "fuse", "--experts", "a,c", "--temperature", "0",
                             "--check", "off"]) == 1
    assert "--temperature must be > 0" in capsys.readouterr().err
    assert snapshot(package) == before


def test_force_replaces_an_ensemble(package):
    add_to.add_fuse(package, ["a", "b"], ens_id="fuse", temperature=0.5, check=False, log=None)
    first = snapshot(package)["ensembles/duo/fuse.onnx"]
    entry = add_to.add_fuse(package, ["a", "b"], ens_id="fuse", temperature=2.0, force=True, check=False, log=None)
    m = manifest(package)
    assert [e["id"] for e in m["ensembles"]] == ["duo", "fuse"] and m["ensembles"][1] == entry
    assert "temperature 2" in entry["description"]
    assert snapshot(package)["ensembles/duo/fuse.onnx"] != first
    validate_manifest(m, package)


def test_a_failure_leaves_the_package_as_it_was(package, monkeypatch):
    before = snapshot(package)

    def broken(*args, **kwargs):
        raise ExportError("disk full")

    monkeypatch.setattr(shared_weights, "write_manifest_atomically", broken)
    with pytest.raises(ExportError, match="disk full"):
        add_to.add_fuse(package, ["a", "b"], ens_id="fuse", check=False, log=None)  # after the folder moved
    assert snapshot(package) == before
    assert sorted(os.listdir(os.path.join(package, "ensembles"))) == ["duo"]


def test_cli_adds_a_trained_afa_aggregator(made, package, tmp_path):
    run = tmp_path / "run"
    trained = trained_run(made, run)
    assert export_spec.main(["--add-to", package, "--method", "afa", "--aggregator", str(run), "--id", "bc",
                             "--title", "B+C (AFA)", "--subsets"]) == 0
    entry = manifest(package)["ensembles"][-1]
    assert entry["method"] == "afa" and entry["experts"] == ["b", "c"] and entry["title"] == "B+C (AFA)"
    assert entry["graph"] == "ensembles/bc/model.onnx" and entry["subsets"] is True
    validate_manifest(manifest(package), package)
    ort_check.skip_unless_available()
    assert_computes(os.path.join(package, entry["graph"]), trained)


def test_experts_listed_in_sources_json_are_loaded_from_their_files(made, package, tmp_path):
    """An imported package names each expert's checkpoint (contract C2): add-to reads those weights."""
    other = unet(99)
    model_folders.save_unet(other, tmp_path / "other" / "unet")
    with open(os.path.join(package, "sources.json"), "w", encoding="utf-8") as f:
        json.dump({"experts": {"a": {"path": str(tmp_path / "other"), "format": "diffusers", "sha256": "0"}}}, f)
    messages = []
    entry = add_to.add_fuse(package, ["a", "c"], ens_id="ac", fp16=False, check="auto", log=messages.append)
    assert any("expert a: weights from" in m for m in messages)
    assert any("expert c: weights read back from experts/c/unet/model.onnx" in m for m in messages)
    ort_check.skip_unless_available()
    f = feeds(2, seed=6)
    want_out, _ = torch_run(FusionEnsemble([other, round_weights_fp16(made["experts"]["c"])]).eval(), f)
    np.testing.assert_allclose(ort_check.run_onnx(os.path.join(package, entry["graph"]), f)["out_sample"],
                               want_out, atol=1e-4)
    os.remove(str(tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors"))
    shutil.rmtree(str(tmp_path / "other"))
    with pytest.raises(ExportError, match="sources.json names .*other, which is missing"):
        add_to.add_fuse(package, ["a", "b"], ens_id="ab2", check=False, log=None)


def test_save_package_can_share_weights_between_ensembles_over_the_same_experts(made, tmp_path):
    from trainer.text.bpe import CLIPTokenizer  # noqa: F401  (the tokenizer folder of the made package)

    experts = {k: made["experts"][k] for k in ("a", "b")}
    fusion = FusionEnsemble(list(experts.values()), temperature=0.5)
    out = str(tmp_path / "pkg")
    fields = {"name": "shared", "defaults": {"steps": 4, "guidance": 3.0, "scheduler": "ddim", "width": 16,
                                             "height": 16}, "size": {"min": 8, "max": 32}}
    text_encoder = CLIPTextEncoder(TextEncoderConfig.tiny(vocab_size=520, hidden_size=D, eos_token_id=519,
                                                          pad_token_id=519))
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    result = save_package(out, str(made["root"] / "tok"), text_encoder, vae, experts,
                          {"duo": EnsembleSpec(made["duo"], ["a", "b"]), "fuse": EnsembleSpec(fusion, ["a", "b"])},
                          {"num_train_timesteps": 1000}, fields, fp16=True, check=False, vae_encoder=False,
                          share_weights=True, log=None)
    graphs = {e["id"]: (e["method"], e["graph"]) for e in result.manifest["ensembles"]}
    assert graphs == {"duo": ("afa", "unets/duo.onnx"), "fuse": ("fuse", "unets/fuse.onnx")}
    assert {e["id"]: e["unet"] for e in result.manifest["experts"]} == {"a": "unets/a.onnx", "b": "unets/b.onnx"}
    assert sorted(os.listdir(os.path.join(out, "unets"))) == ["a.config.json", "a.onnx", "b.config.json", "b.onnx",
                                                              "duo.onnx", "fuse.onnx", DATA_NAME]
    assert not os.path.exists(os.path.join(out, "ensembles")) and not os.path.exists(os.path.join(out, "experts"))
    a, b, afa, fuse = (external_places(os.path.join(out, "unets", f))
                       for f in ("a.onnx", "b.onnx", "duo.onnx", "fuse.onnx"))
    assert len(fuse) >= 10 and fuse <= afa and a | b <= afa and len(a) >= 5
    validate_manifest(result.manifest, out)
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        assert json.load(f) == result.manifest

    # an ensemble added later over the same experts (in another order: no partner ensemble) joins unets/,
    # the experts' U-Nets read back from unets/<id>.onnx + <id>.config.json; every graph there reads the
    # rewritten data file and computes what it did
    check = ort_check.available()
    before = {}
    if check:
        for name in ("a.onnx", "duo.onnx"):
            path = os.path.join(out, "unets", name)
            before[name] = (random_feeds(path), shutil.copy(path, str(tmp_path / name)))
        shutil.copy(os.path.join(out, "unets", DATA_NAME), str(tmp_path / DATA_NAME))
    entry = add_to.add_fuse(out, ["b", "a"], ens_id="ba", check=check, log=None)
    assert entry["graph"] == "unets/ba.onnx"
    assert sorted(os.listdir(os.path.join(out, "unets"))) == ["a.config.json", "a.onnx", "b.config.json", "b.onnx",
                                                              "ba.onnx", "duo.onnx", "fuse.onnx", DATA_NAME]
    for name in ("a.onnx", "b.onnx", "ba.onnx", "duo.onnx", "fuse.onnx"):
        assert external_files(os.path.join(out, "unets", name)) == [DATA_NAME]
    for name, (feeds, old) in before.items():
        want, got = ort_check.run_onnx(old, feeds), ort_check.run_onnx(os.path.join(out, "unets", name), feeds)
        for key in want:
            assert np.array_equal(want[key], got[key]), (name, key)


def test_experts_too_large_to_hold_together_are_streamed_one_at_a_time(made, package, tmp_path, monkeypatch,
                                                                       capsys):
    """Above STREAM_ABOVE (1 GiB of float32 per expert: SD1.5's), the ensemble is built on meta-device U-Nets
    and each expert's weights are read only while the graph's are written (large_graph): same result."""
    monkeypatch.setattr(add_to, "STREAM_ABOVE", 0)
    loaded = []
    real_load = add_to.load_expert_unets

    def load_expert_unets(package_dir, m, ids, **kwargs):
        loaded.append(list(ids))
        return real_load(package_dir, m, ids, **kwargs)

    monkeypatch.setattr(add_to, "load_expert_unets", load_expert_unets)
    run = tmp_path / "run"
    trained = trained_run(made, run)
    assert export_spec.main(["--add-to", package, "--method", "afa", "--aggregator", str(run), "--id", "bc",
                             "--subsets"]) == 0
    assert "too large to hold together" in capsys.readouterr().out
    assert loaded == [["b"], ["c"]]  # one expert at a time, while the weights are written
    entry = manifest(package)["ensembles"][-1]
    validate_manifest(manifest(package), package)
    fuse = add_to.add_fuse(package, ["a", "b", "c"], ens_id="fuse3", check=False, log=None)
    ort_check.skip_unless_available()
    assert_computes(os.path.join(package, entry["graph"]), trained)
    f3 = feeds(3, seed=6)
    experts = [round_weights_fp16(made["experts"][e]) for e in ("a", "b", "c")]
    want_out, _ = torch_run(FusionEnsemble(experts).eval(), f3)
    np.testing.assert_allclose(ort_check.run_onnx(os.path.join(package, fuse["graph"]), f3)["out_sample"], want_out,
                               atol=1e-4)

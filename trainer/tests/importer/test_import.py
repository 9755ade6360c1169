"""The importer in-process on miniature SD1.x checkpoints (trainer/importer/miniature.py): the package
it writes, sources.json and the loaders of contract C2, ids, and every refusal (one line, nothing
left behind). test/import.test.ts runs the same through `npm run import` and the engine."""
import json
import os
import shutil

import pytest
import torch

from trainer.importer import inputs as importer_inputs_module
from trainer.importer import weight_files as importer_inputs
from trainer.importer import package as importer_package
from trainer.importer.errors import ImportFailure
from trainer.importer.miniature import (SET, VAE_SEED, ldm_checkpoint, make_clip, make_unet, make_vae,
                                        write_bad_inputs, write_diffusers, write_set, write_single_file)
from trainer.importer.naming import expert_ids, slug, title
from trainer.importer.package import ImportOptions, import_checkpoints, natural_size, size_fields
from trainer.importer.sources import load_expert_text_encoder, load_expert_unet
from trainer.io.sd_vae import diffusers_to_ldm_vae_state_dict
from trainer.models.unet import UNetConfig


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ck")
    paths = write_set(str(folder))
    paths.update(write_bad_inputs(str(folder / "bad")))
    return folder, paths


@pytest.fixture(scope="module")
def imported(checkpoints, tmp_path_factory):
    folder, paths = checkpoints
    out = tmp_path_factory.mktemp("pkgs") / "mine"
    lines = []
    import_checkpoints(ImportOptions(out=str(out), inputs=[paths[name] for name in SET], size=32, check=False),
                       log=lines.append)
    return out, lines


def _refused(tmp_path, inputs, match, **options):
    out = tmp_path / "refused"
    with pytest.raises(ImportFailure, match=match) as info:
        import_checkpoints(ImportOptions(out=str(out), inputs=[str(i) for i in inputs], check=False, **options),
                           log=lambda line: None)
    assert "\n" not in str(info.value)
    assert not out.exists()
    assert [f for f in os.listdir(tmp_path) if ".import-" in f] == []
    return str(info.value)


def test_the_package_has_every_part(imported):
    out, lines = imported
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["id"] for e in manifest["experts"]] == ["alpha", "beta", "gamma", "retrained", "delta"]
    assert [e["title"] for e in manifest["experts"]][:3] == ["Alpha", "Beta", "Gamma"]
    assert len({e["architecture"] for e in manifest["experts"]}) == 1
    assert manifest["latent"] == {"channels": 4, "downsample": 4, "scale_factor": 0.18215}
    assert manifest["defaults"] == {"steps": 25, "guidance": 7.5, "scheduler": "dpmpp_2m", "width": 32, "height": 32}
    assert manifest["size"] == {"min": 16, "max": 48}
    assert manifest["ensembles"] == []
    for rel in ("tokenizer/vocab.json", "tokenizer/merges.txt", "vae_decoder/model.onnx", "vae_encoder/model.onnx",
                "text_encoder/model.onnx", "experts/retrained/text_encoder/model.onnx",
                "experts/gamma/unet/config.json", "scheduler/scheduler_config.json"):
        assert (out / rel).is_file(), rel
    assert not (out / "experts" / "alpha" / "text_encoder").exists()
    assert [e.get("text_encoder") for e in manifest["experts"]] == \
        [None, None, None, "experts/retrained/text_encoder/model.onnx", None]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_start"], scheduler["beta_end"], scheduler["steps_offset"],
            scheduler["set_alpha_to_one"], scheduler["prediction_type"]) == (0.00085, 0.012, 1, False, "epsilon")
    assert "VAE: from alpha.safetensors (the first input that has one; --vae FILE picks another)" in lines
    assert any(line.startswith("text encoders: 2 distinct") for line in lines)
    assert "(EMA weights)" in manifest["experts"][2]["description"]


def test_sources_json_and_the_loaders_give_back_the_original_weights(imported, checkpoints):
    out, _ = imported
    folder, paths = checkpoints
    sources = json.loads((out / "sources.json").read_text())
    assert sources["experts"]["delta"] == {"path": paths["delta"], "format": "diffusers",
                                           "sha256": sources["experts"]["delta"]["sha256"]}
    assert sources["experts"]["alpha"]["path"] == paths["alpha.safetensors"]
    for expert, seed, dtype in (("gamma", 3, torch.float16), ("beta", 2, torch.float32), ("delta", 5, torch.float32)):
        unet = load_expert_unet(str(out), expert)
        assert not unet.training
        expected = make_unet(seed).state_dict()
        for k, v in unet.state_dict().items():
            assert v.dtype == torch.float32
            assert torch.equal(v, expected[k].to(dtype).float()), (expert, k)
    clip = load_expert_text_encoder(str(out), "retrained")
    expected = make_clip(101).state_dict()
    assert all(torch.equal(v, expected[k].half().float()) for k, v in clip.state_dict().items())
    assert clip.config.hidden_size == 32 and clip.config.eos_token_id == 49407


def test_a_changed_source_is_refused_by_the_loaders(imported, tmp_path):
    out, _ = imported
    copy = tmp_path / "pkg"
    shutil.copytree(out, copy)
    sources = json.loads((copy / "sources.json").read_text())
    moved = tmp_path / "alpha.safetensors"
    shutil.copyfile(sources["experts"]["alpha"]["path"], moved)
    with open(moved, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\1\2\3\4")
    sources["experts"]["alpha"]["path"] = str(moved)
    (copy / "sources.json").write_text(json.dumps(sources))
    with pytest.raises(ImportFailure, match="changed since the import"):
        load_expert_unet(str(copy), "alpha")
    assert load_expert_unet(str(copy), "alpha", verify=False) is not None
    with pytest.raises(ImportFailure, match="has no expert 'zeta'"):
        load_expert_unet(str(copy), "zeta")
    os.remove(copy / "sources.json")
    with pytest.raises(ImportFailure, match="has no sources.json"):
        load_expert_unet(str(copy), "alpha")


def test_graphs_match_pytorch_in_onnxruntime(checkpoints, tmp_path):
    """One checkpoint with the parity check on: every graph runs in onnxruntime-node like PyTorch."""
    _, paths = checkpoints
    lines = []
    import_checkpoints(ImportOptions(out=str(tmp_path / "one"), inputs=[paths["retrained.safetensors"]], check="auto"),
                       log=lines.append)
    graphs = [line for line in lines if ".onnx (" in line]
    assert len(graphs) == 4
    assert all("max abs error" in line or "parity not checked" in line for line in graphs), graphs
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["defaults"]["width"] == 64  # derived: latents whose lowest U-Net level is 8x8
    assert "text_encoder" not in manifest["experts"][0]


def test_fp32_storage_and_a_vae_given_apart(checkpoints, tmp_path):
    _, paths = checkpoints
    vae_file = write_single_file(str(tmp_path / "vae-ft.safetensors"),
                                 diffusers_to_ldm_vae_state_dict(make_vae(7).state_dict()))
    lines = []
    import_checkpoints(ImportOptions(out=str(tmp_path / "p"), inputs=[paths["alpha.safetensors"]], vae=vae_file,
                                     fp16=False, size=48, steps=10, name="Mine", check=False), log=lines.append)
    assert "VAE: from --vae vae-ft.safetensors" in lines
    import onnx
    unet = onnx.load(str(tmp_path / "p" / "experts" / "alpha" / "unet" / "model.onnx"))
    assert {t.data_type for t in unet.graph.initializer} <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert (manifest["name"], manifest["defaults"]["steps"], manifest["defaults"]["width"]) == ("Mine", 10, 48)
    sources = json.loads((tmp_path / "p" / "sources.json").read_text())
    assert sources["vae"]["path"] == vae_file


def test_force_replaces_an_existing_package_and_numbers_clashing_ids(checkpoints, tmp_path):
    _, paths = checkpoints
    out = tmp_path / "p"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    lines = []
    import_checkpoints(ImportOptions(out=str(out), inputs=[paths["alpha.safetensors"], paths["duplicate"]],
                                     size=32, force=True, check=False), log=lines.append)
    assert not (out / "stale.txt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["id"] for e in manifest["experts"]] == ["alpha", "alpha-2"]
    assert any("it becomes alpha-2" in line for line in lines)
    assert sorted(os.listdir(tmp_path)) == ["p"]


def test_refusals_name_the_problem(checkpoints, tmp_path):
    folder, paths = checkpoints
    assert _refused(tmp_path, [paths["sdxl"]], "only SD1.x") == \
        "sdxl.safetensors: this is an SDXL checkpoint; only SD1.x is supported"
    assert "this is an SD2.x checkpoint" in _refused(tmp_path, [paths["sd2"]], "SD2")
    assert "truncated" in _refused(tmp_path, [paths["alpha.safetensors"], paths["truncated"]], "truncated")
    assert "--allow-pickle" in _refused(tmp_path, [paths["pickle"]], "pickled checkpoint")
    _refused(tmp_path, [paths["alpha.safetensors"], paths["duplicate"]],
             "both give the expert id 'alpha'; rename one of the files")
    _refused(tmp_path, [paths["alpha.safetensors"], os.path.join(folder, "bad", "..", "alpha.safetensors")],
             "given twice")
    _refused(tmp_path, [paths["duplicate"]], "none of the inputs has a VAE")
    _refused(tmp_path, [tmp_path / "nothing.safetensors"], "no such file")
    (tmp_path / "existing").mkdir()
    with pytest.raises(ImportFailure, match="existing already exists; pass --force"):
        import_checkpoints(ImportOptions(out=str(tmp_path / "existing"), inputs=[paths["alpha.safetensors"]]))


def test_other_families_and_layouts_are_named(tmp_path):
    unet = make_unet(1)
    base = ldm_checkpoint(unet, make_clip(100), make_vae(VAE_SEED))

    def refused(name, state, match):
        write_single_file(str(tmp_path / name), state)
        return _refused(tmp_path, [tmp_path / name], match)

    refused("sd3.safetensors", {**base, "model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(2)}, "an SD3 checkpoint")
    refused("flux.safetensors", {"double_blocks.0.img_attn.qkv.weight": torch.zeros(2)}, "a Flux checkpoint")
    refused("lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2)}, "a LoRA")
    refused("vae.safetensors", diffusers_to_ldm_vae_state_dict(make_vae(1).state_dict()), "this is a VAE, not a checkpoint; pass it with --vae")
    wide = dict(base)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    wide[key] = torch.zeros(32, 1024)
    refused("sd2wide.safetensors", wide, "SD2.x checkpoint .1024-wide text context.")
    inpaint = UNetConfig(**{**unet.config.__dict__, "in_channels": 9})
    state = ldm_checkpoint(make_unet(1, inpaint), make_clip(100), make_vae(VAE_SEED))
    refused("inpaint.safetensors", state, "an inpainting checkpoint .9 input channels.")
    broken = {k: v for k, v in base.items() if "input_blocks.1.1.norm" not in k}
    refused("broken.safetensors", broken, "missing 2 tensor")
    refused("unknown.bin.txt", base, "not a checkpoint this importer reads")
    (tmp_path / "page.safetensors").write_bytes(b"<html>404 Not Found</html>" * 4)
    _refused(tmp_path, [tmp_path / "page.safetensors"], "page.safetensors is corrupt or not a .safetensors file")


def test_diffusers_folders_of_other_kinds_are_named(tmp_path):
    folder = write_diffusers(str(tmp_path / "xl"), make_unet(1), make_clip(100), make_vae(VAE_SEED))
    os.makedirs(os.path.join(folder, "text_encoder_2"))
    _refused(tmp_path, [folder], "an SDXL pipeline; only SD1.x")
    onnx_dir = tmp_path / "optimum" / "unet"
    onnx_dir.mkdir(parents=True)
    (onnx_dir / "model.onnx").write_bytes(b"")
    _refused(tmp_path, [tmp_path / "optimum"], "an ONNX export .Optimum.; list it in manifest.json")
    binary = write_diffusers(str(tmp_path / "bin"), make_unet(1), make_clip(100), make_vae(VAE_SEED))
    os.rename(os.path.join(binary, "unet", "diffusion_pytorch_model.safetensors"),
              os.path.join(binary, "unet", "diffusion_pytorch_model.bin"))
    _refused(tmp_path, [binary], "pickled checkpoint")
    variant = write_diffusers(str(tmp_path / "variant"), make_unet(1), make_clip(100), make_vae(VAE_SEED))
    os.rename(os.path.join(variant, "unet", "diffusion_pytorch_model.safetensors"),
              os.path.join(variant, "unet", "diffusion_pytorch_model.fp16.safetensors"))
    assert importer_inputs_module.open_input(variant, allow_pickle=False).unet_files[0].endswith(".fp16.safetensors")


def test_a_failed_export_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    _, paths = checkpoints

    def broken(*args, **kwargs):
        raise importer_package.ExportError("unet alpha: onnxruntime output differs")

    monkeypatch.setattr(importer_package, "export_unet", broken)
    _refused(tmp_path, [paths["alpha.safetensors"]], "export failed: unet alpha")


def test_ids_and_titles_from_file_names():
    assert slug("v1-5-pruned-emaonly") == "v1-5"
    assert (slug("DreamShaper_8_pruned"), title("DreamShaper_8_pruned")) == ("dreamshaper_8", "DreamShaper 8")
    assert slug("Realistic Vision V6.0 B1 (fp16)") == "realistic-vision-v6.0-b1-fp16"
    assert slug("__") == "expert"
    assert expert_ids([("a", "x/a.safetensors"), ("A-fp16", "y/A-fp16.safetensors")], force=True)[0] == ["a", "a-2"]
    with pytest.raises(ImportFailure, match="x/a.safetensors and y/A-fp16.safetensors both give the expert id 'a'"):
        expert_ids([("a", "x/a.safetensors"), ("A-fp16", "y/A-fp16.safetensors")], force=False)


def test_sd15_sizes():
    assert natural_size(UNetConfig.sd15(), 8) == 512
    assert size_fields(512, 8) == {"min": 256, "max": 768}


def test_weights_hash_ignores_storage_precision_of_equal_values():
    clip = make_clip(100).state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in clip.items()}
    assert importer_inputs.weights_hash(clip, torch.float16) == importer_inputs.weights_hash(half, torch.float16)
    assert importer_inputs.weights_hash(clip, torch.float32) != importer_inputs.weights_hash(half, torch.float32)


def test_an_afa_training_config_for_the_imported_package(imported, tmp_path):
    """afa_config writes the text encoders and VAE as model folders and a config that the trainer
    builds its ensemble from (the experts' own checkpoints, the retrained CLIP for its expert)."""
    from trainer.importer.afa_config import write_afa_config
    from trainer.training.config import build_ensemble, build_text_encoder, build_vae

    out, _ = imported
    path = write_afa_config(str(out), str(tmp_path / "afa"), str(tmp_path / "images"),
                            experts=["alpha", "retrained", "delta"], log=lambda line: None)
    config = json.loads(open(path).read())
    assert config["expert_ids"] == ["alpha", "retrained", "delta"]
    assert config["afa"] == {"hidden": 128, "depth": 2}
    folders = [t["pretrained"] for t in config["text_encoders"]]
    assert folders[0] == folders[2] != folders[1] and folders[1].endswith("text_encoder-retrained")
    ensemble = build_ensemble(config)
    assert ensemble.num_experts == 3
    expected = make_unet(1).state_dict()
    assert all(torch.equal(v, expected[k].half().float()) for k, v in ensemble.unets[0].state_dict().items())
    clip = build_text_encoder(config["text_encoders"][1], None)
    assert all(torch.equal(v, make_clip(101).state_dict()[k].half().float()) for k, v in clip.state_dict().items())
    vae = build_vae(config["vae"])
    assert all(torch.equal(v, make_vae(VAE_SEED).state_dict()[k].half().float()) for k, v in vae.state_dict().items())


def test_a_pickled_checkpoint_imports_with_allow_pickle(checkpoints, tmp_path):
    _, paths = checkpoints
    out = tmp_path / "p"
    import_checkpoints(ImportOptions(out=str(out), inputs=[paths["pickle"]], size=32, allow_pickle=True, check=False),
                       log=lambda line: None)
    sources = json.loads((out / "sources.json").read_text())
    assert sources["experts"]["pickled"]["pickle"] is True and sources["vae"]["pickle"] is True
    unet = load_expert_unet(str(out), "pickled")
    assert all(torch.equal(v, make_unet(1).state_dict()[k]) for k, v in unet.state_dict().items())


def test_cuda_fp16_variants_are_named_in_the_manifest(checkpoints, tmp_path):
    _, paths = checkpoints
    out = tmp_path / "p"
    import_checkpoints(ImportOptions(out=str(out), inputs=[paths["alpha.safetensors"], paths["retrained.safetensors"]],
                                     size=32, cuda_fp16=True, check=False), log=lambda line: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experts"][0]["unet"] == {"fp32": "experts/alpha/unet/model.onnx",
                                              "fp16": "experts/alpha/unet/model.fp16.onnx"}
    assert manifest["text_encoder"]["fp16"] == "text_encoder/model.fp16.onnx"
    assert (out / "experts" / "alpha" / "unet" / "model.fp16.onnx").is_file()
    assert load_expert_unet(str(out), "alpha") is not None


def test_one_unet_at_a_time(checkpoints, tmp_path, monkeypatch):
    """Memory: when an expert's U-Net is exported, the previous experts' U-Nets and the VAE are gone."""
    import gc
    import weakref

    _, paths = checkpoints
    unets, vaes = [], []
    real_export, real_vae = importer_package.export_unet, importer_package.vae_from_state_dict

    def export_unet(unet, path, **kwargs):
        gc.collect()
        assert [r() for r in unets] == [None] * len(unets), "an earlier U-Net is still in memory"
        assert [r() for r in vaes] == [None], "the VAE is still in memory"
        unets.append(weakref.ref(unet))
        return real_export(unet, path, **kwargs)

    def vae_from_state_dict(*args):
        vae = real_vae(*args)
        vaes.append(weakref.ref(vae))
        return vae

    monkeypatch.setattr(importer_package, "vae_from_state_dict", vae_from_state_dict)
    monkeypatch.setattr(importer_package, "export_unet", export_unet)
    inputs = [paths[n] for n in ("alpha.safetensors", "beta_fp32.safetensors", "gamma-pruned-emaonly.safetensors")]
    import_checkpoints(ImportOptions(out=str(tmp_path / "p"), inputs=inputs, size=32, check=False), log=lambda l: None)
    assert len(unets) == 3


def test_large_unets_are_streamed_from_the_checkpoint_and_compute_the_same(imported, checkpoints, tmp_path):
    """stream_above=0 takes the path of SD1.5-size U-Nets (written tensor by tensor from the file onto a
    graph traced without weights): every expert's graph gives what the in-memory export gives."""
    import numpy as np
    from trainer.export import ort_check
    ort_check.skip_unless_available()
    _, paths = checkpoints
    out = tmp_path / "streamed"
    lines = []
    import_checkpoints(ImportOptions(out=str(out), inputs=[paths[name] for name in SET], size=32, check=False,
                                     stream_above=0), log=lines.append)
    assert sum("written tensor by tensor" in line for line in lines) == len(SET)
    normal, _ = imported
    want_manifest = json.loads((normal / "manifest.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["experts"] == want_manifest["experts"]
    g = torch.Generator().manual_seed(3)
    width = UNetConfig.from_dict(json.loads((out / "experts" / "alpha" / "unet" / "config.json").read_text())) \
        .cross_attention_dims()[0]
    feeds = [{"sample": torch.randn(2, 4, 6, 4, generator=g).numpy(),
              "timestep": np.array([901.0, 7.0], dtype=np.float32),
              "encoder_hidden_states": torch.randn(2, 77, width, generator=g).numpy()}]
    for expert in manifest["experts"]:
        assert (out / expert["unet"]).with_name("model.onnx_data").is_file()
        want = ort_check.run_onnx_many(str(normal / expert["unet"]), feeds)[0]["out_sample"]
        got = ort_check.run_onnx_many(str(out / expert["unet"]), feeds)[0]["out_sample"]
        assert np.std(want) > 1e-3
        assert np.max(np.abs(got - want)) <= 2e-5, expert["id"]


def test_an_imported_package_takes_an_ensemble_with_add_to(imported, tmp_path):
    """The README's path: import, then `trainer.export --add-to` (the package has no ensembles/ folder yet)."""
    from trainer.export import spec as export_spec
    from trainer.export.manifest import validate_manifest
    out, _ = imported
    package = tmp_path / "mine"
    shutil.copytree(out, package)
    assert not (package / "ensembles").exists()
    assert export_spec.main(["--add-to", str(package), "--method", "fuse", "--experts", "alpha,delta",
                             "--check", "off"]) == 0
    manifest = json.loads((package / "manifest.json").read_text())
    validate_manifest(manifest, str(package))
    entry = manifest["ensembles"][-1]
    assert entry["experts"] == ["alpha", "delta"] and (package / entry["graph"]).is_file()

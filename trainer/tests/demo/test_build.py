import json
import os
import shutil

import pytest
import torch

from trainer.demo import build as demo_build
from trainer.demo import recipe as demo_recipe
from trainer.demo import shapes, stages
from trainer.demo.recipe import FAMILY_IDS
from trainer.export.shared_weights import DATA_NAME
from trainer.io.model_folders import load_unet
from trainer.text.bpe import CLIPTokenizer


def _build(tmp_path, **overrides):
    recipe = demo_recipe.recipe("cpu", smoke=True)
    for key, value in overrides.items():
        recipe[key].update(value)
    lines = []
    build = demo_build.DemoBuild(recipe, str(tmp_path / "run"), str(tmp_path / "pkg"), log=lines.append)
    return build, lines


def test_first_stages_in_smoke_mode_then_resume_and_redo(tmp_path):
    build, lines = _build(tmp_path)
    with pytest.raises(RuntimeError, match="needs"):
        build.run(["base"])
    build.run(["world", "classifier", "tokenizer", "vae"])
    for stage in ("world", "classifier", "tokenizer", "vae"):
        assert build.done(stage), stage
        runs = json.load(open(build.path("logs", f"{stage}.json")))
        assert runs[-1]["finished"] and len(runs[-1]["load_before"]) == 3
    world = shapes.load_dataset(build.path("world", "all.pt"))
    assert len(world) == build.r["world"]["n_all"]
    spikes = shapes.load_dataset(build.path("world", "spikes.pt"))
    assert set(spikes.shape[spikes.shape >= 0].tolist()) <= {shapes.SHAPES.index("triangle"), shapes.SHAPES.index("star")}
    pairs = shapes.load_dataset(build.path("world", "pairs.pt"))
    assert len(pairs) == build.r["world"]["n_pairs"] and bool((pairs.num_objects == 2).all())
    # the aggregators train on the whole world plus the two-object set
    assert len(build.products.afa_examples()) == build.r["world"]["n_all"] + build.r["world"]["n_pairs"]
    tok = CLIPTokenizer.from_dir(build.path("tokenizer"))
    assert tok.vocab_size == build.r["tokenizer"]["vocab_size"]
    vae_run = json.load(open(build.path("logs", "vae.json")))[-1]
    assert "recon_shape" in vae_run["measured"] and vae_run["measured"]["scaling_factor"] > 0
    latents = torch.load(build.path("latents", "curves.pt"))
    assert latents["latents"].shape == (build.r["world"]["n_family"], 4, 32, 32)
    assert abs(latents["scaling_factor"] - vae_run["measured"]["scaling_factor"]) < 1e-3
    log_md = open(build.path("build_log.md")).read()
    assert "| vae | done |" in log_md and "recon_shape" in log_md

    # a new build object over the same folder resumes: finished stages are skipped
    again, lines2 = _build(tmp_path)
    again.run(["world", "tokenizer"])
    assert any("world: done already" in line for line in lines2)

    # a bundle carries the products (float16 weights) to another run folder
    bundle = str(tmp_path / "bundle.tar")
    names = again.write_bundle(bundle)
    assert "vae/final/vae/diffusion_pytorch_model.safetensors" in names and "classifier/classifier.pt" in names
    assert not any(n.startswith(("world/all", "latents/", "vae/checkpoints")) for n in names)
    elsewhere = demo_build.DemoBuild(again.r, str(tmp_path / "other"), str(tmp_path / "pkg2"), log=lines2.append)
    elsewhere.read_bundle(bundle)
    assert elsewhere.done("vae") and elsewhere.done("classifier")
    original, restored = again.products.vae().state_dict(), elsewhere.products.vae().state_dict()
    for key, value in original.items():
        assert restored[key].dtype == torch.float32
        assert torch.allclose(restored[key].cpu(), value.cpu().half().float()), key
    assert len(elsewhere.products.world("blocks")) == build.r["world"]["n_family"]  # data is rendered again on demand
    assert torch.equal(elsewhere.products.world("blocks").images, again.products.world("blocks").images)

    # --unbundle comes before --redo, so a bundled stage can be trained again on the other machine
    third = str(tmp_path / "third")
    assert demo_build.main(["--smoke", "--run-dir", third, "--unbundle", bundle, "--redo", "--stage", "tokenizer"]) == 0
    this_run = open(os.path.join(third, "build.log")).read().split("unpacked")[-1]  # the bundle brings its log
    assert "== tokenizer: starting" in this_run and "done already" not in this_run

    # redo forgets the stage and everything that depends on it
    again.redo("tokenizer")
    assert not again.done("tokenizer") and again.done("vae") and again.done("world")
    assert not os.path.exists(again.path("tokenizer"))


def test_time_budget_ends_a_stage_and_an_interrupted_stage_resumes(tmp_path, capsys):
    build, _ = _build(tmp_path, vae={"steps": 10_000, "minutes": 0.15})
    build.run(["world", "classifier", "tokenizer", "vae"])
    assert build.done("vae")  # the budget is spent: the stage is finished with what it has
    first = json.load(open(build.path("logs", "vae.json")))[-1]
    assert 0 < first["steps"] < 10_000 and 0.1 < first["minutes"] < 0.5

    # as if the run had been killed after its last checkpoint: the stage resumes from it
    build.stage_state("vae")["status"] = "partial"
    build.r["vae"].update(steps=first["steps"] + 2, minutes=5.0)
    capsys.readouterr()
    build.run(["vae"])
    assert "resumed from" in capsys.readouterr().out
    runs = json.load(open(build.path("logs", "vae.json")))
    assert runs[-1]["steps"] == first["steps"] + 2 and runs[-1]["minutes_total"] > first["minutes_total"]


def test_extend_goes_on_from_the_checkpoint_or_from_final_weights_and_rebuilds_dependents(tmp_path):
    build, lines = _build(tmp_path, base={"steps": 2}, expert={"steps": 1})
    build.run(["world", "classifier", "tokenizer", "vae", "base", "expert-curves"])
    assert build.done("expert-curves") and os.path.isdir(build.path("expert-curves"))
    assert build.dependents("base") == ["expert-curves", "expert-blocks", "expert-spikes", "afa", "export"]
    with pytest.raises(ValueError, match="nothing to extend"):
        build.extend("afa", 1.0)
    with pytest.raises(ValueError, match="training stages"):
        build.extend("tokenizer", 1.0)

    build.r["base"]["steps"] = 3
    build.extend("base", 5.0)
    assert not build.done("base") and build.budget_left("base") == pytest.approx(5.0)
    assert "expert-curves" not in build.state["stages"] and not os.path.exists(build.path("expert-curves"))
    build.run(["base"])
    runs = json.load(open(build.path("logs", "base.json")))
    assert build.done("base") and runs[-1]["steps"] == 3  # resumed from the step-2 checkpoint

    # on a machine with only the final weights (a bundle), the stage starts from them
    final = {k: v.clone() for k, v in load_unet(build.path("base", "final")).state_dict().items()}
    shutil.rmtree(build.path("base", "checkpoints"))
    build.extend("base", 5.0)
    started = {}
    original = stages.load_unet

    def spy(path, *args, **kwargs):
        unet = original(path, *args, **kwargs)
        started.update({k: v.clone() for k, v in unet.state_dict().items()})
        return unet

    stages.load_unet = spy
    try:
        build.run(["base"])
    finally:
        stages.load_unet = original
    assert any("going on from its final weights" in line for line in lines)
    assert started.keys() == final.keys() and all(torch.equal(started[k], final[k]) for k in final)
    assert json.load(open(build.path("logs", "base.json")))[-1]["steps"] == 3


def test_smoke_build_to_the_package_with_the_evaluation_files(tmp_path):
    build, _ = _build(tmp_path)
    build.run()
    assert build.done("export")
    pkg = tmp_path / "pkg"
    manifest = json.load(open(pkg / "manifest.json"))
    assert [e["id"] for e in manifest["experts"]] == list(FAMILY_IDS)
    assert manifest["ensembles"][0]["id"] == "trio" and manifest["latent"]["downsample"] == 2
    # every U-Net-bearing graph in unets/, reading one weights file (the committed models/demo's layout)
    assert [e["unet"] for e in manifest["experts"]] == [f"unets/{f}.onnx" for f in FAMILY_IDS]
    assert {e["id"]: e["graph"] for e in manifest["ensembles"]} == {"trio": "unets/trio.onnx", "fuse": "unets/fuse.onnx"}
    assert sorted(os.listdir(pkg / "unets")) == sorted(
        [f"{i}.onnx" for i in (*FAMILY_IDS, "trio", "fuse")] + [f"{f}.config.json" for f in FAMILY_IDS] +
        [DATA_NAME])
    assert not (pkg / "experts").exists() and not (pkg / "ensembles").exists()
    for name in ("classifier.onnx", "classifier.json", "build_log.md", "reference_features.json"):
        assert (pkg / "eval" / name).is_file(), name
    reference = json.load(open(pkg / "eval" / "reference_features.json"))
    assert {"single", "pair"} <= set(reference["sets"])
    signal = json.load(open(build.path("logs", "afa.json")))[-1]["routing_signal"]
    assert set(signal) == set(FAMILY_IDS)
    assert all(s["own"] > 0 and s["uniform"] > 0 for s in signal.values())



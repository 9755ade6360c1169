"""The committed fixture package equals what `python3 -m trainer.fixture` builds now."""
import json
import os

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from trainer import export, fixture
from trainer.bpe import CLIPTokenizer
from trainer.sampler import sample

COMMITTED = fixture.DEFAULT_OUT


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    if not os.path.isfile(os.path.join(COMMITTED, "manifest.json")):
        pytest.skip("test/fixtures/tiny is not committed")
    torch.set_num_threads(2)
    out = str(tmp_path_factory.mktemp("fixture") / "tiny")
    # graph parity is covered by test_export and by replaying the committed graphs below
    fixture.build(out, check=False, log=None)
    return out


def read_json(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return json.load(f)


def f32(*parts):
    return np.fromfile(os.path.join(*parts), dtype="<f4")


def test_size_budget_and_layout(rebuilt):
    assert fixture.package_bytes(rebuilt) <= fixture.MAX_BYTES
    assert fixture.package_bytes(COMMITTED) <= fixture.MAX_BYTES
    export.validate_manifest(read_json(rebuilt, "manifest.json"), rebuilt)
    files = sorted(os.path.relpath(os.path.join(root, f), rebuilt) for root, _, fs in os.walk(rebuilt) for f in fs)
    committed = sorted(os.path.relpath(os.path.join(root, f), COMMITTED) for root, _, fs in os.walk(COMMITTED)
                       for f in fs)
    assert files == committed
    assert "ensembles/duo/model.onnx" in files and "reference/cases.json" in files


def test_text_files_are_identical(rebuilt):
    for rel in ("manifest.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                "experts/alpha/unet/config.json", "experts/odd/unet/config.json", ".gitattributes"):
        with open(os.path.join(rebuilt, rel), "rb") as a, open(os.path.join(COMMITTED, rel), "rb") as b:
            assert a.read() == b.read(), f"{rel} differs: regenerate with python3 -m trainer.fixture"
    # float32 scheduler values may differ by an ulp between torch versions (init_noise_sigma did)
    _approx_equal(read_json(rebuilt, "reference", "cases.json"), read_json(COMMITTED, "reference", "cases.json"))


def _approx_equal(a, b, path="cases.json"):
    """Equal JSON, floats within 1e-6 relative; raises naming the first difference."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        return all(_approx_equal(a[k], b[k], f"{path}.{k}") for k in a)
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {len(a)} vs {len(b)} entries"
        return all(_approx_equal(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6), f"{path}: {a} vs {b}"
        return True
    assert a == b, f"{path}: {a!r} vs {b!r}"
    return True


@pytest.mark.parametrize("graph", ["text_encoder/model.onnx", "vae_decoder/model.onnx",
                                   "experts/alpha/unet/model.onnx", "experts/beta/unet/model.onnx",
                                   "experts/odd/unet/model.onnx", "ensembles/duo/model.onnx"])
def test_graph_weights_are_reproduced(rebuilt, graph):
    def weights(root):
        model = onnx.load(os.path.join(root, graph))
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                if i.name.split(".")[0] in ("unet", "ensemble", "text_model", "vae")}

    new, old = weights(rebuilt), weights(COMMITTED)
    assert new and sorted(new) == sorted(old)
    for name in new:
        np.testing.assert_allclose(new[name], old[name], rtol=1e-5, atol=1e-6, err_msg=f"{graph}: {name}")


def test_reference_outputs_are_reproduced(rebuilt):
    cases = read_json(COMMITTED, "reference", "cases.json")["cases"]
    names = [c["name"] for c in cases]
    assert names == [c["name"] for c in fixture.CASES]
    for case in cases:
        ref = (rebuilt, "reference")
        want = (COMMITTED, "reference")
        # torch 2.11 (CUDA build, CPU run) reproduced torch 1.13's latents to 1.8e-4 (magnitudes ~30)
        np.testing.assert_allclose(f32(*ref, case["latents"]["file"]), f32(*want, case["latents"]["file"]),
                                   rtol=1e-4, atol=1e-3, err_msg=case["name"])
        for image in case["images"]:
            a = np.fromfile(os.path.join(*ref, image["file"]), np.uint8).astype(int)
            b = np.fromfile(os.path.join(*want, image["file"]), np.uint8).astype(int)
            assert a.size == b.size == image["width"] * image["height"] * 3
            assert np.abs(a - b).max() <= 1, case["name"]
            if "contributions" in image:
                np.testing.assert_allclose(f32(*ref, image["contributions"]["file"]),
                                           f32(*want, image["contributions"]["file"]), atol=1e-4)


def test_reference_cases_cover_what_the_engine_tests():
    cases = {c["name"]: c for c in read_json(COMMITTED, "reference", "cases.json")["cases"]}
    count2 = cases["single_count2"]
    assert [i["seed"] for i in count2["images"]] == [1000, 1001] and count2["latents"]["dims"] == [2, 4, 8, 8]
    assert cases["single_no_cfg"]["request"]["guidance"] == 1.0
    assert cases["single_negative"]["request"]["negative"]
    assert cases["afa_euler"]["request"]["scheduler"] == "euler"
    assert cases["afa_euler"]["latents"]["dims"] == [1, 4, 6, 10]  # 40x24 pixels
    for name in ("afa_ddim", "afa_euler"):
        image = cases[name]["images"][0]
        maps = f32(COMMITTED, "reference", image["contributions"]["file"]).reshape(image["contributions"]["dims"])
        np.testing.assert_allclose(maps.sum(0), 1.0, atol=1e-5)
        assert maps.max() - maps.min() > 0.1, f"{name}: contribution maps are (nearly) uniform"
    subset = cases["afa_subset_beta"]["images"][0]["contributions"]
    maps = f32(COMMITTED, "reference", subset["file"]).reshape(subset["dims"])
    assert subset["experts"] == ["alpha", "beta"]
    assert (maps[0] == 0).all() and (maps[1] == 1).all()
    # same seed, different request: the outputs must differ (else the cases prove nothing)
    a, b, c = (f32(COMMITTED, "reference", cases[n]["latents"]["file"])
               for n in ("single_ddim", "single_negative", "single_no_cfg"))
    assert np.abs(a - b).max() > 0.1 and np.abs(a - c).max() > 0.1
    # the recorded token ids are what the package's tokenizer makes of the prompts
    tokenizer = CLIPTokenizer.from_dir(os.path.join(COMMITTED, "tokenizer"))
    for case in cases.values():
        assert case["input_ids"]["prompt"] == tokenizer(case["request"]["prompt"])[0].tolist()
        assert case["input_ids"]["negative"] == tokenizer(case["request"]["negative"])[0].tolist()


@torch.no_grad()
def test_an_ensemble_of_one_expert_is_that_expert():
    """The subset case (duo with beta only) is beta alone: absent experts get weight exactly 0.

    (Equal up to float rounding: the ensemble feeds beta strided views, which BLAS may sum in
    another order; 8 guided steps amplify that to ~1e-4 on latents of magnitude ~30.)
    """
    tokenizer = CLIPTokenizer.from_dir(os.path.join(COMMITTED, "tokenizer"))
    text_encoder, vae, experts, _ = fixture.build_models(tokenizer)
    case = next(c for c in read_json(COMMITTED, "reference", "cases.json")["cases"] if c["name"] == "afa_subset_beta")
    req = case["request"]
    cond = text_encoder(tokenizer([req["prompt"]]))[0]
    uncond = text_encoder(tokenizer([req["negative"]]))[0]
    result = sample(lambda x, t, text: experts["beta"](x, t, text), cond, uncond,
                    latent_shape=case["latents"]["dims"], seed=req["seed"], steps=req["steps"],
                    guidance=req["guidance"], scheduler=req["scheduler"], scheduler_config=fixture.SCHEDULER_CONFIG)
    committed = f32(COMMITTED, "reference", case["latents"]["file"]).reshape(case["latents"]["dims"])
    np.testing.assert_allclose(result.latents.numpy(), committed, rtol=1e-4, atol=1e-3)


@torch.no_grad()
def test_the_committed_graphs_reproduce_a_reference_in_onnxruntime():
    """Replays afa_ddim with every network run in onnxruntime-node, as the engine does."""
    from trainer import ort_check

    ort_check.skip_unless_available()
    case = next(c for c in read_json(COMMITTED, "reference", "cases.json")["cases"] if c["name"] == "afa_ddim")
    req = case["request"]

    def graph(*parts):
        return os.path.join(COMMITTED, *parts)

    ids = np.array([case["input_ids"]["negative"], case["input_ids"]["prompt"]], dtype=np.int64)
    text = ort_check.run_onnx(graph("text_encoder", "model.onnx"), {"input_ids": ids})["last_hidden_state"]
    stacked = torch.from_numpy(np.stack([text, text]))  # [N, 2, 77, D]: both experts share the encoder

    def denoiser(x, t, embeddings):
        out = ort_check.run_onnx(graph("ensembles", "duo", "model.onnx"), {
            "sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": embeddings.numpy(),
            "expert_mask": np.ones(2, np.float32)})
        return torch.from_numpy(out["out_sample"]), torch.from_numpy(out["contributions"])

    result = sample(denoiser, stacked[:, 1:], stacked[:, :1], latent_shape=case["latents"]["dims"],
                    seed=req["seed"], steps=req["steps"], guidance=req["guidance"], scheduler=req["scheduler"],
                    scheduler_config=read_json(COMMITTED, "scheduler", "scheduler_config.json"))
    want = f32(COMMITTED, "reference", case["latents"]["file"]).reshape(case["latents"]["dims"])
    np.testing.assert_allclose(result.latents.numpy(), want, rtol=1e-4, atol=1e-3)
    image = case["images"][0]
    maps = f32(COMMITTED, "reference", image["contributions"]["file"]).reshape(image["contributions"]["dims"])
    np.testing.assert_allclose(result.contributions[0].numpy(), maps, atol=1e-5)
    decoded = ort_check.run_onnx(graph("vae_decoder", "model.onnx"),
                                 {"latent_sample": (result.latents / read_json(COMMITTED, "manifest.json")
                                                    ["latent"]["scale_factor"]).numpy()})["sample"]
    rgb = np.clip(decoded / 2 + 0.5, 0, 1)
    rgb = np.round(rgb * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    committed_rgb = np.fromfile(os.path.join(COMMITTED, "reference", image["file"]), np.uint8)
    assert np.abs(rgb.reshape(-1).astype(int) - committed_rgb.astype(int)).max() <= 1

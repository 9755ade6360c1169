import copy
import json
import os

import numpy as np
import pytest
import torch

from trainer.diffusion.losses import SD15_SCHEDULER
from trainer.diffusion.schedules import NoiseSchedule
from trainer.io.model_folders import load_unet, save_text_encoder
from trainer.io.png import write_png
from trainer.io.training_checkpoints import list_checkpoints
from trainer.models.vae import AutoencoderKL, VAEConfig
from trainer.tests.small_models import (CAPTIONS, TEXT_DIM, small_ensemble, small_text_encoder, small_tokenizer,
                                        small_unet, small_unet_config, tensors_equal)
from trainer.text.bpe import CLIPTokenizer
from trainer.training.cli import main
from trainer.training.conditioning import drop_captions
from trainer.training.config import run_from_config
from trainer.training.loop import EMA
from trainer.training.options import TrainOptions
from trainer.training.trainers import train_afa, train_unet, train_vae

QUIET = dict(quiet=True)


@pytest.fixture(scope="module")
def tokenizer():
    return small_tokenizer()


def colour_latents():
    """Latents that are a constant +1 ("red") or −1 ("blue"): learnable from the caption alone."""
    return [(torch.full((4, 8, 8), 1.0 if "red" in c else -1.0), c) for c in CAPTIONS]


def fixed_diffusion_loss(unet, text_encoder, tokenizer, data, seed=123):
    """ε-MSE on a fixed batch, fixed noise and fixed timesteps spread over the schedule."""
    schedule = NoiseSchedule.from_config(SD15_SCHEDULER)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.stack([x for x, _ in data] * 2)
    captions = [c for _, c in data] * 2
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(50, 950, x0.shape[0]).long()
    with torch.no_grad():
        hidden, _ = text_encoder(tokenizer(captions))
        prediction = unet(schedule.add_noise(x0, noise, t), t, hidden)
    return float((prediction - noise).pow(2).mean())


# ---------------------------------------------------------------------------------------------
# learning


def test_unet_loss_decreases_and_evaluate_hook_runs(tokenizer, tmp_path):
    unet, text_encoder = small_unet(), small_text_encoder(tokenizer)
    data = colour_latents()
    before = fixed_diffusion_loss(unet, text_encoder, tokenizer, data)
    calls = []

    def evaluate(step):
        calls.append((step, unet.training))
        return {"fixed_loss": fixed_diffusion_loss(unet, text_encoder, tokenizer, data)}

    result = train_unet(unet, text_encoder, tokenizer, data, 16, batch_size=4, lr=5e-3, train_text_encoder=True,
                        out_dir=str(tmp_path), checkpoint_every=8, evaluate=evaluate, **QUIET)
    after = fixed_diffusion_loss(unet, text_encoder, tokenizer, data)
    assert result.completed and result.step == 16 and len(result.losses) == 16
    assert after < 0.6 * before, (before, after)
    assert [s for s, _ in calls] == [8, 16] and not any(training for _, training in calls)
    assert result.evaluations[-1][1]["fixed_loss"] == pytest.approx(after)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records if "eval" in r] == [8, 16]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_vae_reconstruction_improves():
    torch.set_grad_enabled(False)  # a caller that left grad off globally does not stop training
    try:
        _vae_reconstruction_improves()
    finally:
        torch.set_grad_enabled(True)


def _vae_reconstruction_improves():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny(block_out_channels=(8, 16), norm_num_groups=4))
    colours = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [0.5, 0.5, -0.5]])
    data = [(c[:, None, None].expand(3, 8, 8).clone(), "") for c in colours]
    x = torch.stack([img for img, _ in data])

    def recon_error():
        with torch.no_grad():
            mean, _ = vae.encode(x)
            return float((vae.decode(mean) - x).pow(2).mean())

    before = recon_error()
    result = train_vae(vae, data, 25, batch_size=4, lr=1e-2, grad_clip=1.0, **QUIET)
    assert result.completed
    assert recon_error() < 0.3 * before


# ---------------------------------------------------------------------------------------------
# AFA


def test_train_afa_changes_only_the_aggregators(tokenizer, tmp_path):
    ensemble = small_ensemble(3)
    text_encoder = small_text_encoder(tokenizer)
    unets_before = [copy.deepcopy(u.state_dict()) for u in ensemble.unets]
    text_before = copy.deepcopy(text_encoder.state_dict())
    aggregators_before = copy.deepcopy(ensemble.aggregators.state_dict())

    result = train_afa(ensemble, text_encoder, tokenizer, colour_latents(), 3, batch_size=4, lr=1e-2,
                       expert_dropout=0.5, out_dir=str(tmp_path), expert_ids=["a", "b", "c"], **QUIET)

    assert result.completed
    for unet, before in zip(ensemble.unets, unets_before):
        assert tensors_equal(unet.state_dict(), before)
        assert not unet.training
    assert tensors_equal(text_encoder.state_dict(), text_before)
    after = ensemble.aggregators.state_dict()
    changed = [k for k in after if not torch.equal(after[k], aggregators_before[k])]
    assert any(k.endswith("to_logits.weight") for k in changed)
    assert len(changed) > len(after) // 2
    # the checkpoint holds only the aggregators
    config = json.load(open(os.path.join(result.checkpoint, "config.json")))
    assert config["modules"] == ["aggregators"]
    afa_config = json.load(open(tmp_path / "final" / "afa" / "config.json"))
    assert afa_config["expert_ids"] == ["a", "b", "c"] and afa_config["num_experts"] == 3
    # the reference recipe is the default
    assert config["config"]["caption_dropout"] == 0.1
    options = config["config"]["options"]
    assert options["weight_decay"] == 0.01 and options["warmup_steps"] == 0 and options["grad_clip"] is None
    assert config["config"]["scheduler"]["beta_schedule"] == "scaled_linear"


def test_routing_loss_pulls_the_weights_toward_the_expert_that_denoises_best(tokenizer, tmp_path):
    from trainer.diffusion.losses import DiffusionLoss, schedule_from_config
    from trainer.models.afa import routing_divergence, routing_targets
    from trainer.training.conditioning import TextConditioner
    from trainer.training.objectives import AFAObjective, RoutingLoss

    routing = RoutingLoss(1.0, 0.5, 0.2)
    schedule, config = schedule_from_config(None)
    diffusion = DiffusionLoss(schedule, torch.device("cpu"), "none")
    text_encoder = small_text_encoder(tokenizer)
    data = colour_latents()
    x = torch.stack([x for x, _ in data] * 2)
    hidden, _, _ = TextConditioner(text_encoder, tokenizer, torch.device("cpu"), trainable=False)(
        [c for _, c in data] * 2)
    noisy, t, target = diffusion.noisy_inputs(x, torch.Generator().manual_seed(3))

    def divergence(weight: float) -> float:
        """KL from the routing targets after 30 steps trained with this routing weight."""
        ensemble = small_ensemble(2)
        with torch.no_grad():  # expert 1 is much worse: the targets send (nearly) everything to expert 0
            ensemble.unets[1].conv_out.weight.mul_(4.0)
        train_afa(ensemble, text_encoder, tokenizer, data, 30, batch_size=8, lr=1e-2, caption_dropout=0.0,
                  routing_loss=weight, routing_window=routing.window, routing_temperature=routing.temperature,
                  out_dir=str(tmp_path / str(weight)), **QUIET)
        objective = AFAObjective(ensemble, [text_encoder] * 2, [tokenizer] * 2, torch.device("cpu"), diffusion,
                                 config, 0.0, 0.0, 2, None, False, None, routing)
        with torch.no_grad():
            _, weights = ensemble(noisy, t, hidden)
            errors = objective._expert_errors(noisy, t, hidden, {}, target)
            return float(routing_divergence(weights, routing_targets(errors, routing.window, routing.temperature)))

    plain, routed = divergence(0.0), divergence(1.0)
    assert routed < 0.5 * plain
    run = json.load(open(tmp_path / "1.0" / "run_config.json"))
    assert run["routing"] == {"weight": 1.0, "window": 0.5, "temperature": 0.2}
    metrics = [json.loads(line) for line in open(tmp_path / "1.0" / "metrics.jsonl")]
    assert any("routing_kl" in m for m in metrics)


def test_afa_per_expert_text_encoders_are_stacked(tokenizer):
    ensemble = small_ensemble(2)
    encoders = [small_text_encoder(tokenizer, seed=1), small_text_encoder(tokenizer, seed=2)]
    seen = []
    original = ensemble.forward

    def spy(sample, timestep, ehs, mask=None, **kwargs):
        seen.append(ehs.shape)
        return original(sample, timestep, ehs, mask, **kwargs)

    ensemble.forward = spy
    train_afa(ensemble, encoders, [tokenizer, tokenizer], colour_latents(), 1, batch_size=2, **QUIET)
    assert seen == [torch.Size([2, 2, 77, TEXT_DIM])]


# ---------------------------------------------------------------------------------------------
# determinism and resuming


def unet_run(tokenizer, out_dir, steps, **kwargs):
    unet, text_encoder = small_unet(), small_text_encoder(tokenizer)
    data = [(x, [c, c.replace("a ", "one ")]) for x, c in colour_latents()]  # caption alternatives
    result = train_unet(unet, text_encoder, tokenizer, data, steps, batch_size=3, lr=2e-3, warmup_steps=2,
                        grad_clip=0.5, ema_decay=0.9, caption_dropout=0.3, train_text_encoder=True,
                        snr_weighting="min_snr", out_dir=str(out_dir), seed=7, **QUIET, **kwargs)
    return result, unet, text_encoder


def test_resume_equals_straight_training(tokenizer, tmp_path):
    first, _, _ = unet_run(tokenizer, tmp_path / "split", 3)
    assert first.step == 3
    second, unet_resumed, te_resumed = unet_run(tokenizer, tmp_path / "split", 6)
    assert second.start_step == 3 and second.step == 6
    straight, unet_straight, te_straight = unet_run(tokenizer, tmp_path / "straight", 6)

    assert first.losses + second.losses == straight.losses
    assert tensors_equal(unet_resumed.state_dict(), unet_straight.state_dict())
    assert tensors_equal(te_resumed.state_dict(), te_straight.state_dict())
    a = load_checkpoint_files(second.checkpoint)
    b = load_checkpoint_files(straight.checkpoint)
    assert tensors_equal(a["ema"], b["ema"])
    assert tensors_equal(a["state"], b["state"]) and tensors_equal(a["optimizer"], b["optimizer"])
    # the EMA differs from the raw weights, and final/ holds the EMA weights
    final_unet = load_unet(tmp_path / "straight" / "final" / "unet")
    ema_unet = {k[len("unet."):]: v for k, v in b["ema"].items() if k.startswith("unet.")}
    assert tensors_equal(final_unet.state_dict(), ema_unet)
    assert not tensors_equal(final_unet.state_dict(), unet_straight.state_dict())


def load_checkpoint_files(path):
    from trainer.io.safetensors import load_safetensors

    return {name: load_safetensors(os.path.join(path, f"{name}.safetensors")) for name in ("ema", "state", "optimizer")}


def test_time_budget_stops_with_a_checkpoint_and_resumes(tokenizer, tmp_path):
    result, _, _ = unet_run(tokenizer, tmp_path, 50, max_minutes=1e-5)
    assert result.stopped_by_budget and not result.completed and result.step == 1
    assert list_checkpoints(tmp_path) == [(1, result.checkpoint)]
    assert json.load(open(tmp_path / "final" / "training.json"))["completed"] is False
    resumed, _, _ = unet_run(tokenizer, tmp_path, 2)
    assert resumed.start_step == 1 and resumed.completed


def test_caption_dropout_rate():
    g = torch.Generator().manual_seed(0)
    dropped = drop_captions(["x"] * 20000, 0.1, g)
    assert 0.09 < dropped.count("") / 20000 < 0.11
    assert drop_captions(["x"] * 100, 0.0, g) == ["x"] * 100
    assert drop_captions(["x"] * 100, 1.0, g) == [""] * 100


def test_caption_dropout_inside_the_loop(tokenizer):
    unet, text_encoder = small_unet(), small_text_encoder(tokenizer)
    empty = tokenizer([""])[0]
    rows = []
    original = text_encoder.forward

    def spy(input_ids, attention_mask=None):
        rows.extend(input_ids)
        return original(input_ids, attention_mask)

    text_encoder.forward = spy
    global_rng = torch.get_rng_state()
    result = train_unet(unet, text_encoder, tokenizer, colour_latents(), 6, batch_size=16, caption_dropout=0.3,
                        checkpoint_every=3, evaluate=lambda step: {"n": len(rows)}, **QUIET)
    assert torch.equal(torch.get_rng_state(), global_rng)  # every draw comes from the run's own generator
    assert result.evaluations == [(3, {"n": 48}), (6, {"n": 96})]  # evaluations run without out_dir too
    assert len(rows) == 96
    dropped = sum(bool(torch.equal(r, empty)) for r in rows)
    assert 15 <= dropped <= 45  # expected 28.8 (binomial sd 4.5)


# ---------------------------------------------------------------------------------------------
# EMA


def test_ema_tracks_and_swaps():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = EMA({"p": p}, 0.5)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update(step=100)  # decay min(0.5, 101/110) = 0.5
    assert torch.allclose(ema.shadow["p"], torch.full((2,), 0.5))
    with ema.applied():
        assert torch.equal(p.detach(), torch.full((2,), 0.5))
    assert torch.equal(p.detach(), torch.ones(2))


# ---------------------------------------------------------------------------------------------
# CLI


def write_cli_fixture(tmp_path, tokenizer):
    from trainer.text.bpe import write_tokenizer_files

    merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
    write_tokenizer_files(tokenizer.encoder, merges, str(tmp_path / "tok"))
    images = tmp_path / "images"
    images.mkdir()
    for i, caption in enumerate(CAPTIONS):
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:, :, 0 if "red" in caption else 2] = 255
        write_png(str(images / f"{i}.png"), pixels)
        (images / f"{i}.txt").write_text(caption)
    unet_config = small_unet_config().to_dict()
    text_config = {"hidden_size": TEXT_DIM, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    vae_config = {"block_out_channels": [8, 16], "norm_num_groups": 4, "layers_per_block": 1}
    return {
        "data": {"type": "folder", "path": str(images)},
        "tokenizer": str(tmp_path / "tok"),
        "unet": {"config": unet_config},
        "text_encoder": {"config": text_config},
        "vae": {"config": vae_config},
        "train": {"batch_size": 2, "lr": 1e-3, "caption_dropout": 0.1, "log_every": 1},
    }


def test_cli_trains_vae_unet_and_afa(tokenizer, tmp_path, capsys):
    base = write_cli_fixture(tmp_path, tokenizer)
    vae_cfg = {**base, "out_dir": str(tmp_path / "vae"), "train": {"batch_size": 2, "kl_weight": 1e-4}}
    (tmp_path / "vae.json").write_text(json.dumps(vae_cfg))
    assert main(["vae", "--config", str(tmp_path / "vae.json"), "--steps", "1", "--device", "cpu"]) == 0
    assert os.path.isfile(tmp_path / "vae" / "final" / "vae" / "diffusion_pytorch_model.safetensors")

    unet_cfg = {**base, "out_dir": str(tmp_path / "unet"), "vae": {"pretrained": str(tmp_path / "vae" / "final")}}
    (tmp_path / "unet.json").write_text(json.dumps(unet_cfg))
    assert main(["unet", "--config", str(tmp_path / "unet.json"), "--steps", "1"]) == 0
    assert main(["unet", "--config", str(tmp_path / "unet.json"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 2/2  loss" in out and "ETA" in out
    final = tmp_path / "unet" / "final"
    assert {"unet", "tokenizer", "scheduler", "training.json"} <= set(os.listdir(final))
    assert CLIPTokenizer.from_dir(str(final / "tokenizer")).encode("a red circle") == tokenizer.encode("a red circle")

    save_text_encoder(small_text_encoder(tokenizer), tmp_path / "te")
    afa_cfg = {**base, "out_dir": str(tmp_path / "afa"), "vae": {"pretrained": str(tmp_path / "vae" / "final")},
               "experts": [{"pretrained": str(final)}, {"pretrained": str(final / "unet")}],
               "expert_ids": ["one", "two"], "text_encoders": {"pretrained": str(tmp_path / "te")},
               "afa": {"hidden": 16, "depth": 1, "heads": 2, "head_dim": 8},
               "train": {"batch_size": 2, "expert_dropout": 0.5}}
    seen = {}

    def make_evaluate(built):
        def evaluate(step):
            seen["step"] = step
            seen["ensemble_training"] = built["ensemble"].training
            return {"experts": built["ensemble"].num_experts}
        return evaluate

    result = run_from_config("afa", afa_cfg, {"steps": 1, "quiet": True}, make_evaluate=make_evaluate)
    assert result.completed and result.evaluations == [(1, {"experts": 2})]
    assert seen == {"step": 1, "ensemble_training": False}
    assert json.load(open(tmp_path / "afa" / "final" / "afa" / "config.json"))["expert_ids"] == ["one", "two"]

    with pytest.raises(ValueError, match="unknown train key.*bogus"):
        run_from_config("unet", {**unet_cfg, "train": {"bogus": 1}})


def test_options_reject_unknown_names():
    with pytest.raises(TypeError, match="learning_rate"):
        TrainOptions.build(None, learning_rate=1.0)
    assert TrainOptions.build({"adam_betas": [0.9, 0.99]}, steps=5).adam_betas == (0.9, 0.99)

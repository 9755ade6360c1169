"""How much an AFA aggregator can gain by routing, and whether it does.

`routing_signal`: per family, the denoising loss of the family's own expert against that of the
uniform ensemble (every SABW weight 1/N, what a zero-initialised aggregator starts from) and of the
average of the experts' outputs, on the same noise and timesteps. When the own expert is barely
better than the uniform ensemble, the plain diffusion loss gives the aggregator almost nothing to
learn from routing; the build measures it before the aggregators train.

`point_weights`: per family, each expert's mean SABW weight at each aggregation point; rows that barely
change between families mean the aggregator routes by layer, not by content.

`half_routing`: two-object scenes looked at half by half: each expert's error alone there, the routing
term's targets (trainer.models.afa.routing_targets) and the aggregators' weights.

On a build's run folder: `python3 -m trainer.routing_signal [--aggregators DIR] [--pairs N]`.
"""
from __future__ import annotations

import argparse
import os
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from trainer import REPO_ROOT
from trainer.demo import recipe as demo_recipe
from trainer.demo import shapes
from trainer.demo.products import RunProducts
from trainer.demo.recipe import FAMILY_IDS as FAMILIES
from trainer.diffusion.losses import DiffusionLoss, schedule_from_config
from trainer.io.model_folders import load_aggregators, load_text_encoder
from trainer.models.afa import AFAEnsemble, contribution_map, routing_targets
from trainer.text.bpe import CLIPTokenizer
from trainer.training.conditioning import TextConditioner
from trainer.training.loop import evaluating


class _NoisedScenes:
    """Scenes of one family as the diffusion loss sees them: text conditioning, noised latents and target."""

    def __init__(self, ensemble: AFAEnsemble, text_encoder: nn.Module, tokenizer: CLIPTokenizer,
                 scheduler_config: Optional[Mapping[str, object]]):
        self.device = next(ensemble.parameters()).device
        schedule, _ = schedule_from_config(scheduler_config)
        self.diffusion = DiffusionLoss(schedule, self.device, "none")
        self.conditioner = TextConditioner(text_encoder.to(self.device).eval(), tokenizer, self.device, trainable=False)
        self.needs_pooled = ensemble.unets[0].class_embedding is not None

    def batches(self, data, n: int, batch_size: int, seed: int) -> Iterator[Tuple[Tensor, Tensor, Tensor, dict, Tensor]]:
        """(noisy, timesteps, text, U-Net keyword arguments, target) for n scenes drawn with `seed`."""
        generator = torch.Generator().manual_seed(seed)
        take = torch.randperm(len(data.captions), generator=generator)[:n]
        for start in range(0, len(take), batch_size):
            rows = take[start:start + batch_size]
            hidden, pooled, _ = self.conditioner([data.captions[int(i)] for i in rows])
            noisy, t, target = self.diffusion.noisy_inputs(data.tensors[rows].to(self.device, torch.float32), generator)
            yield noisy, t, hidden, ({"class_labels": pooled} if self.needs_pooled else {}), target


@torch.no_grad()
def routing_signal(ensemble: AFAEnsemble, text_encoder: nn.Module, tokenizer: CLIPTokenizer,
                   family_data: Mapping[str, object], family_ids: Sequence[str],
                   scheduler_config: Optional[Mapping[str, object]], n: int = 128, batch_size: int = 32,
                   seed: int = 0) -> Dict[str, Dict[str, float]]:
    """family_data: family id → examples with `.tensors` (latents) and `.captions`; family_ids: the
    ensemble's experts in order. `ensemble`'s aggregators are used as they are (fresh ones are uniform).

    Returns per family {"own", "uniform", "output_average", "gain"} with gain = 1 - own / uniform:
    the share of the uniform ensemble's loss that sending every pixel to the right expert would remove.
    """
    scenes = _NoisedScenes(ensemble, text_encoder, tokenizer, scheduler_config)
    out: Dict[str, Dict[str, float]] = {}
    with evaluating(ensemble):
        for family, data in family_data.items():
            own = family_ids.index(family)
            sums = {"own": 0.0, "uniform": 0.0, "output_average": 0.0}
            count = 0
            for noisy, t, hidden, kwargs, target in scenes.batches(data, n, batch_size, seed):
                def loss(prediction: Tensor) -> float:
                    return float((prediction.float() - target).pow(2).flatten(1).mean(1).sum())

                singles = ensemble.each_alone(noisy, t, hidden, **kwargs)
                sums["own"] += loss(singles[own])
                sums["output_average"] += loss(torch.stack(singles).mean(0))
                sums["uniform"] += loss(ensemble(noisy, t, hidden, **kwargs)[0])
                count += len(noisy)
            result = {k: round(v / count, 5) for k, v in sums.items()}
            result["gain"] = round(1 - result["own"] / result["uniform"], 4) if result["uniform"] > 0 else 0.0
            out[family] = result
    return out


@torch.no_grad()
def point_weights(ensemble: AFAEnsemble, text_encoder: nn.Module, tokenizer: CLIPTokenizer,
                  family_data: Mapping[str, object], scheduler_config: Optional[Mapping[str, object]], n: int = 48,
                  seed: int = 0) -> Dict[str, List[List[float]]]:
    """Per family, the mean SABW weight of each expert at each aggregation point (over pixels, scenes and
    uniform timesteps): rows that barely change between families mean the aggregator routes by layer,
    not by what is drawn where."""
    scenes = _NoisedScenes(ensemble, text_encoder, tokenizer, scheduler_config)
    out: Dict[str, List[List[float]]] = {}
    with evaluating(ensemble):
        for family, data in family_data.items():
            noisy, t, hidden, kwargs, _ = next(scenes.batches(data, n, n, seed))
            _, weights = ensemble(noisy, t, hidden, **kwargs)
            out[family] = [[round(float(v), 3) for v in w.float().mean((0, 2, 3))] for w in weights]
    return out


@torch.no_grad()
def half_routing(ensemble: AFAEnsemble, text_encoder: nn.Module, tokenizer: CLIPTokenizer, latents: Tensor,
                 captions: Sequence[str], half_family: Tensor, scheduler_config: Optional[Mapping[str, object]],
                 window: float, temperature: float, seed: int = 0) -> Dict[int, Dict[str, object]]:
    """Two-object scenes, per half: who denoises it best, and who the aggregators give it to.

    latents [B,C,h,w] with captions; half_family [B,2]: the expert index of the object in the left and the
    right half (scenes whose two objects share an expert are skipped). Returns per expert index k, over the
    halves whose object is k's: "error" (mean squared ε error in the half of each expert alone, and last of
    the ensemble), "own_best" (share of halves where expert k alone has the lowest error), "target" (k's
    mean weight there under trainer.models.afa.routing_targets(window, temperature)) and "weight" (k's mean
    weight there under the aggregators, all points averaged as in the contribution maps).
    """
    scenes = _NoisedScenes(ensemble, text_encoder, tokenizer, scheduler_config)
    generator = torch.Generator().manual_seed(seed)
    hidden, pooled, _ = scenes.conditioner(list(captions))
    kwargs = {"class_labels": pooled} if scenes.needs_pooled else {}
    x0 = latents.to(scenes.device, torch.float32)
    noisy, t, target = scenes.diffusion.noisy_inputs(x0, generator)
    with evaluating(ensemble):
        predictions = ensemble.each_alone(noisy, t, hidden, **kwargs)
        aggregated, weights = ensemble(noisy, t, hidden, **kwargs)
    errors = torch.stack([(p.float() - target).pow(2).mean(1) for p in predictions + [aggregated]], 1)
    targets = routing_targets(errors[:, :-1], window, temperature)
    contributions = contribution_map(weights, x0.shape[-2:])
    mid = x0.shape[-1] // 2
    rows: Dict[int, List[Tuple[Tensor, int, float, float]]] = {}
    for b in range(len(x0)):
        if int(half_family[b, 0]) == int(half_family[b, 1]):
            continue
        for half, cols in enumerate((slice(0, mid), slice(mid, None))):
            k = int(half_family[b, half])
            e = errors[b, :, :, cols].mean((-1, -2)).cpu()
            rows.setdefault(k, []).append((e, int(e[:-1].argmin()), float(targets[b, k, :, cols].mean()),
                                           float(contributions[b, k, :, cols].mean())))
    out: Dict[int, Dict[str, object]] = {}
    for k, r in sorted(rows.items()):
        out[k] = {"halves": len(r), "error": [round(float(v), 4) for v in torch.stack([e for e, *_ in r]).mean(0)],
                  "own_best": round(sum(best == k for _, best, _, _ in r) / len(r), 3),
                  "target": round(sum(q for *_, q, _ in r) / len(r), 3),
                  "weight": round(sum(w for *_, w in r) / len(r), 3)}
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="How much the demo's aggregator can gain by routing (see module doc).")
    parser.add_argument("--run-dir", default=os.path.join(REPO_ROOT, "trainer", "runs", "demo"))
    parser.add_argument("--n", type=int, default=128, help="scenes per family")
    parser.add_argument("--aggregators", help="also show, per aggregation point, the mean weight of each expert "
                                              "under these trained aggregators (an afa/final folder)")
    parser.add_argument("--pairs", type=int, default=0, metavar="N",
                        help="also render N two-object scenes (positions stated) and show, per half, each expert's "
                             "error alone, the routing targets and the aggregators' weight")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    recipe = demo_recipe.recipe("cpu")
    products = RunProducts(recipe, os.path.abspath(args.run_dir), torch.device(recipe["device"]), log=lambda _: None)
    text_encoder, tokenizer = load_text_encoder(products.path("base", "final")), products.tokenizer()
    ensemble = products.build_ensemble(products.load_experts())  # fresh aggregators: the uniform ensemble
    family_data = {f: products.latents(f) for f in FAMILIES}
    signal = routing_signal(ensemble, text_encoder, tokenizer, family_data, list(FAMILIES), recipe["scheduler"], args.n)
    print("| family | own expert | uniform AFA | output average | gain |\n|---|---|---|---|---|")
    for family, s in signal.items():
        print(f"| {family} | {s['own']:.4f} | {s['uniform']:.4f} | {s['output_average']:.4f} | {s['gain']:.1%} |")
    if args.aggregators:
        load_aggregators(ensemble, args.aggregators)
        table = point_weights(ensemble, text_encoder, tokenizer, family_data, recipe["scheduler"], min(args.n, 48))
        print("\nmean weight of " + " / ".join(FAMILIES) + " at each aggregation point, by the scene's family\n")
        print("| point | " + " | ".join(FAMILIES) + " |\n|---|" + "---|" * len(FAMILIES))
        for i, point in enumerate(ensemble.points):
            cells = [" / ".join(f"{v:.2f}" for v in table[f][i]) for f in FAMILIES]
            print(f"| {i} {point.name} | " + " | ".join(cells) + " |")
    if args.pairs:
        a = recipe["afa"]
        batch = shapes.sample_batch(args.pairs, recipe["seed"] + 77, two_object_prob=1.0, omit_prob=0.0)
        latents = products.encode_images(products.vae(), batch.images)
        half_family = torch.tensor([[FAMILIES.index(shapes.family_of(shapes.SHAPES[int(s)])) for s in row]
                                    for row in batch.shape])
        table = half_routing(ensemble, text_encoder, tokenizer, latents, batch.captions, half_family,
                             recipe["scheduler"], a["routing_window"], a["routing_temperature"])
        print(f"\ntwo-object scenes, per half, by the family of its object (uniform timesteps; targets with window "
              f"{a['routing_window']}, temperature {a['routing_temperature']})\n")
        print("| family | halves | error of " + " / ".join(FAMILIES) + " alone / ensemble | own expert best | "
              "own expert's target weight | own expert's weight |\n|---|---|---|---|---|---|")
        for k, r in table.items():
            print(f"| {FAMILIES[k]} | {r['halves']} | " + " / ".join(f"{v:.4f}" for v in r["error"])
                  + f" | {r['own_best']:.0%} | {r['target']:.2f} | {r['weight']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

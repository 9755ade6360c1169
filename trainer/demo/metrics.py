"""How well the demo's models do, measured with the attribute classifier: images sampled for
captions and scored for prompt adherence, VAE reconstructions, and how an AFA ensemble routes the
two objects of a scene to their families' experts."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.demo import classifier as clf
from trainer.demo import shapes
from trainer.demo.products import to_signed
from trainer.demo.recipe import FAMILY_IDS
from trainer.diffusion.sampler import decode_latents, sample
from trainer.models.afa import contribution_map
from trainer.models.vae import AutoencoderKL
from trainer.text.bpe import CLIPTokenizer


@torch.no_grad()
def generate(model: torch.nn.Module, text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer,
             captions: Sequence[str], seed: int, *, vae: AutoencoderKL, device: torch.device, steps: int,
             guidance: float, scheduler_config: Dict[str, Any],
             ensemble: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Sampled images (uint8 [B,3,64,64]) for captions (DDIM), and the AFA contributions [B,N,h,w] (or None)."""
    dev = device
    hidden, pooled = (t.float() for t in text_encoder(tokenizer(list(captions)).to(dev)))
    uncond, uncond_pooled = (t.float() for t in text_encoder(tokenizer([""]).to(dev)))
    unet = model.unets[0] if ensemble else model
    side = shapes.IMAGE_SIZE // vae.config.downsample_factor
    batch = len(captions)
    # the sampler runs the guided batch as [uncond; cond]: pooled text must follow the same order
    guided_pooled = torch.cat([uncond_pooled.expand(batch, -1), pooled])

    def class_labels(rows: int):
        if unet.class_embedding is None:
            return None
        return guided_pooled if rows == 2 * batch else pooled

    if ensemble:
        n = model.num_experts
        hidden = hidden[None].expand(n, -1, -1, -1)
        uncond = uncond[None].expand(n, -1, -1, -1)

        def denoiser(x, t, text):
            out, weights = model(x.to(dev), t.to(dev), text, class_labels=class_labels(x.shape[0]))
            return out.float().cpu(), contribution_map([w.float() for w in weights], x.shape[-2:]).cpu()
    else:
        def denoiser(x, t, text):
            return model(x.to(dev), t.to(dev), text, None, class_labels(x.shape[0])).float().cpu()

    result = sample(denoiser, hidden, uncond, latent_shape=[len(captions), unet.config.in_channels, side, side],
                    seed=seed, steps=steps, guidance=guidance, scheduler="ddim", scheduler_config=scheduler_config)
    images = decode_latents(lambda z: vae.decode(z.to(dev)).float().cpu(), result.latents,
                            float(vae.config.scaling_factor))
    return images.permute(0, 3, 1, 2).contiguous(), result.contributions


def adherence_scores(classifier: clf.AttributeClassifier, images: torch.Tensor,
                     contributions: Optional[torch.Tensor], batch: shapes.ShapesBatch) -> Dict[str, Any]:
    """Prompt adherence of images sampled for batch's captions, the Fréchet distance of their classifier
    features to the rendered scenes', and (with contributions) the routing share."""
    pred = clf.predict(classifier, images)
    scores = clf.adherence(pred, batch)
    rendered = clf.predict(classifier, batch.images)["features"].numpy()
    scores["frechet"] = clf.frechet_distance(pred["features"].numpy(), rendered)
    out = {k: round(v, 4) for k, v in scores.items()}
    if contributions is not None:
        out["routing"] = routing_share(contributions, batch)
    return out


@torch.no_grad()
def vae_reconstruction(vae: AutoencoderKL, classifier: clf.AttributeClassifier, batch: shapes.ShapesBatch,
                       device: torch.device) -> Dict[str, Any]:
    """The classifier's accuracy on VAE reconstructions of renders: the cap on what any model
    trained on these latents can draw."""
    x = to_signed(batch.images).to(device)
    mean, _ = vae.encode(x)
    recon = vae.decode(mean).float()
    mse = float(torch.mean((recon.clamp(-1, 1) - x) ** 2))
    images = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    rebuilt = shapes.ShapesBatch(images=images, captions=batch.captions,
                                 **{k: getattr(batch, k) for k in shapes.LABEL_FIELDS})
    acc = clf.evaluate(classifier, rebuilt)
    return {"recon_mse": round(mse, 5), **{f"recon_{k}": round(a, 4) for k, a in acc.items()}}


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, world: shapes.ShapesBatch, n: int, device: torch.device) -> float:
    """1 / std of the latents (how SD's 0.18215 was chosen), so diffusion sees unit-variance data."""
    x = to_signed(world.images[:n]).to(device)
    means = torch.cat([vae.encode(x[i:i + 512])[0].float() for i in range(0, len(x), 512)])
    return float(1.0 / means.std())


def cross_family_pairs(batch: shapes.ShapesBatch) -> shapes.ShapesBatch:
    """The two-object scenes of a batch whose objects come from different families."""
    family_of_shape = torch.tensor([FAMILY_IDS.index(shapes.family_of(s)) for s in shapes.SHAPES])
    pair = batch.num_objects == 2
    left = family_of_shape[batch.shape[:, 0].clamp(min=0)]
    right = family_of_shape[batch.shape[:, 1].clamp(min=0)]
    keep = (pair & (left != right)).nonzero().squeeze(1)
    return batch.select(keep)


def routing_share(contributions: torch.Tensor, batch: shapes.ShapesBatch) -> Optional[float]:
    """Mean weight that the expert of each object's family carries in that object's half, over the
    cross-family two-object scenes of the batch (None when there are none)."""
    family_of_shape = torch.tensor([FAMILY_IDS.index(shapes.family_of(s)) for s in shapes.SHAPES])
    shares = []
    mid = contributions.shape[-1] // 2
    for b in range(len(batch)):
        if int(batch.num_objects[b]) != 2:
            continue
        fam = [int(family_of_shape[int(batch.shape[b, k])]) for k in range(2)]
        if fam[0] == fam[1]:
            continue
        stated_pos = bool(batch.stated[b, 0, shapes.ATTRIBUTES.index("position")])
        if not stated_pos:
            continue  # without stated positions the model may place either object on either side
        shares.append(float(contributions[b, fam[0], :, :mid].mean()))
        shares.append(float(contributions[b, fam[1], :, mid:].mean()))
    return round(float(np.mean(shares)), 4) if shares else None

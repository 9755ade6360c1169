"""AFA (Adaptive Feature Aggregation) over N frozen U-Nets with SABW aggregators.

At every aggregation point each U-Net runs its own layers on the same input; one SABW per point
turns the N feature maps into per-pixel softmax weights over the models and returns
Σ_i a_i ⊙ f_i, which every U-Net receives next (skips hold aggregated features too), as the AFA
reference code does.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.unet_blocks import BasicTransformerBlock, ResnetBlock2D, attention_bias

# Logit given to absent experts. Finite (and within float16 range) so the graph stays NaN-free
# in ONNX and fp16; softmax of it next to any realistic logit is exactly 0.
ABSENT_LOGIT = -1.0e4


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class SpatialTransformer(nn.Module):
    """Transformer2D: GN → 1×1 in → [self-attn, cross-attn to text, GEGLU FF] × depth → 1×1 out, residual."""

    def __init__(self, channels: int, heads: int, head_dim: int, context_dim: int, depth: int,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * head_dim
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6, **kw)
        self.proj_in = nn.Conv2d(channels, inner, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast=False, **kw) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, channels, 1, **kw)

    def forward(self, x: Tensor, context: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        b, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.permute(0, 2, 3, 1).reshape(b, height * width, inner)
        for block in self.transformer_blocks:
            h = block(h, context, bias)
        h = h.reshape(b, height, width, inner).permute(0, 3, 1, 2)
        return self.proj_out(h) + x


class SABW(nn.Module):
    """Spatial-Aware Block-Wise aggregator for one point: N feature maps → per-pixel weights."""

    def __init__(self, num_experts: int, channels: int, temb_dim: int, context_dim: int, hidden: int = 128,
                 depth: int = 2, heads: int = 8, head_dim: int = 16, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.num_experts = num_experts
        self.proj_in = nn.Conv2d(num_experts * channels, hidden, 1, **kw)
        self.resnet = ResnetBlock2D(hidden, hidden, temb_dim, _groups(hidden), 1e-5, **kw)
        self.transformer = SpatialTransformer(hidden, heads, head_dim, context_dim, depth, **kw)
        self.to_logits = nn.Conv2d(hidden, num_experts, 1, **kw)
        # zero logits: training starts from the uniform average of the experts
        nn.init.zeros_(self.to_logits.weight)
        nn.init.zeros_(self.to_logits.bias)

    def forward(self, features: Tensor, temb: Tensor, context: Tensor, mask: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B,N,C,h,w], temb [B,T], context [B,M,D], mask [B,N] (1 present, 0 absent).

        Returns the aggregated [B,C,h,w] and the weights [B,N,h,w] (summing to 1 over N).
        """
        if mask is not None:
            present = mask[:, :, None, None, None] > 0
            features = torch.where(present, features, torch.zeros_like(features))
        x = self.proj_in(features.flatten(1, 2))
        x = self.resnet(x, temb)
        x = self.transformer(x, context, bias)
        logits = self.to_logits(x)
        if mask is not None:
            logits = torch.where(mask[:, :, None, None] > 0, logits, torch.full_like(logits, ABSENT_LOGIT))
        weights = logits.softmax(dim=1)
        return (weights.unsqueeze(2) * features).sum(1), weights


def _context_dim(unet: nn.Module) -> int:
    dims = unet.config.cross_attention_dims()
    if len(set(dims)) != 1:
        raise ValueError(f"U-Net blocks use different cross_attention_dim {dims}; one text width is needed")
    return int(dims[0])


def _check_same_points(unets: Sequence[nn.Module]) -> None:
    reference = list(unets[0].points)
    for k, unet in enumerate(unets[1:], start=1):
        points = list(unet.points)
        if len(points) != len(reference):
            raise ValueError(f"expert {k} has {len(points)} aggregation points, expert 0 has {len(reference)}")
        for i, (a, b) in enumerate(zip(reference, points)):
            if a != b:
                raise ValueError(f"expert {k} differs from expert 0 at aggregation point {i}: {b} vs {a}")
        if unet.config.time_embed_dim != unets[0].config.time_embed_dim:
            raise ValueError(f"expert {k} has time embedding width {unet.config.time_embed_dim}, "
                             f"expert 0 has {unets[0].config.time_embed_dim}")
        if _context_dim(unet) != _context_dim(unets[0]):
            raise ValueError(f"expert {k} has text width {_context_dim(unet)}, expert 0 has {_context_dim(unets[0])}")


class AFAEnsemble(nn.Module):
    """N frozen U-Nets with identical point structure, fused by one trainable SABW per point."""

    def __init__(self, unets: Sequence[nn.Module], hidden: int = 128, depth: int = 2, heads: int = 8,
                 head_dim: int = 16, device=None, dtype=None):
        super().__init__()
        if len(unets) < 2:
            raise ValueError(f"an AFA ensemble needs at least 2 U-Nets, got {len(unets)}")
        _check_same_points(unets)
        if device is None:
            device = next(unets[0].parameters()).device
        self.unets = nn.ModuleList(unets)
        for unet in self.unets:
            unet.requires_grad_(False)
            unet.eval()
        self.points = list(unets[0].points)
        temb_dim = unets[0].config.time_embed_dim
        context_dim = _context_dim(unets[0])
        self.aggregators = nn.ModuleList([
            SABW(len(unets), p.channels, temb_dim, context_dim, hidden, depth, heads, head_dim,
                 device=device, dtype=dtype)
            for p in self.points
        ])

    @property
    def num_experts(self) -> int:
        return len(self.unets)

    def train(self, mode: bool = True) -> "AFAEnsemble":
        super().train(mode)
        for unet in self.unets:  # frozen experts stay in eval mode
            unet.eval()
        return self

    def aggregator_parameters(self) -> List[nn.Parameter]:
        return list(self.aggregators.parameters())

    def count_parameters(self) -> int:
        """Trainable size: the parameters of all SABW aggregators (U-Nets not included)."""
        return sum(p.numel() for p in self.aggregators.parameters())

    def _batch_mask(self, expert_mask: Optional[Tensor], batch: int, like: Tensor) -> Optional[Tensor]:
        if expert_mask is None:
            return None
        mask = expert_mask.to(device=like.device, dtype=like.dtype)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0).expand(batch, -1)
        if mask.shape[-1] != self.num_experts:
            raise ValueError(f"expert_mask has {mask.shape[-1]} entries for {self.num_experts} experts")
        if not torch.jit.is_tracing() and bool((mask.sum(1) <= 0).any()):
            raise ValueError("expert_mask must keep at least one expert")
        return mask

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, expert_mask: Optional[Tensor] = None,
                *, encoder_attention_mask: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """Aggregated prediction [B,C,h,w] and the SABW weights of every point, [B,N,h_i,w_i] each.

        encoder_hidden_states: [N,B,M,D] (expert i's own text embeddings) or [B,M,D] shared.
        expert_mask: [N] or [B,N], 1 = present, 0 = absent (weight exactly 0, features unused).
        encoder_attention_mask ([B,M] keep-mask) and class_labels ([N,B,P] or [B,P], for U-Nets with
        a projection class embedding) are passed to every U-Net; the mask also to the aggregators.
        """
        batch = sample.shape[0]
        n = self.num_experts
        ehs = encoder_hidden_states
        if ehs.dim() == 3:
            ehs = ehs.unsqueeze(0).expand(n, -1, -1, -1)
        elif ehs.shape[0] != n:
            raise ValueError(f"encoder_hidden_states has {ehs.shape[0]} experts on axis 0, ensemble has {n}")
        if class_labels is not None and class_labels.dim() == 2:
            class_labels = class_labels.unsqueeze(0).expand(n, -1, -1)
        mask = self._batch_mask(expert_mask, batch, sample)

        kwargs = {} if encoder_attention_mask is None else {"encoder_attention_mask": encoder_attention_mask}
        tembs = [
            unet.embed_time(timestep, batch, sample.dtype, *(() if class_labels is None else (class_labels[k],)))
            for k, unet in enumerate(self.unets)
        ]
        cond_temb, cond_text = self._conditioning(torch.stack(tembs, 1), ehs, mask)
        bias = attention_bias(encoder_attention_mask, sample.dtype)

        skips: List[Tensor] = []
        h = sample
        weights: List[Tensor] = []
        for i, point in enumerate(self.points):
            features = []
            popped = None
            for k, unet in enumerate(self.unets):
                own_skips = list(skips)
                features.append(unet.run_point(i, h, tembs[k], ehs[k], own_skips, **kwargs))
                n_popped = len(skips) - len(own_skips)
                if popped is not None and n_popped != popped:
                    raise RuntimeError(f"experts popped different numbers of skips at point {point.name}")
                popped = n_popped
            if popped:
                del skips[len(skips) - popped:]
            h, w = self.aggregators[i](torch.stack(features, 1), cond_temb, cond_text, mask, bias)
            weights.append(w)
            if point.pushes_skip:
                skips.append(h)
        return h, weights

    def each_alone(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, **kwargs) -> List[Tensor]:
        """Every expert's own prediction for the same input, without aggregation. encoder_hidden_states and
        class_labels are per expert ([N,B,…]) or shared, as in forward; other keywords go to every U-Net."""
        out = []
        for k, unet in enumerate(self.unets):
            own = {key: (v[k] if key == "class_labels" and v.dim() == 3 else v) for key, v in kwargs.items()}
            hidden = encoder_hidden_states if encoder_hidden_states.dim() == 3 else encoder_hidden_states[k]
            out.append(unet(sample, timestep, hidden, **own))
        return out

    @staticmethod
    def _conditioning(tembs: Tensor, ehs: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Mean over present experts of the time embeddings [B,N,T] and text embeddings [N,B,M,D]."""
        if mask is None:
            return tembs.mean(1), ehs.mean(0)
        share = mask / mask.sum(1, keepdim=True)  # [B,N]
        present = mask > 0
        tembs = torch.where(present[:, :, None], tembs, torch.zeros_like(tembs))
        ehs = torch.where(present.t()[:, :, None, None], ehs, torch.zeros_like(ehs))
        return (tembs * share[:, :, None]).sum(1), (ehs * share.t()[:, :, None, None]).sum(0)


def contribution_map(weights: Sequence[Tensor], size: Sequence[int]) -> Tensor:
    """Per-point [B,N,h_i,w_i] weights → [B,N,h,w]: each resized (bilinear) to `size`, then averaged."""
    size = tuple(size)
    resized = [
        w if tuple(w.shape[-2:]) == size else F.interpolate(w, size=size, mode="bilinear", align_corners=False)
        for w in weights
    ]
    return torch.stack(resized).mean(0)


def routing_targets(errors: Tensor, window: float, temperature: float, mask: Optional[Tensor] = None) -> Tensor:
    """Which expert denoises each region best, as target weights [B,N,h,w] for the aggregators.

    errors: [B,N,h,w] squared error of each expert run alone (mean over channels); each map is averaged
    over a square window `window`·w pixels wide (odd, at least 1), so an object's expert also claims the
    background around it, then turned into softmax(-log(error) / temperature) over the experts: an
    expert with half the error of another gets 2^(1/temperature) times its weight. mask [B,N] (0 = absent)
    gives absent experts target 0.
    """
    k = max(1, int(round(window * errors.shape[-1])) // 2 * 2 + 1)
    smooth = F.avg_pool2d(errors.float(), k, stride=1, padding=k // 2, count_include_pad=False)
    logits = -smooth.clamp_min(1e-12).log() / temperature
    if mask is not None:
        logits = torch.where(mask[:, :, None, None] > 0, logits, torch.full_like(logits, ABSENT_LOGIT))
    return logits.softmax(1)


def routing_divergence(weights: Sequence[Tensor], targets: Tensor) -> Tensor:
    """Mean over aggregation points of KL(targets ‖ weights) per pixel, the targets area-resized to each
    point's resolution: 0 when every point routes as the targets say."""
    total = targets.new_zeros(())
    for w in weights:
        q = targets if tuple(w.shape[-2:]) == tuple(targets.shape[-2:]) else F.interpolate(targets, size=w.shape[-2:], mode="area")
        kl = torch.xlogy(q, q) - q * w.float().clamp_min(1e-12).log()
        total = total + kl.sum(1).mean()
    return total / len(weights)


class AFAExport(nn.Module):
    """ONNX-friendly wrapper: (sample, timestep, encoder_hidden_states[, expert_mask]) → (out_sample, contributions).

    Export with args (sample, timestep, ehs) for a graph without subsets, or with the mask as 4th.
    """

    def __init__(self, ensemble: AFAEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                expert_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        out, weights = self.ensemble(sample, timestep, encoder_hidden_states, expert_mask)
        return out, contribution_map(weights, sample.shape[-2:])


def random_expert_mask(n: int, batch: Optional[int], p_drop: float, generator: Optional[torch.Generator] = None,
                       min_keep: int = 2) -> Tensor:
    """Expert dropout for training: float32 [n] (or [batch, n]) of 1 (kept) / 0 (dropped).

    Each expert is dropped with probability p_drop; if fewer than min(min_keep, n) survive,
    randomly chosen dropped experts are restored. The default keeps at least 2: with one expert
    every weight is forced to 1, so such a sample gives the aggregators no gradient at all.
    """
    rows = 1 if batch is None else batch
    keep_at_least = min(min_keep, n)
    kept = torch.rand(rows, n, generator=generator) >= p_drop
    # rank kept experts first, the rest in random order, and force the top keep_at_least on
    priority = kept.float() * 2 + torch.rand(rows, n, generator=generator)
    top = priority.topk(keep_at_least, dim=1).indices
    kept = kept.scatter(1, top, True)
    mask = kept.float()
    return mask[0] if batch is None else mask

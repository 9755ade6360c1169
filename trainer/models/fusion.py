"""Training-free feature fusion of N frozen U-Nets (MaxFusion-style, ECCV 2024), at AFA's points.

`FusionEnsemble` is an `AFAEnsemble` whose aggregators have no parameters: at every aggregation point
where AFA's SABW would fuse the experts' features, expert i gets the per-pixel weight

    w_i(x) = softmax_i( log r_i(x) / T ),    r_i(x) = v_i(x) / mean_x' v_i(x')

with v_i(x) the variance over channels of expert i's feature at pixel x (how strongly the expert
expresses something there, MaxFusion's signal) and r_i its ratio to the expert's own spatial mean
variance at that point (so that an expert with globally larger activations does not win everywhere).
Equivalently w_i ∝ r_i^(1/T): T = 1 weighs by relative variance, T → 0 takes the expert of largest
relative variance (MaxFusion's "max"), T → ∞ is the plain feature average. Constant features
(v = 0) get weight ~0; identical experts get 1/N.

`text=True` also weighs each expert by how much its pixels attend to the prompt: at points with
cross-attention, s_i(x) = 1 − (attention on the first, BOS, token), averaged over heads and layers,
and the logit becomes log(r_i · s_i) / T. (The BOS token soaks up the attention of pixels that the
text does not concern; the rest goes to the words and the sentence summary in EOS.)

Absent experts (expert_mask 0) get logit ABSENT_LOGIT, hence weight exactly 0, as in AFA.
Forward, the expert mask, the per-expert text embeddings and `contribution_map` work as in AFA, so the
exported graph (trainer.export.graphs.export_afa) has exactly the AFA graph's inputs and outputs.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.models.afa import ABSENT_LOGIT, AFAEnsemble, _check_same_points
from trainer.models.unet_blocks import Attention, Transformer2DModel

DEFAULT_TEMPERATURE = 1.0
# Present experts' logits are clamped to ±LOGIT_LIMIT so that a tiny temperature can never push a
# present expert below an absent one (ABSENT_LOGIT) nor overflow.
LOGIT_LIMIT = 5.0e3
EPS = 1e-6


def relative_variance(features: Tensor) -> Tensor:
    """features [B,N,C,h,w] → r [B,N,h,w]: each pixel's variance over channels divided by the mean of that
    variance over the expert's pixels (0 where an expert's features are constant)."""
    v = features.float().var(dim=2, unbiased=False)
    return v / (v.mean(dim=(-2, -1), keepdim=True) + 1e-12)


def fusion_weights(features: Tensor, temperature: float, mask: Optional[Tensor] = None,
                   text_scores: Optional[Tensor] = None) -> Tensor:
    """Per-pixel weights [B,N,h,w] (summing to 1 over N) of the variance rule; see the module doc.

    mask [B,N] (1 present, 0 absent); text_scores [B,N,h,w] in (0, 1] or None."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    score = relative_variance(features)
    if text_scores is not None:
        score = score * text_scores.float()
    logits = (score + EPS).log() / temperature
    # minimum/maximum, not clamp: the exporter's Clip needs the input's type, which the weightless trace
    # of large graphs (trainer.export.large_graph: no ONNX shape inference) does not know
    logits = torch.minimum(torch.maximum(logits, logits.new_tensor(-LOGIT_LIMIT)), logits.new_tensor(LOGIT_LIMIT))
    if mask is not None:
        logits = torch.where(mask[:, :, None, None] > 0, logits, torch.full_like(logits, ABSENT_LOGIT))
    return logits.softmax(dim=1).to(features.dtype)


class _AttentionRecorder:
    """While active, forward hooks on the experts' cross-attention modules store, per expert, each
    layer's share of attention that does not go to token 0 as a map [B,1,h',w'] (mean over heads) at
    the resolution the layer ran at (read from its Transformer2DModel's input)."""

    def __init__(self, unets: Sequence[nn.Module]):
        self.attention: Dict[nn.Module, int] = {}
        self.transformers: Dict[nn.Module, int] = {}
        for k, unet in enumerate(unets):
            for name, module in unet.named_modules():
                if isinstance(module, Attention) and name.endswith("attn2"):
                    self.attention[module] = k
                elif isinstance(module, Transformer2DModel):
                    self.transformers[module] = k
        self.records: List[List[Tensor]] = [[] for _ in unets]
        self.grid: List[Optional[Tuple]] = [None for _ in unets]
        self.handles: list = []

    def __enter__(self) -> "_AttentionRecorder":
        for module in self.transformers:
            self.handles.append(module.register_forward_pre_hook(self._grid_hook))
        for module in self.attention:
            self.handles.append(module.register_forward_hook(self._attention_hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.records = [[] for _ in self.records]

    def _grid_hook(self, module: nn.Module, inputs) -> None:
        x = inputs[0]
        self.grid[self.transformers[module]] = (x.shape[-2], x.shape[-1])

    def _attention_hook(self, module: Attention, inputs, output) -> None:
        x, context = inputs[0], inputs[1]
        bias = inputs[2] if len(inputs) > 2 else None
        k_expert = self.attention[module]
        b = x.shape[0]
        q = module.to_q(x).reshape(b, -1, module.heads, module.head_dim).transpose(1, 2)
        k = module.to_k(context).reshape(b, -1, module.heads, module.head_dim).permute(0, 2, 3, 1)
        scores = torch.matmul(q.float() * module.scale, k.float())
        if bias is not None:
            scores = scores + bias.float()
        first = scores.softmax(dim=-1)[..., 0].mean(1)  # [B, tokens]
        height, width = self.grid[k_expert]
        self.records[k_expert].append((1.0 - first).reshape(b, 1, height, width))

    def take(self, size: Sequence) -> Optional[Tensor]:
        """The scores recorded since the last call as [B,N,h,w] at `size`, the mean over the point's
        layers (None when the point has no cross-attention); clears them."""
        if not self.records[0]:
            return None
        maps = []
        for layers in self.records:
            resized = [r if tuple(r.shape[-2:]) == tuple(size) else
                       F.interpolate(r, size=size, mode="bilinear", align_corners=False) for r in layers]
            maps.append(torch.stack(resized).mean(0)[:, 0])
        self.records = [[] for _ in self.records]
        return torch.stack(maps, 1).clamp_min(EPS)


class VarianceFusion(nn.Module):
    """The aggregator of one point, with SABW's call signature and no parameters."""

    def __init__(self, temperature: float, recorder: Optional[_AttentionRecorder] = None):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.recorder = recorder

    def forward(self, features: Tensor, temb: Tensor, context: Tensor, mask: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B,N,C,h,w] → (Σ_i w_i ⊙ f_i [B,C,h,w], w [B,N,h,w]); temb, context and bias unused."""
        if mask is not None:
            present = mask[:, :, None, None, None] > 0
            features = torch.where(present, features, torch.zeros_like(features))
        text = self.recorder.take(features.shape[-2:]) if self.recorder is not None else None
        weights = fusion_weights(features, self.temperature, mask, text)
        return (weights.unsqueeze(2) * features).sum(1), weights


class FusionEnsemble(AFAEnsemble):
    """N frozen U-Nets with identical point structure, fused at AFA's points by the variance rule.

    No trainable parameters; forward, each_alone and the expert mask behave as AFAEnsemble's."""

    def __init__(self, unets: Sequence[nn.Module], temperature: float = DEFAULT_TEMPERATURE, text: bool = False):
        nn.Module.__init__(self)
        if len(unets) < 2:
            raise ValueError(f"a fused ensemble needs at least 2 U-Nets, got {len(unets)}")
        _check_same_points(unets)
        self.unets = nn.ModuleList(unets)
        for unet in self.unets:
            unet.requires_grad_(False)
            unet.eval()
        self.points = list(unets[0].points)
        self.temperature = float(temperature)
        self.text = bool(text)
        self._recorder = _AttentionRecorder(unets) if text else None
        self.aggregators = nn.ModuleList([VarianceFusion(temperature, self._recorder) for _ in self.points])

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, expert_mask: Optional[Tensor] = None,
                *, encoder_attention_mask: Optional[Tensor] = None,
                class_labels: Optional[Tensor] = None) -> Tuple[Tensor, List[Tensor]]:
        """As AFAEnsemble.forward: the fused prediction and the weights of every point."""
        if self._recorder is None:
            return super().forward(sample, timestep, encoder_hidden_states, expert_mask,
                                   encoder_attention_mask=encoder_attention_mask, class_labels=class_labels)
        with self._recorder:
            return super().forward(sample, timestep, encoder_hidden_states, expert_mask,
                                   encoder_attention_mask=encoder_attention_mask, class_labels=class_labels)

    def describe(self) -> str:
        return f"variance fusion, temperature {self.temperature:g}" + (", text-weighted" if self.text else "")

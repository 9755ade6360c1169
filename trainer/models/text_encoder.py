"""CLIP text encoder with Hugging Face CLIPTextModel's state_dict layout (SD1.x text encoders load as-is).

Attention is written with matmul/softmax so that it runs on torch 1.13 and exports to ONNX opset 17.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

# Older transformers checkpoints save this buffer; it is derivable, so it is dropped on load.
HF_POSITION_IDS_KEY = "text_model.embeddings.position_ids"


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    pad_token_id: int = 49407
    # Derive a padding mask from input_ids (everything after the first EOS) when no attention_mask is
    # passed, so an exported graph with only input_ids masks padding the way training did.
    mask_padding: bool = False

    @classmethod
    def sd15(cls) -> "TextEncoderConfig":
        """openai/clip-vit-large-patch14's text tower, as used by SD1.x."""
        return cls(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)

    @classmethod
    def tiny(cls, vocab_size: int = 49408, **overrides) -> "TextEncoderConfig":
        fields = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return asdict(self)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return nn.functional.gelu
    raise ValueError(f"unsupported hidden_act {name!r} (expected 'quick_gelu' or 'gelu')")


def padding_mask_from_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS, 0 after it (CLIP pads with EOS, so the first EOS ends the text)."""
    is_eos = (input_ids == eos_token_id).to(torch.int64)
    eos_seen_before = torch.cumsum(is_eos, dim=-1) - is_eos
    return (eos_seen_before == 0).to(torch.int64)


def first_eos_index(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    # int32 because onnxruntime's ArgMax has no int64 kernel; ArgMax returns the first maximum.
    return torch.argmax((input_ids == eos_token_id).to(torch.int32), dim=-1)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size, device=device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:seq_len].unsqueeze(0)


class CLIPAttention(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        d = config.hidden_size
        if d % config.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(d, d, device=device)
        self.k_proj = nn.Linear(d, d, device=device)
        self.v_proj = nn.Linear(d, d, device=device)
        self.out_proj = nn.Linear(d, d, device=device)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """allowed: bool, broadcastable to [B, heads, N, N]; False entries are not attended to."""
        b, n, d = hidden.shape
        q = self._heads(self.q_proj(hidden) * self.scale)
        k = self._heads(self.k_proj(hidden))
        v = self._heads(self.v_proj(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(b, n, d)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.act = _activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size, device=device)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.self_attn = CLIPAttention(config, device=device)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        self.mlp = CLIPMLP(config, device=device)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), allowed)
        return hidden + self.mlp(self.layer_norm2(hidden))


class CLIPEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config, device=device) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, allowed)
        return hidden


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, device=device)
        self.encoder = CLIPEncoder(config, device=device)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, device=device)
        p = config.max_position_embeddings
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        self.register_buffer("causal_allowed", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        seq_len = input_ids.shape[-1]
        if attention_mask is None and self.config.mask_padding:
            attention_mask = padding_mask_from_ids(input_ids, self.config.eos_token_id)
        allowed = self.causal_allowed[:seq_len, :seq_len]
        if attention_mask is not None:
            allowed = allowed & (attention_mask != 0)[:, None, None, :]
        hidden = self.encoder(self.embeddings(input_ids), allowed)
        last_hidden_state = self.final_layer_norm(hidden)
        eos_index = first_eos_index(input_ids, self.config.eos_token_id)
        gather_index = eos_index[:, None, None].expand(-1, 1, last_hidden_state.shape[-1])
        # [:, 0], not squeeze(1): the exporter writes a dynamic squeeze as an If node, and onnxruntime cannot
        # reopen the optimized graph it saves from one (its If branch repeats a main-graph initializer's name)
        pooler_output = torch.gather(last_hidden_state, 1, gather_index)[:, 0]
        return last_hidden_state, pooler_output


class CLIPTextEncoder(nn.Module):
    """forward(input_ids [B,N] int64, attention_mask=None) -> (last_hidden_state [B,N,D], pooler_output [B,D]).

    pooler_output is the final-layer-normed state at the first EOS token. attention_mask (1 = real token,
    including BOS and EOS; 0 = padding) additionally hides padding keys; without it the computation is
    exactly CLIP's (causal mask only), unless config.mask_padding derives the mask from the ids.
    """

    def __init__(self, config: TextEncoderConfig, device=None):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config, device=device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        return self.text_model(input_ids, attention_mask)

    def load_hf_state_dict(self, state_dict: dict, strict: bool = True):
        """Load a Hugging Face CLIPTextModel state_dict (tolerates the legacy position_ids buffer)."""
        state_dict = {k: v for k, v in state_dict.items() if k != HF_POSITION_IDS_KEY}
        return self.load_state_dict(state_dict, strict=strict)


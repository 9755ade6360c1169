"""Text conditioning for the diffusion objectives: captions through a tokenizer and a text encoder,
and caption dropout for classifier-free guidance."""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from trainer.models.text_encoder import padding_mask_from_ids
from trainer.text.bpe import CLIPTokenizer


def drop_captions(captions: Sequence[str], p: float, generator: Optional[torch.Generator] = None) -> List[str]:
    """Each caption replaced by "" with probability p (classifier-free guidance training).
    Always draws one number per caption, so the random stream does not depend on p."""
    draws = torch.rand(len(captions), generator=generator)
    return ["" if float(u) < p else c for u, c in zip(draws, captions)]


def _check_tokenizer(text_encoder: nn.Module, tokenizer: CLIPTokenizer, what: str) -> None:
    config = text_encoder.config
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens, the text encoder only "
                         f"{config.vocab_size}")
    if tokenizer.eos_token_id != config.eos_token_id:
        raise ValueError(f"{what}: the tokenizer's <|endoftext|> is {tokenizer.eos_token_id}, the text encoder's "
                         f"eos_token_id is {config.eos_token_id}")


class TextConditioner:
    """Captions → (hidden states [B,77,D], pooled [B,D], padding mask [B,77]) through one text encoder."""

    def __init__(self, text_encoder: nn.Module, tokenizer: CLIPTokenizer, device: torch.device, trainable: bool):
        _check_tokenizer(text_encoder, tokenizer, "text conditioning")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.device = device
        self.trainable = trainable
        self._ids: Dict[str, Tensor] = {}

    def input_ids(self, captions: Sequence[str]) -> Tensor:
        for caption in captions:
            if caption not in self._ids:
                self._ids[caption] = self.tokenizer([caption])[0]
        return torch.stack([self._ids[c] for c in captions]).to(self.device)

    def __call__(self, captions: Sequence[str]) -> Tuple[Tensor, Tensor, Tensor]:
        ids = self.input_ids(captions)
        with contextlib.nullcontext() if self.trainable else torch.no_grad():
            hidden, pooled = self.text_encoder(ids)
        return hidden, pooled, padding_mask_from_ids(ids, self.tokenizer.eos_token_id)

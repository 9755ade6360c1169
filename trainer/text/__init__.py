"""Text: the CLIP byte-level BPE tokenizer (SD1.x's, or one trained here on captions)."""

"""CLIP byte-level BPE: a Python tokenizer matching SD1.x's CLIPTokenizer, and a trainer for new vocabularies.

Text rules (the engine's tokenizer, src/engine/tokenizer.ts, follows the same ones):
lower-case, collapse whitespace, split with CLIP's pattern, map bytes through GPT-2's byte→unicode
table, run BPE with `</w>` on the last symbol of each word. OpenAI's original also runs ftfy and
html.unescape; those are left out here so that training and the engine tokenise identically.

Files are in Hugging Face's format: `vocab.json` (token → id) and `merges.txt` (`#version: 0.2`,
then one merge `a b` per line, highest priority first).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
CONTEXT_LENGTH = 77
MERGES_HEADER = "#version: 0.2"
# Hugging Face's CLIPTokenizer reads merges.txt lines 1 .. 49152-256-2 and ignores the rest.
HF_MAX_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, chars)}


def _class_ranges(predicate) -> str:
    """A regex character-class body covering every code point for which predicate(category) holds."""
    parts: list[str] = []
    start = None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and predicate(unicodedata.category(chr(cp)))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            last = cp - 1
            parts.append(re.escape(chr(start)) if start == last else f"{re.escape(chr(start))}-{re.escape(chr(last))}")
            start = None
    return "".join(parts)


@lru_cache(maxsize=1)
def clip_split_pattern() -> re.Pattern:
    """CLIP's pre-tokenisation pattern; Python's `re` lacks \\p{L}/\\p{N}, so they are built from unicodedata."""
    letters = _class_ranges(lambda cat: cat.startswith("L"))
    numbers = _class_ranges(lambda cat: cat.startswith("N"))
    return re.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"
        rf"|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+",
        re.IGNORECASE,
    )


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def pre_tokenize(text: str) -> list[str]:
    """Normalised text split into CLIP words (before byte mapping and BPE)."""
    return clip_split_pattern().findall(normalize_text(text))


def word_symbols(word: str) -> tuple[str, ...]:
    """A word as its byte-unicode symbols, the last carrying `</w>`."""
    byte_encoder = bytes_to_unicode()
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    chars[-1] = chars[-1] + END_OF_WORD
    return tuple(chars)


def _pairs(symbols: Sequence[str]) -> set[tuple[str, str]]:
    return {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}


def _merge_pair(symbols: Sequence[str], first: str, second: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
            out.append(first + second)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def read_merges(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().strip().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for line in lines[:HF_MAX_MERGES]:
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], context_length: int = CONTEXT_LENGTH):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.context_length = context_length
        self.bos_token_id = self.encoder[BOS_TOKEN]
        self.eos_token_id = self.encoder[EOS_TOKEN]
        self.pad_token_id = self.eos_token_id
        self._cache: dict[str, str] = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}

    @classmethod
    def from_files(cls, vocab_path: str, merges_path: str, **kwargs) -> "CLIPTokenizer":
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        return cls(vocab, read_merges(merges_path), **kwargs)

    @classmethod
    def from_dir(cls, directory: str, **kwargs) -> "CLIPTokenizer":
        return cls.from_files(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"), **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> str:
        """BPE of one pre-tokenised word (already byte-mapped); symbols joined by spaces."""
        if word in self._cache:
            return self._cache[word]
        symbols = tuple(word[:-1]) + (word[-1] + END_OF_WORD,)
        while len(symbols) > 1:
            best = min(_pairs(symbols), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            symbols = _merge_pair(symbols, *best)
        result = " ".join(symbols)
        self._cache[word] = result
        return result

    def tokenize(self, text: str) -> list[str]:
        byte_encoder = bytes_to_unicode()
        tokens: list[str] = []
        for word in pre_tokenize(text):
            mapped = "".join(byte_encoder[b] for b in word.encode("utf-8"))
            tokens.extend(self.bpe(mapped).split(" "))
        return tokens

    def encode(self, text: str) -> list[int]:
        """Content token ids, without BOS/EOS."""
        return [self.encoder[t] for t in self.tokenize(text)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        special = {self.bos_token_id, self.eos_token_id}
        text = "".join(self.decoder[int(i)] for i in ids if not (skip_special_tokens and int(i) in special))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()

    def pad_ids(self, content_ids: Sequence[int]) -> list[int]:
        """BOS + content (truncated to context_length-2) + EOS, padded with EOS to context_length."""
        content = list(content_ids)[: self.context_length - 2]
        ids = [self.bos_token_id] + content + [self.eos_token_id]
        return ids + [self.pad_token_id] * (self.context_length - len(ids))

    def __call__(self, texts: str | Sequence[str], return_attention_mask: bool = False):
        """LongTensor [B, context_length]; with return_attention_mask also the mask (1 = BOS, content, EOS)."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        rows = []
        masks = []
        for text in texts:
            content = self.encode(text)[: self.context_length - 2]
            rows.append(self.pad_ids(content))
            real = len(content) + 2
            masks.append([1] * real + [0] * (self.context_length - real))
        ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.context_length)
        if return_attention_mask:
            return ids, torch.tensor(masks, dtype=torch.long).reshape(len(rows), self.context_length)
        return ids


def _byte_alphabet() -> list[str]:
    return list(bytes_to_unicode().values())


def train_bpe(captions: Iterable[str], vocab_size: int, out_dir: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-layout byte-level BPE from captions; writes vocab.json + merges.txt when out_dir is given.

    Vocabulary order, as in CLIP: the 256 byte symbols, the same with `</w>`, one token per merge in
    merge order, then `<|startoftext|>` and `<|endoftext|>`. Each step merges the most frequent adjacent
    pair; ties go to the lexicographically smallest pair, so the result is deterministic. Training stops
    at vocab_size or when no pair is left. A merge whose result already exists as a token (reached by a
    different split) is kept in merges.txt but adds no new id.
    """
    base = _byte_alphabet()
    base = base + [s + END_OF_WORD for s in base]
    if vocab_size < len(base) + 2:
        raise ValueError(f"vocab_size must be at least {len(base) + 2} (bytes, bytes</w>, BOS, EOS)")

    word_counts: Counter[tuple[str, ...]] = Counter()
    for caption in captions:
        for word in pre_tokenize(caption):
            if word not in (BOS_TOKEN, EOS_TOKEN):
                word_counts[word_symbols(word)] += 1

    words = [list(w) for w in word_counts]
    counts = [word_counts[w] for w in word_counts]
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for idx, symbols in enumerate(words):
        for i in range(len(symbols) - 1):
            pair = (symbols[i], symbols[i + 1])
            pair_counts[pair] += counts[idx]
            pair_words.setdefault(pair, set()).add(idx)

    tokens = list(base)
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    target_tokens = vocab_size - 2
    while len(tokens) < target_tokens and len(merges) < HF_MAX_MERGES:
        candidates = [p for p, c in pair_counts.items() if c > 0]
        if not candidates:
            break
        best = min(candidates, key=lambda p: (-pair_counts[p], p))
        first, second = best
        merged = first + second
        merges.append(best)
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        for idx in sorted(pair_words.pop(best, set())):
            old = words[idx]
            for i in range(len(old) - 1):
                pair_counts[(old[i], old[i + 1])] -= counts[idx]
            new = list(_merge_pair(old, first, second))
            words[idx] = new
            for i in range(len(new) - 1):
                pair = (new[i], new[i + 1])
                pair_counts[pair] += counts[idx]
                pair_words.setdefault(pair, set()).add(idx)
        pair_counts.pop(best, None)

    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if out_dir is not None:
        write_tokenizer_files(vocab, merges, out_dir)
    return vocab, merges


def write_tokenizer_files(vocab: dict[str, int], merges: Sequence[tuple[str, str]], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(MERGES_HEADER + "\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a CLIP-style byte-level BPE tokenizer from captions.")
    parser.add_argument("--captions", required=True, help="text file, one caption per line")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="directory for vocab.json and merges.txt")
    args = parser.parse_args(argv)
    with open(args.captions, encoding="utf-8") as f:
        captions = [line.rstrip("\n") for line in f if line.strip()]
    vocab, merges = train_bpe(captions, args.vocab_size, args.out)
    print(f"wrote {args.out}: {len(vocab)} tokens, {len(merges)} merges from {len(captions)} captions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

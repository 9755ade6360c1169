"""Expert ids and titles from file names: `DreamShaper_8_pruned.safetensors` → id `dreamshaper_8`,
title `DreamShaper 8`. Trailing release tags (pruned, emaonly, fp16, …) are dropped."""
from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple

from trainer.importer.errors import ImportFailure

_TAGS = r"pruned|emaonly|ema-only|ema|noema|nonema|fp16|fp32|bf16|full|half"
_TRAILING_TAG = re.compile(rf"^(.+?)[-_. ]({_TAGS})$", re.IGNORECASE)


def _without_tags(stem: str) -> str:
    while True:
        m = _TRAILING_TAG.match(stem)
        if not m:
            return stem
        stem = m.group(1)


def slug(stem: str) -> str:
    """An id matching the manifest's ^[a-z0-9][a-z0-9_.-]*$ ('expert' when nothing is left)."""
    s = re.sub(r"[^a-z0-9_.-]+", "-", _without_tags(stem).lower()).strip("-_.")
    return re.sub(r"-{2,}", "-", s) or "expert"


def title(stem: str) -> str:
    """The file name as people wrote it, underscores as spaces; an all-lower-case one capitalised."""
    text = re.sub(r"\s+", " ", _without_tags(stem).replace("_", " ")).strip() or "Expert"
    return text[0].upper() + text[1:] if text == text.lower() else text


def expert_ids(stems: Sequence[Tuple[str, str]], force: bool) -> Tuple[List[str], List[str]]:
    """(ids, notes) for [(stem, what to call the input)]. Inputs giving the same id are refused, or
    with force numbered (`name`, `name-2`, …) with a note each."""
    ids = [slug(stem) for stem, _ in stems]
    first: Dict[str, str] = {}
    notes: List[str] = []
    taken = set(ids)
    out: List[str] = []
    for (stem, shown), id_ in zip(stems, ids):
        if id_ not in first:
            first[id_] = shown
            out.append(id_)
            continue
        if not force:
            raise ImportFailure(f"{first[id_]} and {shown} both give the expert id {id_!r}; rename one of the files "
                                f"(or pass --force to number them)")
        n = 2
        while f"{id_}-{n}" in taken:
            n += 1
        taken.add(f"{id_}-{n}")
        out.append(f"{id_}-{n}")
        notes.append(f"{shown} gives the id {id_!r} of {first[id_]} too: it becomes {id_}-{n}")
    return out, notes

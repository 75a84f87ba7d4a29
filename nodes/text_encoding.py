"""Encode texts with a ComfyUI CLIP into the rows ``rece_ops`` works on."""
from __future__ import annotations

from typing import Iterable

import torch

from ..rece_ops.texts import EncodedText, count_words


def _first_chunk_ids(tokens: dict) -> tuple[list[int], int]:
    """Token ids of the first chunk of the first tokenizer, and the chunk count."""
    if not tokens:
        raise ValueError("the CLIP tokenizer returned no tokens")
    chunks = next(iter(tokens.values()))
    return [int(t[0]) for t in chunks[0]], len(chunks)


def encode_with_pooled(clip, text: str) -> tuple[EncodedText, torch.Tensor | None]:
    """One text through the CLIP as ComfyUI's CLIPTextEncode runs it.

    Returns the ``[77, d]`` context rows (float32, CPU) with the word count,
    and the pooled output CLIPTextEncode puts in its CONDITIONING.
    """
    if clip is None:
        raise ValueError("no CLIP connected: connect the CLIP output of the checkpoint loader")
    tokens = clip.tokenize(text)
    ids, n_chunks = _first_chunk_ids(tokens)
    if n_chunks != 1:
        raise ValueError(
            f"{text[:40]!r}... is longer than one 75-token chunk; shorten it (RECE aligns one chunk of rows)"
        )
    rows, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    encoded = EncodedText(rows[0].to(device="cpu", dtype=torch.float32), count_words(ids), text)
    return encoded, pooled


def encode_text(clip, text: str) -> EncodedText:
    """The context rows and word count of one text (see ``encode_with_pooled``)."""
    return encode_with_pooled(clip, text)[0]


def encode_texts(clip, texts: Iterable[str]) -> list[EncodedText]:
    """Encode each text once; repeated texts reuse the first encoding."""
    cache: dict[str, EncodedText] = {}
    out = []
    for text in texts:
        if text not in cache:
            cache[text] = encode_text(clip, text)
        out.append(cache[text])
    return out

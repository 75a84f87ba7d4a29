"""Encode texts with a ComfyUI CLIP into the rows ``rece_ops`` works on."""
from __future__ import annotations

from typing import Iterable

import torch

from ..rece_ops.texts import EncodedText, count_words


def chunk_word_counts(tokens: dict, text: str) -> tuple[int, ...]:
    """Words in each 77-token chunk of a tokenized text.

    SDXL tokenizes twice (CLIP-L and bigG): both must split the text the same
    way, since the context rows put their outputs side by side per token.
    """
    if not tokens:
        raise ValueError("the CLIP tokenizer returned no tokens")
    counts = {name: tuple(count_words([t[0] for t in chunk]) for chunk in chunks) for name, chunks in tokens.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the text encoders split {text[:40]!r} into different tokens ({counts}); "
                         "RECE needs one row per token: simplify the text")
    return next(iter(counts.values()))


def encode_with_pooled(clip, text: str) -> tuple[EncodedText, torch.Tensor | None]:
    """One text through the CLIP as ComfyUI's CLIPTextEncode runs it.

    Returns the context rows (``[77 * chunks, d]``, float32, CPU) with the
    word count of each chunk, and the pooled output CLIPTextEncode puts in its
    CONDITIONING (SDXL's UNet reads it; SD1/SD2 ignore it).
    """
    if clip is None:
        raise ValueError("no CLIP connected: connect the CLIP output of the checkpoint loader")
    tokens = clip.tokenize(text)
    words = chunk_word_counts(tokens, text)
    rows, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    rows = rows[0].to(device="cpu", dtype=torch.float32)
    if rows.shape[0] % len(words):
        raise ValueError(f"the CLIP gave {rows.shape[0]} rows for {len(words)} chunks of {text[:40]!r}")
    encoded = EncodedText(rows, words[0] if len(words) == 1 else words, text)
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

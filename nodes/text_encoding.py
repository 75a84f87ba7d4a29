"""Encode texts with a ComfyUI CLIP into the rows ``rece_ops`` works on."""
from __future__ import annotations

from typing import Iterable

import torch

from ..rece_ops.closed_form import StepCallback
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
    return _encoded(rows, words, text), pooled


def _encoded(rows: torch.Tensor, words: tuple[int, ...], text: str) -> EncodedText:
    """Rows and per-chunk word counts as ``EncodedText`` (one chunk: a plain count)."""
    return EncodedText(rows, words[0] if len(words) == 1 else words, text)


def encode_text(clip, text: str) -> EncodedText:
    """The context rows and word count of one text (see ``encode_with_pooled``)."""
    return encode_with_pooled(clip, text)[0]


# Chunks per CLIP forward when many texts are encoded together: large enough
# to amortise the forward, small enough to bound activation memory.
BATCH_CHUNKS = 64


def encode_texts(clip, texts: Iterable[str], callback: StepCallback | None = None) -> list[EncodedText]:
    """Encode many texts, each distinct text once, in as few CLIP forwards as possible.

    ComfyUI's CLIP encodes the chunks of one prompt as one batch; the chunks
    of many prompts are passed the same way (every tokenizer's chunk lists
    joined), and the rows split back per text. Each chunk is encoded on its
    own in either case, so the rows are those of separate encodes.
    ``callback`` is called as (forwards done, forwards) and may raise to stop.
    """
    if clip is None:
        raise ValueError("no CLIP connected: connect the CLIP output of the checkpoint loader")
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    tokens = {text: clip.tokenize(text) for text in unique}
    words = {text: chunk_word_counts(tokens[text], text) for text in unique}
    batches: list[list[str]] = []
    for text in unique:
        if not batches or sum(len(words[t]) for t in batches[-1]) >= BATCH_CHUNKS:
            batches.append([])
        batches[-1].append(text)
    encoded: dict[str, EncodedText] = {}
    for done, batch in enumerate(batches, 1):
        encoded.update(_encode_batch(clip, batch, tokens, words))
        if callback:
            callback(done, len(batches))
    return [encoded[text] for text in texts]


def _encode_batch(clip, batch: list[str], tokens: dict, words: dict) -> dict[str, EncodedText]:
    names = list(tokens[batch[0]])
    joined = {name: [chunk for text in batch for chunk in tokens[text][name]] for name in names}
    rows = clip.encode_from_tokens(joined)[0].to(device="cpu", dtype=torch.float32)
    sizes = [len(words[text]) for text in batch]
    if rows.shape[0] % sum(sizes):
        raise ValueError(f"the CLIP gave {rows.shape[0]} rows for {sum(sizes)} chunks")
    per_chunk = rows.shape[0] // sum(sizes)
    out = {}
    for text, part in zip(batch, rows.split([n * per_chunk for n in sizes])):
        out[text] = _encoded(part, words[text], text)
    return out

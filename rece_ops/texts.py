"""Encoded texts as the algebra sees them, and RECE's choice of rows.

A text enters the algebra as the text encoder's output rows (one per token,
BOS first, padded to 77 for one CLIP chunk) plus its word count, the number
of tokens between BOS and the first EOS. A prompt longer than one chunk is
encoded chunk by chunk (each with its own BOS, EOS and padding, as ComfyUI
and A1111 do) and its rows are the chunks' rows one after another, with one
word count per chunk. The encoder itself stays outside this library.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

CLIP_BOS = 49406
CLIP_EOS = 49407


@dataclass(frozen=True)
class EncodedText:
    """One text as the cross-attention layers read it.

    Attributes:
        rows: ``[n_tokens, d]`` encoder output (77 rows per CLIP chunk).
        n_words: tokens between BOS and the first EOS; for a text of several
            chunks, a tuple with one count per chunk (rows split evenly).
        text: the source text, for reports only.
    """

    rows: torch.Tensor
    n_words: int | tuple[int, ...]
    text: str = ""

    def __post_init__(self) -> None:
        if self.rows.ndim != 2:
            raise ValueError(f"rows of {self.text!r} must be [tokens, d], got shape {tuple(self.rows.shape)}")
        counts = self.chunk_words
        if not counts or self.rows.shape[0] % len(counts):
            raise ValueError(f"{self.rows.shape[0]} rows of {self.text!r} do not split into {len(counts)} chunks")
        for words in counts:
            if not 0 <= words <= self.chunk_length - 2:
                raise ValueError(
                    f"n_words={words} of {self.text!r} does not fit {self.chunk_length} rows "
                    "(BOS and EOS take two)"
                )
        if not torch.isfinite(self.rows).all():
            raise ValueError(f"the embedding of {self.text!r} has NaN or infinite values")

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    @property
    def chunk_words(self) -> tuple[int, ...]:
        """Word count of each chunk."""
        return tuple(self.n_words) if isinstance(self.n_words, (tuple, list)) else (self.n_words,)

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_words)

    @property
    def chunk_length(self) -> int:
        return self.rows.shape[0] // max(len(self.chunk_words), 1)

    def chunks(self) -> list[tuple[torch.Tensor, int]]:
        """``(rows, words)`` of each chunk."""
        return list(zip(self.rows.split(self.chunk_length), self.chunk_words))


def _token_id(token: object) -> int:
    if isinstance(token, numbers.Integral):
        return int(token)
    if isinstance(token, torch.Tensor) and token.ndim == 0:
        return int(token)
    return -1  # an embedding vector in place of a token


def count_words(token_ids: Sequence[int | object] | torch.Tensor, eos_id: int = CLIP_EOS) -> int:
    """Tokens between BOS (position 0) and the first EOS.

    Entries that are not ids (a textual-inversion embedding stands in the
    token list as a tensor) count as words. Raises ValueError when there is
    no EOS: a text that fills the whole window has no EOS row to align.
    """
    ids = [_token_id(t) for t in token_ids]
    try:
        return ids.index(eos_id, 1) - 1
    except ValueError:
        raise ValueError(f"no EOS token ({eos_id}) among the token ids {ids[:8]}...") from None


def _guide_chunk(concept: EncodedText, guide: EncodedText, k: int) -> tuple[torch.Tensor, int]:
    """The guide chunk that concept chunk ``k`` maps onto: the guide's chunk
    ``k``, or its last one when the guide is shorter."""
    if guide.chunk_length != concept.chunk_length or guide.width != concept.width:
        raise ValueError(
            f"concept {concept.text!r} and guide {guide.text!r} were encoded to different shapes "
            f"({concept.chunk_length} x {concept.width} and {guide.chunk_length} x {guide.width} per chunk); "
            "encode both with the same text encoder"
        )
    return guide.chunks()[min(k, guide.n_chunks - 1)]


def uce_erase_rows(concept: EncodedText, guide: EncodedText) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCE step's erase pairs for one concept (RECE spec, "One edit step").

    With ``i`` and ``j`` the word counts of concept and guide and
    ``f = max(i, j)``, concept rows ``i .. L-1-(f-i)`` pair with guide rows
    ``j .. L-1-(f-j)``: the last word token, then EOS and padding, line up.
    This is the authors' alignment (their ``final_token_idx`` slicing). A
    concept of several chunks is aligned chunk by chunk, each against the
    guide chunk of the same index (or the guide's last), since every chunk is
    encoded as a prompt of its own.

    Returns ``(concept_rows, guide_rows)`` of equal shape (``[L - f, d]`` for one chunk).
    """
    concept_parts, guide_parts = [], []
    for k, (rows, i) in enumerate(concept.chunks()):
        guide_rows, j = _guide_chunk(concept, guide, k)
        length, f = rows.shape[0], max(i, j)
        concept_parts.append(rows[i:length - (f - i)])
        guide_parts.append(guide_rows[j:length - (f - j)])
    return torch.cat(concept_parts), torch.cat(guide_parts)


def epoch_targets(concept: EncodedText, guide: EncodedText) -> torch.Tensor:
    """The rows an epoch maps the concept's adversarial embedding onto: all
    rows of the guide, chunk for chunk as in ``uce_erase_rows`` (for one chunk
    each, simply the guide's 77 rows)."""
    return torch.cat([_guide_chunk(concept, guide, k)[0] for k in range(concept.n_chunks)])


def preserve_prompts(user_texts: Iterable[str]) -> list[str]:
    """The preserve texts of a run: the empty prompt once, then the user's.

    The authors always preserve the empty prompt (``''`` and ``' '`` encode
    identically); blank entries and repeats in the user's list are dropped.
    """
    texts = [""]
    for text in user_texts:
        cleaned = text.strip()
        if cleaned and cleaned not in texts:
            texts.append(cleaned)
    return texts


def split_concepts(text: str) -> list[str]:
    """Concept names from a user's box: one per line, commas also accepted."""
    names: list[str] = []
    for line in text.replace(",", "\n").splitlines():
        name = line.strip()
        if name and name not in names:
            names.append(name)
    return names

"""Encoded texts as the algebra sees them, and RECE's choice of rows.

A text enters the algebra as the text encoder's output rows (one per token,
BOS first, padded to 77 for one CLIP chunk) plus its word count, the number
of tokens between BOS and the first EOS. The encoder itself stays outside
this library.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

CLIP_BOS = 49406
CLIP_EOS = 49407


@dataclass(frozen=True)
class EncodedText:
    """One text as the cross-attention layers read it.

    Attributes:
        rows: ``[n_tokens, d]`` encoder output (77 rows for one CLIP chunk).
        n_words: tokens between BOS and the first EOS.
        text: the source text, for reports only.
    """

    rows: torch.Tensor
    n_words: int
    text: str = ""

    def __post_init__(self) -> None:
        if self.rows.ndim != 2:
            raise ValueError(f"rows of {self.text!r} must be [tokens, d], got shape {tuple(self.rows.shape)}")
        if not 0 <= self.n_words <= self.rows.shape[0] - 2:
            raise ValueError(
                f"n_words={self.n_words} of {self.text!r} does not fit {self.rows.shape[0]} rows "
                "(BOS and EOS take two)"
            )
        if not torch.isfinite(self.rows).all():
            raise ValueError(f"the embedding of {self.text!r} has NaN or infinite values")

    @property
    def width(self) -> int:
        return self.rows.shape[1]


def count_words(token_ids: Sequence[int] | torch.Tensor, eos_id: int = CLIP_EOS) -> int:
    """Tokens between BOS (position 0) and the first EOS.

    Raises ValueError when there is no EOS: a text that fills the whole
    window has no EOS row to align.
    """
    ids = [int(t) for t in token_ids]
    try:
        return ids.index(eos_id, 1) - 1
    except ValueError:
        raise ValueError(f"no EOS token ({eos_id}) among the token ids {ids[:8]}...") from None


def uce_erase_rows(concept: EncodedText, guide: EncodedText) -> tuple[torch.Tensor, torch.Tensor]:
    """The UCE step's erase pairs for one concept (RECE spec, "One edit step").

    With ``i`` and ``j`` the word counts of concept and guide and
    ``f = max(i, j)``, concept rows ``i .. L-1-(f-i)`` pair with guide rows
    ``j .. L-1-(f-j)``: the last word token, then EOS and padding, line up.
    This is the authors' alignment (their ``final_token_idx`` slicing).

    Returns ``(concept_rows, guide_rows)``, both ``[L - f, d]``.
    """
    length = concept.rows.shape[0]
    if guide.rows.shape != concept.rows.shape:
        raise ValueError(
            f"concept {concept.text!r} and guide {guide.text!r} were encoded to different shapes "
            f"{tuple(concept.rows.shape)} and {tuple(guide.rows.shape)}; encode both with the same text encoder"
        )
    i, j = concept.n_words, guide.n_words
    f = max(i, j)
    return concept.rows[i:length - (f - i)], guide.rows[j:length - (f - j)]


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

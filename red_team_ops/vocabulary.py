"""Which CLIP tokens a typed prompt reproduces.

UnlearnDiffAtk optimises over token ids; the prompt it reports is those
tokens written out. For that prompt to be something anyone can paste into a
sampler and get the same tokens back, the candidates are limited to tokens
that survive the round trip ``token -> text -> tokenizer``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

END_OF_WORD = "</w>"


def _typeable_stem(stem: str) -> bool:
    # CLIP's byte-level BPE prints every non-ASCII byte as a stand-in
    # character (bytes_to_unicode), so a non-ASCII vocabulary string is never
    # what a person would type; only ASCII stems are their own spelling.
    if not stem or not stem.isascii():
        return False
    if stem.isalpha():
        return True
    if len(stem) == 1 and stem.isdigit():
        return True
    return not any(c.isalnum() or c.isspace() for c in stem)


def typeable_token_ids(vocab: Mapping[str, int], special_ids: Iterable[int]) -> list[int]:
    """Ids of the CLIP BPE tokens that a prompt of space-separated words reproduces.

    A token qualifies when its string ends with ``</w>`` (a whole word) and
    its stem (the string without ``</w>``) is ASCII and either all letters
    (``str.isalpha``), a single digit, or all punctuation/symbols (no
    letters, digits or whitespace). Special ids (BOS, EOS, padding) are left
    out. Sorted ascending.

    Why: CLIP's tokenizer (``openai/CLIP``, ``simple_tokenizer.py``) splits
    the text on whitespace and into runs of letters, single digits and runs
    of other characters (its ``pat`` regex) before BPE, and marks each piece's
    end with ``</w>``. A word of one such kind, typed between spaces, is one
    piece, and BPE merges it back into the vocabulary word it spells (the
    word exists because those merges made it). Mixed stems (``'s``, ``x2``)
    or word pieces without ``</w>`` would be split or merged differently
    when typed, so the found prompt would not mean the found tokens. Stems
    are limited to ASCII because the vocabulary spells non-ASCII bytes with
    stand-in characters (byte-level BPE), not as typed text.

    Args:
        vocab: the tokenizer's ``{token string: id}``.
        special_ids: ids never to return.
    """
    excluded = set(special_ids)
    return sorted(
        token_id
        for token, token_id in vocab.items()
        if token.endswith(END_OF_WORD)
        and token_id not in excluded
        and _typeable_stem(token[: -len(END_OF_WORD)])
    )

"""What an erased MODEL remembers about its erasures.

Kept as ModelPatcher attachments, which ``clone()`` carries along: the MODEL
as it was before the first erasure in the graph (the default "original" of
Derive Adversarial Embedding) and a record of every erasure applied.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..rece_ops import Erasure

ORIGINAL_KEY = "rece_original_model"
RECORDS_KEY = "rece_erasures"


@dataclass(frozen=True)
class ErasureRecord:
    """One erasure node's result, as applied to the MODEL."""

    method: str  # "RECE" or "UCE"
    erasure: Erasure
    strength: float
    kv_keys: tuple[str, ...]


def original_model(model):
    """The MODEL before its first erasure by this pack, or None."""
    return model.get_attachment(ORIGINAL_KEY)


def erasure_records(model) -> tuple[ErasureRecord, ...]:
    return model.get_attachment(RECORDS_KEY) or ()


def remember_erasure(erased, source, record: ErasureRecord) -> None:
    """Mark ``erased`` (a fresh clone of ``source``) with ``record``."""
    erased.set_attachments(ORIGINAL_KEY, original_model(source) or source)
    erased.set_attachments(RECORDS_KEY, erasure_records(source) + (record,))

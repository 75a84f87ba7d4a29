"""What an erased MODEL remembers about its erasures.

Kept as ModelPatcher attachments, which ``clone()`` carries along: the MODEL
as it was before the first erasure in the graph (the default "original" of
Derive Adversarial Embedding) and a record of every erasure applied (what
Save Erasure and Export Erasure as LoRA write out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..rece_ops import Erasure, chain

ORIGINAL_KEY = "rece_original_model"
RECORDS_KEY = "rece_erasures"


@dataclass(frozen=True)
class ErasureRecord:
    """One erasure as applied to the MODEL: ``W -> W @ T`` at ``strength``.

    ``fingerprint`` is ``kv_fingerprint`` of the weights the erasure was
    computed on; ``descriptions`` are its file entries (one for an erase node,
    all of a loaded file's), each at full strength.
    """

    erasure: Erasure
    strength: float
    kv_keys: tuple[str, ...]
    fingerprint: tuple[float, ...]
    descriptions: tuple[Mapping[str, Any], ...]

    def described(self) -> list[dict[str, Any]]:
        """The descriptions with this record's strength folded in."""
        return [{**d, "strength": d.get("strength", 1.0) * self.strength} for d in self.descriptions]


def original_model(model):
    """The MODEL before its first erasure by this pack, or None."""
    return model.get_attachment(ORIGINAL_KEY)


def erasure_records(model) -> tuple[ErasureRecord, ...]:
    return model.get_attachment(RECORDS_KEY) or ()


def combined_erasure(records: tuple[ErasureRecord, ...]) -> Erasure:
    """All recorded erasures, each at its strength, as one edit."""
    return chain([r.erasure for r in records], [r.strength for r in records])


def remember_original(patched, source) -> None:
    """Mark ``patched`` (a fresh clone of ``source``) as derived from the
    original model of ``source``, without recording an erasure."""
    patched.set_attachments(ORIGINAL_KEY, original_model(source) or source)


def remember_erasure(erased, source, record: ErasureRecord) -> None:
    """Mark ``erased`` (a fresh clone of ``source``) with ``record``."""
    remember_original(erased, source)
    erased.set_attachments(RECORDS_KEY, erasure_records(source) + (record,))

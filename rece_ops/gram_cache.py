"""Reuse ``G = sum W^T W`` across runs on the same weights.

``G`` depends only on the weights an edit starts from, and it is the one
large product of a run; a graph that erases, tweaks a scale and erases again
should not pay for it twice. Entries are keyed by the weights' content (a
cheap random projection), so any change to the weights, in place or by new
patches, misses the cache instead of returning a stale ``G``.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Mapping

import torch

from .closed_form import StepCallback, gram

_PROBE_SEED = 20240712  # fixed: signatures must agree between runs in a process


def weights_signature(weights: Mapping[str, torch.Tensor]) -> str:
    """A content key for a set of matrices: names, shapes, dtypes and
    ``W @ probe`` for a fixed random ``probe``.

    Two different weight sets collide only if their difference is exactly
    orthogonal to the random probe. Deterministic on one device and torch
    build, not across them: use it for caches, not for files.
    """
    digest = hashlib.sha256()
    probes: dict[tuple, torch.Tensor] = {}
    for name in sorted(weights):
        w = weights[name].detach()
        key = (w.shape[-1], w.device)
        if key not in probes:
            generator = torch.Generator().manual_seed(_PROBE_SEED)
            probes[key] = torch.randn(w.shape[-1], 2, generator=generator).to(w.device)
        digest.update(f"{name}|{tuple(w.shape)}|{w.dtype}|".encode())
        digest.update((w.float() @ probes[key]).cpu().numpy().tobytes())
    return digest.hexdigest()


class GramCache:
    """A small least-recently-used cache of Gram matrices by weight content."""

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, weights: Mapping[str, torch.Tensor], callback: StepCallback | None = None) -> torch.Tensor:
        """``gram(weights)``, computed once per distinct content and device;
        ``callback`` is ``gram``'s (called once, as done, on a hit)."""
        first = next(iter(weights.values()), None)
        key = (weights_signature(weights), str(first.device) if first is not None else "")
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            if callback:
                callback(1, 1)
            return self._entries[key]
        self.misses += 1
        value = gram(weights, callback=callback)
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()

"""A portable fingerprint of a model's K/V weights, for erasure files.

An erasure file says which weights it was computed on, and a reader checks
that against the model it is applied to. Unlike ``gram_cache``'s content key
this must agree across devices, dtypes and torch builds, so it is a few
numbers per matrix compared with a tolerance, not a hash of exact bits.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

_PROBE_SEED = 1_2407_12383  # arXiv 2407.12383; fixed forever: files store fingerprints
# Relative agreement that counts as "the same weights": far above float32
# and device rounding, far below any fine-tune or an erasure (~1% change).
MATCH_RTOL = 1e-4


def kv_fingerprint(weights: Mapping[str, torch.Tensor]) -> list[float]:
    """``[|W|_F, |W p|]`` for every matrix in name order.

    ``p`` is a fixed random unit vector per width, so two weight sets that
    differ anywhere (almost surely) differ in some ``|W p|``. Computed in
    float32 on the weights' device: its rounding (~1e-6) is far below
    ``MATCH_RTOL``.
    """
    values: list[float] = []
    probes: dict[tuple[int, torch.device], torch.Tensor] = {}
    for name in sorted(weights):
        w = weights[name].detach()
        key = (w.shape[-1], w.device)
        if key not in probes:
            probe = torch.randn(w.shape[-1], generator=torch.Generator().manual_seed(_PROBE_SEED), dtype=torch.float64)
            probes[key] = (probe / probe.norm()).to(device=w.device, dtype=torch.float32)
        w = w.float()
        values += [float(w.norm()), float((w @ probes[key]).norm())]
    return values


def fingerprint_difference(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest relative difference between two fingerprints (``inf`` when
    they describe different numbers of matrices)."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(abs(x), abs(y))
        if scale > 0:
            worst = max(worst, abs(x - y) / scale)
    return worst


def fingerprints_match(a: Sequence[float], b: Sequence[float], rtol: float = MATCH_RTOL) -> bool:
    """Whether two fingerprints describe the same weights (up to rounding)."""
    return fingerprint_difference(a, b) <= rtol

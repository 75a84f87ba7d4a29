"""How much an erasure changed, measured through ``G = sum_l W_l^T W_l``.

Every quantity summed over all K/V matrices, ``sum_l |W_l X|_F^2``, equals
``trace(X^T G X)``, so these report numbers cost ``d x d`` algebra only, no
per-layer work. The last two compare weight sets directly, matrix by matrix
(for files and models whose edit is not a known transform).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .closed_form import adversarial_from_grams, as_algebra, cross_gram, edited_grams
from .erasure import Erasure


def _row_energies(gram_matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum_l |W_l x|^2`` of each row ``x`` (``rows`` is ``[n, d]``).

    A report figure, not an input to the edit: with more rows than ``d``
    (many concepts) the product is a large one and runs in float32, whose
    1e-7 relative rounding is far below the digits a report shows.
    """
    dtype = torch.float32 if rows.shape[0] > rows.shape[1] else torch.float64
    x = rows.to(device=gram_matrix.device, dtype=dtype)
    return ((x @ gram_matrix.to(dtype)) * x).sum(dim=1, dtype=torch.float64)


def _energy(gram_matrix: torch.Tensor, rows: torch.Tensor) -> float:
    """``sum_l |W_l x|^2`` over the rows ``x`` (``rows`` is ``[n, d]``)."""
    return max(float(_row_energies(gram_matrix, rows).sum()), 0.0)


def _edit_factors(erasure: Erasure, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``T - I = up @ down`` as float64 on ``device``; ``down`` None when the
    factors would be wider than ``d`` and ``up`` is ``T - I`` itself (the
    erasure's cached ``edit``, formed once for all the report's figures)."""
    if not erasure.thin:
        return as_algebra(erasure.edit, device), None
    up, down = (as_algebra(f, device) for f in erasure.factors)
    return up, down


def _edited(rows: torch.Tensor, up: torch.Tensor, down: torch.Tensor | None) -> torch.Tensor:
    """``rows @ (T - I)^T``, without forming ``T - I`` from its factors."""
    return rows @ up.T if down is None else (rows @ down.T) @ up.T


def weight_change(gram_matrix: torch.Tensor, erasure: Erasure) -> float:
    """``|W (T - I)|_F / |W|_F`` over all K/V matrices together:
    ``trace(down^T (up^T G up) down)``, from the factors in ``O(d^2 r)``."""
    g = as_algebra(gram_matrix, gram_matrix.device)
    up, down = _edit_factors(erasure, g.device)
    inner = up.T @ g @ up
    change = float(inner.trace() if down is None else (inner * (down @ down.T)).sum())
    return (max(change, 0.0) / float(torch.trace(g))) ** 0.5


def remaining_distance(
    gram_matrix: torch.Tensor, erasure: Erasure, erase_rows: torch.Tensor, target_rows: torch.Tensor
) -> float:
    """How far erased rows' outputs still are from their targets' original
    outputs, relative to before: ``|W T c - W t| / |W c - W t|`` (0 = fully
    mapped onto the guide, 1 = untouched)."""
    device = gram_matrix.device
    c, t = as_algebra(erase_rows, device), as_algebra(target_rows, device)
    before = _energy(gram_matrix, c - t)
    after = _energy(gram_matrix, c + _edited(c, *_edit_factors(erasure, device)) - t)
    return (after / before) ** 0.5 if before > 0 else 0.0


def preserve_drift(gram_matrix: torch.Tensor, erasure: Erasure, preserve_rows: torch.Tensor) -> float:
    """``|W (T - I) p| / |W p|`` over preserve rows: 0 means untouched."""
    device = gram_matrix.device
    p = as_algebra(preserve_rows, device)
    base = _energy(gram_matrix, p)
    moved = _energy(gram_matrix, _edited(p, *_edit_factors(erasure, device)))
    return (moved / base) ** 0.5 if base > 0 else 0.0


def adversarial_recovery(
    gram_matrix: torch.Tensor, erasure: Erasure, concept_rows: torch.Tensor, guide_rows: torch.Tensor, reg_scale: float
) -> float:
    """How much of the concept the best adversarial embedding brings back.

    Derives ``c'`` against the final edit (RECE's closed form) and returns
    ``1 - |W T c' - W c| / |W t - W c|``: 1 if the edited model can
    reproduce the original concept's outputs exactly, 0 if it gets no closer
    than the guide ``t`` does, negative if even further away.
    """
    return adversarial_recoveries(gram_matrix, erasure, [concept_rows], [guide_rows], reg_scale)[0]


def adversarial_recoveries(
    gram_matrix: torch.Tensor, erasure: Erasure, concept_rows: Sequence[torch.Tensor],
    guide_rows: Sequence[torch.Tensor], reg_scale: float,
) -> list[float]:
    """``adversarial_recovery`` of several concepts, with one solve for all
    (they share the system; only the right-hand sides differ)."""
    device = gram_matrix.device
    concepts = [as_algebra(c, device) for c in concept_rows]
    # The system from the edit's factors, as the RECE loop forms it.
    up, down = _edit_factors(erasure, device)
    concept_all = torch.cat(concepts)
    dense_down = torch.eye(up.shape[0], dtype=up.dtype, device=device) if down is None else down
    found_all = adversarial_from_grams(concept_all, *edited_grams(gram_matrix, up, dense_down), reg_scale)
    # Every concept's energies from two products over all rows, summed per concept.
    counts = [len(c) for c in concepts]
    gap_rows = found_all + _edited(found_all, up, down) - concept_all
    base_rows = torch.cat([as_algebra(t, device) for t in guide_rows]) - concept_all
    gaps = _row_energies(gram_matrix, gap_rows).split(counts)
    bases = _row_energies(gram_matrix, base_rows).split(counts)
    out = []
    for gap, base in zip(gaps, bases):
        gap, base = max(float(gap.sum()), 0.0) ** 0.5, max(float(base.sum()), 0.0) ** 0.5
        out.append(1.0 - gap / base if base > 0 else 0.0)
    return out


def output_miss(
    edited_gram: torch.Tensor, cross: torch.Tensor, original_gram: torch.Tensor,
    rows: torch.Tensor, concept_rows: torch.Tensor,
) -> float:
    """``|A x - B c| / |B c|`` over all matrices, for edited weights ``A`` and
    original weights ``B`` given as ``sum A^T A``, ``sum A^T B`` and
    ``sum B^T B``: how far the edited model's outputs for ``rows`` (``x``)
    are from the original's for ``concept_rows`` (``c``); 0 = identical."""
    device = edited_gram.device
    x, c = as_algebra(rows, device), as_algebra(concept_rows, device)
    base = _energy(original_gram, c)
    miss = (_energy(edited_gram, x) - 2 * float(((x @ as_algebra(cross, device)) * c).sum())
            + base)
    return (max(miss, 0.0) / base) ** 0.5 if base > 0 else 0.0


def relative_differences(
    weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, float]:
    """``|W - W_ref|_F / |W_ref|_F`` per matrix name that both hold."""
    out = {}
    for name in sorted(set(weights) & set(reference)):
        ref = reference[name].detach().float()
        diff = weights[name].detach().float().to(ref.device) - ref
        scale = float(ref.norm())
        out[name] = float(diff.norm()) / scale if scale > 0 else float(diff.norm())
    return out


def overall_difference(weights: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """``sqrt(sum |W - W_ref|^2 / sum |W_ref|^2)`` over the matrices both hold."""
    num = den = 0.0
    for name in set(weights) & set(reference):
        ref = reference[name].detach().float()
        num += float((weights[name].detach().float().to(ref.device) - ref).norm()) ** 2
        den += float(ref.norm()) ** 2
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def unexplained_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """Share of the change ``after - before`` that no shared input transform
    explains: ``min_T sqrt(sum |W_b T - W_a|^2) / sqrt(sum |W_a - W_b|^2)``.

    Any UCE/RECE edit of ``before`` is ``W_b @ T`` exactly, so this is about 0
    for an erasure made from these weights and large for weights that come
    from another base model (their difference has no common input space).
    """
    names = sorted(set(before) & set(after))
    if not names:
        raise ValueError("no matrices in common to compare")
    b = [before[n] for n in names]
    a = [after[n] for n in names]
    g, c = cross_gram(b, b), cross_gram(b, a)
    # A whisper of ridge keeps the solve defined when sum d_out < d.
    ridge = 1e-12 * float(torch.trace(g)) / g.shape[0]
    transform = torch.linalg.solve(g + ridge * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), c)
    energy_after = sum(float(as_algebra(w, g.device).square().sum()) for w in a)
    residual = (float(torch.einsum("ij,ik,kj->", transform, g, transform)) - 2 * float((transform * c).sum())
                + energy_after)
    change = sum(float((as_algebra(x, g.device) - as_algebra(y, g.device)).square().sum()) for x, y in zip(a, b))
    return (max(residual, 0.0) / change) ** 0.5 if change > 0 else 0.0

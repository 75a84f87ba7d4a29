"""SPEED's null-space edit: erase while keeping what must stay, by construction.

Li et al., "SPEED: Scalable, Precise, and Efficient Concept Erasure for
Diffusion Models" (ICLR 2026); the authors' code is ``edit_model`` in
``train_erase_null.py`` of github.com/Ouxiang-Li/SPEED. For every K/V matrix
``W`` the update is

    delta = W (A - C) P (I - M K2 (K2^T P M K2 + lamb I)^-1 K2^T P) M,
    M = (C P + retain_scale I)^-1

with ``C`` and ``A`` the target/target and anchor/target second moments
(each concept's ``t^T t`` and ``a^T t``, averaged over concepts), ``P`` the
projector onto the directions in which the retained rows have second moment
below ``threshold`` (their "null space"), and ``K2`` the invariant rows (the
start token and k-means centres of the empty prompt's other rows), whose
outputs the edit keeps exactly when ``lamb`` is 0. A retained direction
outside ``P``'s range is not moved at all: for ``P r = 0``, ``M r =
r / retain_scale`` and ``P (...) r = 0``.

Without the authors' per-layer filtering and augmentation, ``P`` is the same
for every layer and the update is ``W -> W @ T`` with one ``T = I + up @ down``
(``speed_step``), exactly the shape of a UCE/RECE step: RECE's adversarial
epochs, patches, erasure files and the LoRA export take it unchanged. With
them (``speed_layer_steps``), ``P`` differs per layer.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .closed_form import ALGEBRA_DTYPE, EditStep, algebra_device, as_algebra
from .texts import EncodedText


LAST_WORD, EVERY_TOKEN = "last word", "every token"
RETAINED_ROWS = (LAST_WORD, EVERY_TOKEN)


@dataclass(frozen=True)
class SpeedSettings:
    """The scales of SPEED's step, with the authors' defaults.

    Attributes:
        threshold: a direction is in the retained rows' null space when their
            second moment along it is below this (``--threshold``, 0.1).
        retain_scale: ridge of the erase objective, ``M = (C P + retain_scale I)^-1``
            (``--retain_scale``, 1.0); larger moves the weights less.
        lamb: ridge of the invariant constraint (``--lamb``, 0: the start
            token's and the empty prompt's outputs stay exactly).
        clusters: k-means centres of the empty prompt's rows in ``K2`` (3).
        seed: seed of the k-means start (the authors' is unseeded).
        retained: which rows of the preserve texts define the null space:
            ``"last word"`` (the authors': each text's last word token, or
            the empty prompt's rows when no other text is given) or
            ``"every token"`` (this pack's variant: every word token and the
            EOS row of each text, and always the empty prompt's rows).
    """

    threshold: float = 0.1
    retain_scale: float = 1.0
    lamb: float = 0.0
    clusters: int = 3
    seed: int = 0
    retained: str = LAST_WORD

    def __post_init__(self) -> None:
        for name in ("threshold", "retain_scale", "lamb"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ValueError(f"SPEED's {name} must be a finite number >= 0, got {value!r}")
        if self.retain_scale <= 0:
            raise ValueError(f"SPEED's retain_scale must be > 0 (it keeps the erase system solvable), "
                             f"got {self.retain_scale}")
        if not isinstance(self.clusters, int) or isinstance(self.clusters, bool) or self.clusters < 0:
            raise ValueError(f"clusters must be a whole number >= 0, got {self.clusters!r}")
        if self.retained not in RETAINED_ROWS:
            raise ValueError(f"retained must be one of {RETAINED_ROWS}, got {self.retained!r}")


@dataclass(frozen=True)
class NullSpace:
    """What a SPEED edit keeps, shared by all its steps.

    Attributes:
        projector: ``P``, ``[d, d]`` float64, onto the retained rows' null space.
        invariants: ``K2`` as rows, ``[m, d]`` (start token, then the centres).
        retained_rows: the rows whose second moment defined ``P``.
        retained_texts: where those rows came from, for reports.
        dropped: preserve texts left out because they name an erased concept.
        settings: the scales.
    """

    projector: torch.Tensor
    invariants: torch.Tensor
    retained_rows: torch.Tensor
    retained_texts: tuple[str, ...]
    dropped: tuple[str, ...]
    settings: SpeedSettings

    @property
    def free_dimensions(self) -> int:
        """How many of the ``d`` directions the edit may use (the rank of ``P``)."""
        return int(round(float(self.projector.trace())))

    def kept_basis(self) -> torch.Tensor:
        """Orthonormal rows spanning what the edit leaves exactly unchanged:
        the directions outside ``P``'s range, ``[d - rank, d]``."""
        values, vectors = torch.linalg.eigh(self.projector)
        return vectors[:, values < 0.5].T


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    """``rows^T rows / n``: the retained rows' mean outer product (SPEED's
    ``sum_ret_ret``), float64 ``[d, d]``."""
    x = as_algebra(rows, algebra_device(rows.device))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"retained rows must be a non-empty [n, d] matrix, got shape {tuple(rows.shape)}")
    return (x.T @ x) / x.shape[0]


def null_space_projector(moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """``P = U_s U_s^T`` over the singular directions of the (symmetric PSD)
    second moment with singular value below ``threshold`` (SPEED's
    ``U[:, S < threshold]``; for a symmetric PSD matrix the SVD is its
    eigendecomposition with ``S = |eigenvalue|``)."""
    m = as_algebra(moment, algebra_device(moment.device))
    values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
    basis = vectors[:, values.abs() < threshold]
    return basis @ basis.T


def kmeans_centres(rows: torch.Tensor, clusters: int, generator: torch.Generator,
                   tol: float = 1e-4, max_iterations: int = 1000) -> torch.Tensor:
    """Lloyd's k-means with Euclidean distance, as the authors' ``kmeans_pytorch``
    runs it: start from ``clusters`` distinct rows drawn at random, move each
    centre to the mean of its rows (an empty cluster restarts at a random row)
    until the centres' squared shift is below ``tol``. Returns ``[clusters, d]``."""
    x = as_algebra(rows, algebra_device(rows.device))
    if clusters > x.shape[0]:
        raise ValueError(f"{clusters} clusters need at least as many rows, got {x.shape[0]}")
    centres = x[torch.randperm(x.shape[0], generator=generator, device=generator.device)[:clusters].to(x.device)]
    for _ in range(max_iterations):
        nearest = torch.cdist(x, centres).argmin(dim=1)
        moved = centres.clone()
        for k in range(clusters):
            members = x[nearest == k]
            if members.shape[0]:
                moved[k] = members.mean(dim=0)
            else:
                pick = torch.randint(x.shape[0], (1,), generator=generator, device=generator.device)
                moved[k] = x[pick.to(x.device)][0]
        shift = ((moved - centres) ** 2).sum(dim=1).sqrt().sum() ** 2
        centres = moved
        if shift < tol:
            break
    return centres


def invariant_rows(empty_prompt_rows: torch.Tensor, clusters: int = 3, seed: int = 0) -> torch.Tensor:
    """SPEED's ``K2`` as rows: the empty prompt's start-token row, then the
    k-means centres of its other rows. ``[1 + clusters, d]`` float64."""
    x = as_algebra(empty_prompt_rows, algebra_device(empty_prompt_rows.device))
    if clusters == 0:
        return x[:1]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.cat([x[:1], kmeans_centres(x[1:], clusters, generator)])


class _Factored:
    """One LU factorisation of ``M^-1 = C P + retain_scale I``, solved with
    from both sides (``M K2`` and ``(...) M``): half the work of two solves."""

    def __init__(self, matrix: torch.Tensor):
        self.lu, self.pivots, info = torch.linalg.lu_factor_ex(matrix)
        if int(info) != 0:
            raise ValueError("SPEED's erase system is singular: raise retain_scale or lower the threshold")

    def left(self, rhs: torch.Tensor) -> torch.Tensor:
        """``matrix^-1 @ rhs``."""
        return self._checked(torch.linalg.lu_solve(self.lu, self.pivots, rhs))

    def right(self, lhs: torch.Tensor) -> torch.Tensor:
        """``lhs @ matrix^-1``, as ``(matrix^T)^-1 lhs^T`` transposed."""
        return self._checked(torch.linalg.lu_solve(self.lu, self.pivots, lhs.T, adjoint=True).T)

    @staticmethod
    def _checked(solution: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(solution).all():
            raise ValueError("SPEED's erase system is singular: raise retain_scale or lower the threshold")
        return solution


def _invariant_solve(small: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``small^-1 rhs`` for the ``m x m`` invariant system. With ``lamb = 0``
    it is singular when an invariant row has no component in the null space
    (``P k = 0``): that constraint already holds, and the least-norm solution
    (pseudo-inverse of this tiny matrix) drops it instead of dividing by 0."""
    solution, info = torch.linalg.solve_ex(small, rhs)
    if int(info) == 0 and torch.isfinite(solution).all():
        return solution
    return torch.linalg.pinv(small) @ rhs


def speed_step(
    targets: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    projector: torch.Tensor,
    invariants: torch.Tensor | None,
    *,
    retain_scale: float,
    lamb: float = 0.0,
) -> EditStep:
    """SPEED's update as one layer-independent step ``T = I + up @ down``.

    ``T - I = (A - C) P (I - M K2 (K2^T P M K2 + lamb I)^-1 K2^T P) M`` with
    ``C = mean_i t_i^T t_i``, ``A = mean_i a_i^T t_i``, ``M = (C P +
    retain_scale I)^-1`` (the authors' ``delta_weight`` divided by ``W``).
    ``A - C = up @ t`` with ``up = (a - t)^T / k``, so the rows of ``down``
    are the target rows carried through the rest, with solves in place of
    the authors' inverses.

    Args:
        targets: per concept, ``[n_i, d]`` target rows (SPEED: the last word
            token, or all rows but the start for 'nudity'; see ``speed_rows``).
        anchors: per concept, anchor rows of the same shape.
        projector: ``P`` from ``null_space_projector``.
        invariants: ``K2`` as rows ``[m, d]`` (``invariant_rows``), or None.
        retain_scale, lamb: see ``SpeedSettings``.
    """
    if not targets or len(targets) != len(anchors):
        raise ValueError(f"give one anchor per target: {len(targets)} targets, {len(anchors)} anchors")
    for t, a in zip(targets, anchors):
        if t.shape != a.shape:
            raise ValueError(f"target rows {tuple(t.shape)} and anchor rows {tuple(a.shape)} must match")
    device = algebra_device(projector.device)
    p = as_algebra(projector, device)
    t = torch.cat([as_algebra(x, device) for x in targets])
    a = torch.cat([as_algebra(x, device) for x in anchors])
    k = len(targets)
    if not p.any():  # the retained rows use every direction: nothing may change
        return EditStep(up=torch.zeros_like(t.T), down=torch.zeros_like(t))
    c = (t.T @ t) / k
    q = c @ p
    q.diagonal().add_(retain_scale)              # M^-1 = C P + retain_scale I
    m = _Factored(q)
    rows = t @ p                                  # t P
    if invariants is not None and invariants.numel():
        k2 = as_algebra(invariants, device).T     # [d, m]
        m_k2 = m.left(k2)                         # M K2
        pk2 = p @ k2
        small = pk2.T @ m_k2                      # K2^T P M K2 (P symmetric)
        small.diagonal().add_(lamb)
        rows = rows - (rows @ m_k2) @ _invariant_solve(small, pk2.T)
    return EditStep(up=(a - t).T / k, down=m.right(rows))   # (...) M, a solve from the right


def _retained_chunk_moment(
    chunk: torch.Tensor, aug_num: int, weakest: torch.Tensor, erase_map: torch.Tensor,
    generator: torch.Generator | None, mini_batch: int,
) -> tuple[torch.Tensor, int]:
    """One chunk's ``sum r^T r`` and row count, with the authors' augmentation
    (``generate_perturbed_embs``): ``aug_num`` noisy copies of every row,
    noise projected onto the layer's weakest input direction, of which the
    ones the pre-erase map moves most (norm above the mean) are kept."""
    if aug_num <= 0:
        return chunk.T @ chunk, chunk.shape[0]
    copies, norms = [], []
    for start in range(0, chunk.shape[0], mini_batch):
        mini = chunk[start:start + mini_batch]
        for _ in range(aug_num):
            noise = torch.randn(mini.shape, generator=generator, dtype=mini.dtype, device=mini.device)
            perturbed = mini + noise @ weakest
            copies.append(perturbed)
            norms.append((perturbed @ erase_map.T).norm(dim=1))
    copies_all, norms_all = torch.cat(copies), torch.cat(norms)
    rows = torch.cat([chunk, copies_all[norms_all > norms_all.mean()]])
    return rows.T @ rows, rows.shape[0]


def speed_layer_steps(
    weights: Mapping[str, torch.Tensor],
    targets: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    retained_rows: torch.Tensor,
    invariants: torch.Tensor | None,
    settings: SpeedSettings = SpeedSettings(),
    *,
    aug_num: int = 10,
    filter_retained: bool = True,
    generator: torch.Generator | None = None,
    chunk_size: int = 128,
    mini_batch: int = 8,
) -> dict[str, EditStep]:
    """SPEED with the authors' per-layer refinements: ``{name: T_l}`` with
    ``W_l -> W_l @ T_l``.

    Per layer, as ``edit_model`` does it: the retained rows (shuffled once,
    before the first layer) are filtered to those the layer's pre-erase map
    ``W (A - C) (I + C)^-1`` moves more than their mean (when ``aug_num > 0``
    and ``filter_retained``), augmented chunk by chunk (``aug_num`` noisy
    copies per row along the layer's weakest right singular vector), and
    their second moment defines that layer's ``P``. ``aug_num = 0`` gives the
    shared step of ``speed_step`` for every layer. ``generator`` drives the
    shuffle and the noise (in this order, as the authors' global RNG does).
    Everything is float64 on the algebra device.
    """
    device = algebra_device(retained_rows.device)
    t = torch.cat([as_algebra(x, device) for x in targets])
    a = torch.cat([as_algebra(x, device) for x in anchors])
    k, width = len(targets), t.shape[1]
    c = (t.T @ t) / k
    a_minus_c = ((a - t).T @ t) / k
    eye = torch.eye(width, dtype=ALGEBRA_DTYPE, device=device)
    # (A - C)(I + C)^-1: the plain closed form, used only to rank retained rows.
    pre_erase = torch.linalg.solve(eye + c.T, a_minus_c.T).T
    retained = as_algebra(retained_rows, device)
    retained = retained[torch.randperm(retained.shape[0], generator=generator, device=device)]
    steps = {}
    for name, weight in weights.items():
        w = as_algebra(weight, device)
        erase_map = w @ pre_erase
        weakest_direction = torch.linalg.svd(w, full_matrices=False)[2][-1:]
        weakest = weakest_direction.T @ weakest_direction
        layer_rows = retained
        if aug_num > 0 and filter_retained:
            norms = (retained @ erase_map.T).norm(dim=1)
            layer_rows = retained[norms > norms.mean()]
        total, count = torch.zeros(width, width, dtype=ALGEBRA_DTYPE, device=device), 0
        for start in range(0, layer_rows.shape[0], chunk_size):
            moment, rows = _retained_chunk_moment(layer_rows[start:start + chunk_size], aug_num, weakest, erase_map,
                                                  generator, mini_batch)
            total, count = total + moment, count + rows
        projector = null_space_projector(total / count, settings.threshold)
        steps[name] = speed_step(targets, anchors, projector, invariants,
                                 retain_scale=settings.retain_scale, lamb=settings.lamb)
    return steps


def _first_chunk(text: EncodedText) -> tuple[torch.Tensor, int]:
    # The authors truncate every text to one 77-token window.
    return text.chunks()[0]


def speed_rows(concepts: Sequence[EncodedText], anchors: Sequence[EncodedText]
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SPEED's target and anchor rows: each text's last word token (its
    ``attention_mask.sum() - 2``; the start token for the empty prompt), or,
    when the only concept is 'nudity', every row but the start token."""
    every_row = [c.text.strip().casefold() for c in concepts] == ["nudity"]
    targets, kept_anchors = [], []
    for concept, anchor in zip(concepts, anchors):
        (c_rows, c_words), (a_rows, a_words) = _first_chunk(concept), _first_chunk(anchor)
        if c_rows.shape != a_rows.shape:
            raise ValueError(f"concept {concept.text!r} and anchor {anchor.text!r} were encoded to different shapes; "
                             "encode both with the same text encoder")
        if every_row:
            targets.append(c_rows[1:])
            kept_anchors.append(a_rows[1:])
        else:
            targets.append(c_rows[c_words:c_words + 1])
            kept_anchors.append(a_rows[a_words:a_words + 1])
    return targets, kept_anchors


def names_a_concept(text: str, concepts: Sequence[str]) -> bool:
    """Whether ``text`` contains one of ``concepts`` as whole words (the
    authors drop such retained texts)."""
    return any(re.search(r"\b" + re.escape(c.casefold()) + r"\b", text.casefold()) for c in concepts)


def null_space_of(concepts: Sequence[EncodedText], preserves: Sequence[EncodedText],
               settings: SpeedSettings = SpeedSettings()) -> NullSpace:
    """The null space of a SPEED edit from the texts of a run.

    ``preserves`` must include the empty prompt (``texts.preserve_prompts``
    puts it first): its rows give ``K2``. Preserve texts that name an erased
    concept are left out, as the authors do. With ``settings.retained`` "last
    word" the retained rows are, as in the authors' code, the last word token
    of every other preserve text, or, when there is none, the empty prompt's
    rows after the start token. With "every token" they are every word token
    and the EOS row of each other preserve text, and the empty prompt's rows
    after the start token in every case: the empty prompt is the negative
    prompt of most graphs, and its rows are then kept in full, not only
    through ``K2``.
    """
    empty = next((p for p in preserves if not p.text.strip()), None)
    if empty is None:
        raise ValueError("SPEED keeps the empty prompt's outputs: include the empty prompt among the preserve texts")
    names = [c.text.strip() for c in concepts]
    others = [p for p in preserves if p.text.strip()]
    dropped = tuple(p.text for p in others if names_a_concept(p.text, names))
    kept = [p for p in others if p.text not in dropped]
    empty_rows = _first_chunk(empty)[0][1:]
    if settings.retained == EVERY_TOKEN:
        rows = torch.cat([r[1:w + 2] for r, w in map(_first_chunk, kept)] + [empty_rows])
        sources = (*(p.text for p in kept), "")
    elif kept:
        rows = torch.cat([r[w:w + 1] for r, w in map(_first_chunk, kept)])
        sources = tuple(p.text for p in kept)
    else:
        rows, sources = empty_rows, ("",)
    projector = null_space_projector(second_moment(rows), settings.threshold)
    return NullSpace(projector=projector, invariants=invariant_rows(_first_chunk(empty)[0], settings.clusters,
                                                                    settings.seed),
                     retained_rows=as_algebra(rows, projector.device), retained_texts=sources, dropped=dropped,
                     settings=settings)

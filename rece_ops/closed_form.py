"""The two closed forms of RECE, on plain tensors.

Both reduce to small ``d x d`` systems (``d`` = context width). They are
formed and solved in float64: the UCE system is badly conditioned (condition
numbers near 5e5 with SD1.4-shaped weights), so float32 would cost about 2%
of accuracy. The Gram matrix of all layers is float64 too (see ``gram``);
the per-matrix deltas, the other large product, run in float32 on the
weights' device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

ALGEBRA_DTYPE = torch.float64

# Progress hook: called as (done, total) as work proceeds; may raise to cancel.
StepCallback = Callable[[int, int], None]


def algebra_device(device: torch.device) -> torch.device:
    """Where the float64 ``d x d`` algebra runs: the weights' device, except
    MPS, which has no float64."""
    return torch.device("cpu") if device.type == "mps" else device


def as_algebra(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=ALGEBRA_DTYPE)


def gram(
    weights: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    device: torch.device | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """``G = sum_l W_l^T W_l`` over all K/V matrices, float64 ``[d, d]``.

    Computed in float64 on the weights' device although it is a large
    product: the adversarial system ``T^T G T + reg*I`` is held only by
    ``reg`` in G's weak directions, so float32 rounding in ``G`` (about
    1e-7*|G| in every direction) comes back amplified by |G|/reg, beyond 1e-5
    when the model has fewer K/V rows than the context is wide. ``G``
    depends only on the original weights: callers compute it once per model.
    ``callback`` is called as (matrices done, matrices) and may raise to stop.
    """
    matrices = list(weights.values() if isinstance(weights, Mapping) else weights)
    return cross_gram(matrices, matrices, device, callback)


@dataclass(frozen=True)
class EditStep:
    """One UCE edit step in factored form: ``T = I + up @ down``.

    ``up`` is ``[d, n]`` and ``down`` is ``[n, d]`` (float64), ``n`` the number
    of erase rows, so ``T - I`` has rank at most ``n`` by construction.
    """

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank_bound(self) -> int:
        return self.up.shape[1]

    def dense(self) -> torch.Tensor:
        """``T`` as a ``[d, d]`` float64 matrix."""
        eye = torch.eye(self.up.shape[0], dtype=self.up.dtype, device=self.up.device)
        return eye + self.up @ self.down

    def after(self, transform: torch.Tensor) -> torch.Tensor:
        """``transform @ T``: this step applied after ``transform``, without
        forming ``T`` (``transform + (transform @ up) @ down``)."""
        return transform + (transform @ self.up) @ self.down


def uce_step(
    erase_rows: torch.Tensor,
    target_rows: torch.Tensor,
    preserve_rows: torch.Tensor | None,
    *,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> EditStep:
    """One UCE edit step: the layer-independent transform ``T = A @ inv(M)``.

    Every K/V matrix ``W`` becomes ``W @ T``, the minimiser of
    ``lamb*|W' - W|^2 + erase_scale*sum_r |W' c_r - W t_r|^2
    + preserve_scale*sum_s |W' p_s - W p_s|^2`` (UCE, RECE Eq. 3), with

        M = lamb*I + erase_scale*C^T C + preserve_scale*P^T P
        A = lamb*I + erase_scale*T^T C + preserve_scale*P^T P

    Since ``A - M = erase_scale*(T - C)^T C``, ``T = I + up @ down`` with
    ``up = erase_scale*(T - C)^T`` and ``down = C @ inv(M)``. Forming the
    difference from the identity this way keeps ``T - I`` exactly low-rank;
    ``solve(M, A^T)^T - I`` would carry the solve's rounding (amplified by
    ``M``'s condition number) into every direction.

    ``M`` is ``lamb*I`` plus ``k`` rows' outer products (``X = [sqrt(erase_scale) C;
    sqrt(preserve_scale) P]``), so while ``k < d`` the push-through identity
    ``X inv(lamb*I + X^T X) = inv(lamb*I + X X^T) X`` gives ``down`` from a
    ``k x k`` system: ``O(k^2 d)`` instead of the ``O(d^3)`` of ``M``, with no
    cancellation (``M``'s condition number is the small system's too).

    Args:
        erase_rows: ``C``, ``[n, d]`` rows to erase.
        target_rows: ``T``, ``[n, d]`` rows each erased row must behave like.
        preserve_rows: ``P``, ``[m, d]`` rows whose outputs must stay, or None.

    Returns:
        The step's factors, float64 on the rows' algebra device.
    """
    if erase_rows.shape != target_rows.shape:
        raise ValueError(f"erase rows {tuple(erase_rows.shape)} and target rows {tuple(target_rows.shape)} must match")
    if lamb <= 0 or erase_scale < 0 or preserve_scale < 0:
        raise ValueError(f"lamb must be > 0 and the scales >= 0, got lamb={lamb}, erase_scale={erase_scale}, "
                         f"preserve_scale={preserve_scale}")
    device = algebra_device(erase_rows.device)
    c = as_algebra(erase_rows, device)
    t = as_algebra(target_rows, device)
    width = c.shape[1]
    p = None
    if preserve_rows is not None and preserve_rows.numel() and preserve_scale != 0:
        p = as_algebra(preserve_rows, device)
        if p.shape[1] != width:
            raise ValueError(f"preserve rows are {p.shape[1]} wide, erase rows {width}")
    if erase_scale == 0:  # T = I: nothing to erase
        return EditStep(up=torch.zeros_like(c.T), down=torch.zeros_like(c))
    if c.shape[0] + (0 if p is None else p.shape[0]) < width:
        x = c * erase_scale ** 0.5 if p is None else torch.cat([c * erase_scale ** 0.5, p * preserve_scale ** 0.5])
        small = x @ x.T
        small.diagonal().add_(lamb)
        # Rows of X inv(M), then C inv(M) = (first n rows) / sqrt(erase_scale).
        down = spd_solve(small, x)[:c.shape[0]] / erase_scale ** 0.5
        return EditStep(up=erase_scale * (t - c).T, down=down)
    m = erase_scale * (c.T @ c)
    if p is not None:
        m = m + preserve_scale * (p.T @ p)
    # The float64 sums are symmetric up to rounding; make M exactly so.
    m = 0.5 * (m + m.T)
    m.diagonal().add_(lamb)
    if c.shape[0] > width:
        # More erase rows than the context is wide (hundreds of concepts): form
        # T - I = erase_scale*(T - C)^T C inv(M) directly as d x d, which
        # is exact and avoids n-column factors.
        edit = spd_solve(m, (erase_scale * ((t - c).T @ c)).T).T
        return EditStep(up=edit, down=torch.eye(width, dtype=ALGEBRA_DTYPE, device=device))
    return EditStep(up=erase_scale * (t - c).T, down=spd_solve(m, c.T).T)  # C @ inv(M), M symmetric


def spd_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``inv(matrix) @ rhs`` for a symmetric positive definite ``matrix``:
    Cholesky (half the work of LU), or LU if rounding made it indefinite."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.solve(matrix, rhs)


def cross_gram(
    left: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    right: Iterable[torch.Tensor] | Mapping[str, torch.Tensor],
    device: torch.device | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """``sum_l A_l^T B_l`` over paired matrices (float64 ``[d, d]``, on the
    algebra device of ``device`` or the first matrix). With an edited model's
    weights ``A`` and the original's ``B`` it is all the adversarial solve
    needs when the edit is not one shared transform; ``gram`` is ``A = B``.
    ``callback`` is called as (pairs done, pairs) and may raise to stop."""
    lefts = list(left.values() if isinstance(left, Mapping) else left)
    rights = list(right.values() if isinstance(right, Mapping) else right)
    if not lefts:
        raise ValueError("no K/V weights given")
    if len(lefts) != len(rights):
        raise ValueError(f"cross_gram needs paired weight lists, got {len(lefts)} and {len(rights)} matrices")
    width = lefts[0].shape[1]
    target = algebra_device(device or lefts[0].device)
    for a, b in zip(lefts, rights):
        if a.ndim != 2 or a.shape[1] != width or a.shape != b.shape:
            raise ValueError(f"every K/V weight must be [d_out, {width}] (paired ones equal), "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if target.type == "cpu" and all(a is b for a, b in zip(lefts, rights)):
        return _cpu_gram(lefts, width, callback)
    total = torch.zeros(width, width, dtype=ALGEBRA_DTYPE, device=target)
    for done, (a, b) in enumerate(zip(lefts, rights), 1):
        a64 = as_algebra(a, target)
        total += a64.T @ (a64 if b is a else as_algebra(b, target))
        if callback:
            callback(done, len(lefts))
    return total


def _cpu_gram(matrices: list[torch.Tensor], width: int, callback: StepCallback | None = None) -> torch.Tensor:
    """``sum W^T W`` in float64 on the CPU through NumPy, whose ``X.T @ X``
    is a symmetric rank-k update (half the work of a general product; torch
    has none), on blocks of stacked matrices copied into one float64 buffer.

    The buffer is a quarter of the weights' float64 size, between 16 and
    128 MiB: tall enough for BLAS to run at full speed, small beside the
    weights themselves.
    """
    total_rows = sum(m.shape[0] for m in matrices)
    row_bytes = 8 * width
    buffer_rows = max(min(total_rows // 4, (128 << 20) // row_bytes), (16 << 20) // row_bytes,
                      max(m.shape[0] for m in matrices))
    buffer = np.empty((min(buffer_rows, total_rows), width))
    total = np.zeros((width, width))
    filled = 0
    for done, matrix in enumerate(matrices):
        rows = matrix.shape[0]
        if filled + rows > buffer.shape[0]:
            block = buffer[:filled]
            total += block.T @ block
            filled = 0
            if callback:
                callback(done, len(matrices))
        # NumPy casts float32 to float64 while it copies: one pass, no temporary
        # (it has no bfloat16: those and other half types go through float32).
        part = matrix.detach().to(device="cpu")
        buffer[filled:filled + rows] = (part if part.dtype in (torch.float32, torch.float64) else part.float()).numpy()
        filled += rows
    if filled:
        block = buffer[:filled]
        total += block.T @ block
    if callback:
        callback(len(matrices), len(matrices))
    return torch.from_numpy(total)


def adversarial_from_grams(
    concept_rows: torch.Tensor,
    edited_gram: torch.Tensor,
    edited_original_gram: torch.Tensor,
    reg_scale: float,
    anchor_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The closed-form adversarial embedding for any edited model.

    ``c' = argmin_x sum_l |A_l x - B_l c|^2 + reg_scale*|x - a|^2
         = solve(sum A^T A + reg_scale*I, sum A^T B c + reg_scale*a)``
    with edited weights ``A``, original weights ``B``: ``edited_gram`` is
    ``sum A^T A`` and ``edited_original_gram`` is ``sum A^T B``
    (``cross_gram(A, B)``). Rows are ``[n, d]``; returns float64 ``[n, d]``.
    """
    device = algebra_device(edited_gram.device)
    h = as_algebra(edited_gram, device)
    h = (h + h.T).mul_(0.5)  # symmetric up to rounding; make it exactly so
    h.diagonal().add_(reg_scale)
    cross = as_algebra(edited_original_gram, device)
    rows = as_algebra(concept_rows, device)
    if anchor_rows is not None:
        if anchor_rows.shape != concept_rows.shape:
            raise ValueError(f"anchor {tuple(anchor_rows.shape)} must match concept rows {tuple(concept_rows.shape)}")
        return spd_solve(h, cross @ rows.T + reg_scale * as_algebra(anchor_rows, device).T).T
    if rows.shape[0] > rows.shape[1]:
        # More rows than d (many concepts): solve for the d x d map once, then
        # apply it, instead of solving for every row.
        return rows @ spd_solve(h, cross).T
    return spd_solve(h, cross @ rows.T).T


def adversarial_embedding(
    concept_rows: torch.Tensor,
    transform: torch.Tensor,
    gram_matrix: torch.Tensor,
    reg_scale: float,
    anchor_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """RECE's closed-form adversarial embedding against an edited model.

    With edited weights ``W'_l = W_l @ transform`` and ``G = sum_l W_l^T W_l``
    of the original weights, each row ``c`` becomes

        c' = argmin_x sum_l |W'_l x - W_l c|^2 + reg_scale*|x - a|^2
           = inv(T^T G T + reg_scale*I) @ (T^T G c + reg_scale*a)

    with ``a = 0`` (the paper's regulariser "toward zero") unless
    ``anchor_rows`` gives ``a`` (the authors' "standard regularisation").

    Args:
        concept_rows: ``[n, d]`` rows of the concept's embedding.
        transform: ``[d, d]`` cumulative edit so far.
        gram_matrix: ``[d, d]`` Gram matrix of the original K/V weights.
        reg_scale: regulariser weight (> 0 unless ``T^T G T`` is invertible).
        anchor_rows: ``[n, d]`` anchor embedding, or None for zero.

    Returns:
        ``[n, d]`` float64 rows.
    """
    device = transform.device
    t = as_algebra(transform, device)
    gt = as_algebra(gram_matrix, device) @ t
    return adversarial_from_grams(concept_rows, t.T @ gt, gt.T, reg_scale, anchor_rows)


def no_wider_than_d(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``T - I`` with at most ``d`` columns: as given, or the
    dense ``(up @ down, I)`` when they have more (the same product, cheaper
    to use from then on)."""
    if up.shape[1] <= up.shape[0]:
        return up, down
    return up @ down, torch.eye(up.shape[0], dtype=up.dtype, device=up.device)


def edited_grams(gram_matrix: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T^T G T, T^T G)`` for ``T = I + up @ down`` (``up [d, r]``,
    ``down [r, d]``) in ``O(d^2 r)`` instead of the ``O(d^3)`` of dense
    products: what ``adversarial_from_grams`` needs for a RECE edit."""
    g = as_algebra(gram_matrix, up.device)
    gt = g + (g @ up) @ down                 # G T
    tgt = gt + down.T @ (up.T @ gt)          # T^T G T
    return tgt, gt.T

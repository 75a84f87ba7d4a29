"""Euclidean projection onto the probability simplex.

UnlearnDiffAtk (Zhang et al., ECCV 2024; OPTML-Group/Diffusion-MU-Attack,
``src/attackers/text_grad_.py``, ``projection``/``bisection``) keeps its token
distributions on ``{0 <= x <= 1, sum x = 1}`` by bisecting for the threshold
to 1e-5. With the sum fixed at 1 and ``x >= 0`` no entry can exceed 1, so the
upper bound never binds: the set is the probability simplex, whose projection
has an exact sort-based solution (Duchi et al., ICML 2008, Fig. 1; Wang &
Carreira-Perpinan, arXiv 1309.1541, Algorithm 1). This module computes that.
"""
from __future__ import annotations

import torch


def project_to_simplex(values: torch.Tensor) -> torch.Tensor:
    """Project each row (last dimension) of ``values`` onto the probability simplex.

    Returns ``argmin_x ||x - a||_2`` over ``{x >= 0, sum x = 1}`` for every row
    ``a``: ``x = max(a - tau, 0)`` with ``tau = (sum_{i<=rho} u_i - 1) / rho``,
    ``u`` the row sorted in decreasing order and
    ``rho = max{j : u_j - (sum_{i<=j} u_i - 1) / j > 0}``
    (Wang & Carreira-Perpinan 2013, Algorithm 1).

    Args:
        values: ``[..., n]`` finite values, ``n >= 1``.

    Returns:
        A tensor of the same shape, dtype and device.
    """
    if values.ndim < 1 or values.shape[-1] < 1:
        raise ValueError(f"values must have a non-empty last dimension, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite")
    # The threshold is a difference of cumulative sums: float64 keeps it
    # exact enough that rows sum to 1 even for a 49408-token vocabulary.
    rows = values.to(torch.float64)
    descending = torch.sort(rows, dim=-1, descending=True).values
    excess = torch.cumsum(descending, dim=-1) - 1.0
    ranks = torch.arange(1, rows.shape[-1] + 1, dtype=rows.dtype, device=rows.device)
    support = descending - excess / ranks > 0
    # The condition holds on a prefix (and always at j = 1); the largest rank
    # where it holds is read from the mask so that rounding cannot make a
    # count of it point past the prefix.
    rho = torch.where(support, ranks, torch.zeros_like(ranks)).amax(dim=-1, keepdim=True)
    tau = torch.gather(excess, -1, rho.long() - 1) / rho
    return torch.clamp(rows - tau, min=0.0).to(values.dtype)

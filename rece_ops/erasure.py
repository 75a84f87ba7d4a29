"""The result of a RECE run as one value: a transform shared by all layers.

Every K/V matrix ``W`` of the model becomes ``W @ T`` with one ``d x d``
matrix ``T``, the product of every edit step's transform. Each step is
``I + up_s @ down_s`` with as many columns as erase rows, so
``T - I = up @ down`` exactly, with ``up = [U_1, T_1 U_2, T_2 U_3, ...]`` and
``down = [V_1; V_2; ...]`` (``T_k`` the transform after step ``k``). Patches
(``W @ (T - I)``), erasure files and an exact LoRA export are all views of
this one object.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Sequence

import torch

from .closed_form import ALGEBRA_DTYPE, EditStep
from .null_space import NullSpace
from .settings import RECESettings


@dataclass(frozen=True)
class Erasure:
    """A finished RECE (or UCE) edit.

    Attributes:
        steps: every edit step in order (the UCE step, then one per epoch),
            each ``T_s = I + up @ down`` in float64.
        adversarial: per epoch, per concept, the ``[rows, d]`` adversarial
            embedding ``c'`` derived against the model as it was when that
            epoch began (float64).
        settings: the scales used.
        concepts, guides, preserves: the texts, for reports and metadata.
        null_space: for a SPEED edit, what it was confined to; None for the
            paper's UCE/RECE steps.
    """

    steps: tuple[EditStep, ...]
    adversarial: tuple[tuple[torch.Tensor, ...], ...] = ()
    settings: RECESettings = field(default_factory=RECESettings)
    concepts: tuple[str, ...] = ()
    guides: tuple[str, ...] = ()
    preserves: tuple[str, ...] = ()
    null_space: NullSpace | None = None

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("an Erasure needs at least one step")

    @property
    def width(self) -> int:
        """Context width ``d`` the edit applies to."""
        return self.steps[0].up.shape[0]

    @cached_property
    def cumulative(self) -> tuple[torch.Tensor, ...]:
        """The dense transform after each step: ``T_1``, ``T_1 T_2``, ... (float64)."""
        out = [self.steps[0].dense()]
        for step in self.steps[1:]:
            out.append(step.after(out[-1]))
        return tuple(out)

    @property
    def transform(self) -> torch.Tensor:
        """``T``: the whole edit, ``W -> W @ T`` (float64 ``[d, d]``)."""
        return self.cumulative[-1]

    @cached_property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [d, R], down [R, d])`` with ``T - I = up @ down`` exactly,
        ``R`` the number of erase rows of all steps."""
        ups = [self.steps[0].up]
        for before, step in zip(self.cumulative[:-1], self.steps[1:]):
            ups.append(before @ step.up)
        return torch.cat(ups, dim=1), torch.cat([s.down for s in self.steps])

    def scaled(self, strength: float) -> "Erasure":
        """The edit applied at ``strength``: ``T_s = I + strength * (T - I)``,
        as one step with the same factors (what a patch at that strength does)."""
        up, down = self.factors
        return Erasure(steps=(EditStep(up=strength * up, down=down),), adversarial=self.adversarial,
                       settings=self.settings, concepts=self.concepts, guides=self.guides, preserves=self.preserves,
                       null_space=self.null_space)

    @cached_property
    def edit(self) -> torch.Tensor:
        """``T - I`` (float64): what a patch adds, ``W @ (T - I)``."""
        up, down = self.factors
        return up @ down

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """The patch of one matrix, ``W @ (T - I)``, float32 on ``W``'s device."""
        if weight.ndim != 2 or weight.shape[1] != self.width:
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not read a {self.width}-wide context")
        return weight.float() @ self.edit.to(device=weight.device, dtype=torch.float32)

    def deltas(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: W @ (T - I)}`` for every matrix."""
        return {name: self.delta(weight) for name, weight in weights.items()}

    def apply(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{name: W @ T}`` in each weight's dtype: the erased weights."""
        return {name: (w.float() + self.delta(w)).to(w.dtype) for name, w in weights.items()}

    @cached_property
    def _svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # SVD of T - I = up @ down through thin QRs of both factors: only an
        # R x R (or d x d) core is decomposed, and rank stays <= R exactly.
        up, down = self.factors
        q_up, r_up = torch.linalg.qr(up)
        q_down, r_down = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        return q_up @ u, s, vh @ q_down.T

    @property
    def rank_bound(self) -> int:
        """An upper bound on ``rank()`` that costs nothing: ``min(R, d)``."""
        return min(self.factors[0].shape[1], self.width)

    @property
    def thin(self) -> bool:
        """Whether the factors are at most ``d`` columns wide, so that the SVD
        behind ``rank()`` and ``low_rank()`` costs ``O(d R^2)``, not a ``d x d``
        decomposition (seconds for SDXL with many concepts)."""
        return self.factors[0].shape[1] <= self.width

    def singular_values(self) -> torch.Tensor:
        """Singular values of ``T - I``, largest first."""
        return self._svd[1]

    def rank(self, rtol: float | None = None) -> int:
        """Numerical rank of ``T - I`` (the LoRA rank that reproduces it).

        ``rtol`` is relative to the largest singular value and defaults to
        ``d * eps(float64)``, as ``torch.linalg.matrix_rank`` does.
        """
        values = self.singular_values()
        if values.numel() == 0 or values[0] == 0:
            return 0
        tol = (rtol if rtol is not None else self.width * torch.finfo(ALGEBRA_DTYPE).eps) * values[0]
        return int((values > tol).sum())

    def low_rank(self, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonal factors ``(up [d, r], down [r, d])`` with ``T - I ~= up @ down``.

        Exact (to float64 rounding) at the numerical rank, the default; a
        smaller ``rank`` keeps the largest singular directions (the best
        rank-``r`` approximation). A matrix's patch is ``(W @ up) @ down``.
        """
        r = self.rank() if rank is None else rank
        u, s, vh = self._svd
        if not 0 <= r <= s.numel():
            raise ValueError(f"rank must be between 0 and {s.numel()}, got {r}")
        return u[:, :r] * s[:r], vh[:r]


def chain(erasures: Sequence[Erasure], strengths: Sequence[float] | None = None) -> Erasure:
    """Erasures applied one after another (each at its strength) as one value.

    ``W -> W @ T_1s @ T_2s ...``: each part's edit, scaled, becomes one step,
    so the chain's factors, rank and transform follow as for any Erasure.
    Texts and settings are the first part's; keep per-part descriptions
    elsewhere when they matter.
    """
    if not erasures:
        raise ValueError("nothing to chain: no erasures given")
    strengths = [1.0] * len(erasures) if strengths is None else list(strengths)
    if len(strengths) != len(erasures):
        raise ValueError(f"{len(erasures)} erasures but {len(strengths)} strengths")
    steps = tuple(e.scaled(s).steps[0] for e, s in zip(erasures, strengths))
    if len({step.up.shape[0] for step in steps}) > 1:
        raise ValueError("these erasures are for different context widths and cannot be chained")
    first = erasures[0]
    return Erasure(steps=steps, settings=first.settings, concepts=first.concepts, guides=first.guides,
                   preserves=first.preserves)

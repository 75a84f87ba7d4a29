"""An erasure as a standard LoRA: exact at the edit's numerical rank.

Every matrix's patch is ``W @ (T - I)``, and ``T - I = A @ B`` from its SVD
(``A = U S``, ``B = V^T``, shared by every layer), so a LoRA with
``lora_up = W @ A`` and ``lora_down = B`` per matrix reproduces the erasure
exactly at ``r`` = rank of ``T - I``; a smaller ``r`` keeps the strongest
directions of the edit. ``alpha = r`` makes the loaders' scale
``alpha / r`` one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from .erasure import Erasure


@dataclass(frozen=True)
class LoraFactors:
    """Per-matrix LoRA factors and how well they reproduce the erasure.

    Attributes:
        rank: the LoRA rank ``r``.
        layers: ``{name: (up [d_out, r], down [r, d])}`` in the stored dtype.
        relative_error: ``sqrt(sum |dW - up@down|^2 / sum |dW|^2)`` over all
            matrices, ``dW = W @ (T - I)``, measured on the stored factors.
        worst_relative_error: the largest per-matrix relative error.
    """

    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    relative_error: float
    worst_relative_error: float


def lora_factors(
    weights: Mapping[str, torch.Tensor],
    erasure: Erasure,
    rank: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoraFactors:
    """LoRA factors of ``erasure`` applied to ``weights`` (the K/V weights it
    was applied to). ``rank`` None is the exact numerical rank; a larger
    value is capped there, since more directions add nothing."""
    exact_rank = erasure.rank()
    r = exact_rank if rank is None else min(rank, exact_rank)
    if r <= 0:
        raise ValueError("the erasure changes nothing (rank 0): there is no LoRA to export")
    a, b = erasure.low_rank(r)
    full = erasure.edit
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    error_sq = total_sq = worst = 0.0
    for name, weight in weights.items():
        w = weight.detach().float()
        up = (w @ a.to(device=w.device, dtype=torch.float32)).to(dtype)
        down = b.to(device=w.device, dtype=dtype)
        exact = w @ full.to(device=w.device, dtype=torch.float32)
        miss = float((exact - up.float() @ down.float()).norm()) ** 2
        size = float(exact.norm()) ** 2
        error_sq, total_sq = error_sq + miss, total_sq + size
        worst = max(worst, math.sqrt(miss / size) if size > 0 else 0.0)
        layers[name] = (up.cpu(), down.cpu())
    overall = math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0
    return LoraFactors(rank=r, layers=layers, relative_error=overall, worst_relative_error=worst)


def lora_state_dict(factors: LoraFactors, lora_names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The kohya-style LoRA tensors (``<name>.lora_up.weight``,
    ``.lora_down.weight``, ``.alpha``) with each matrix's LoRA name from
    ``lora_names`` (e.g. ``lora_unet_down_blocks_0_..._attn2_to_k``)."""
    out: dict[str, torch.Tensor] = {}
    for key, (up, down) in factors.layers.items():
        name = lora_names[key]
        # Own copies: safetensors refuses tensors that share memory.
        out[f"{name}.lora_up.weight"] = up.clone()
        out[f"{name}.lora_down.weight"] = down.clone()
        out[f"{name}.alpha"] = torch.tensor(float(factors.rank), dtype=torch.float32)
    return out

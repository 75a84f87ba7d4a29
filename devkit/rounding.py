"""Rounding bounds for checking a patched weight ``W + s W (T - I)``.

Shared by tests/test_dynamic_vram.py and devkit.gpu_dynamic_vram_check, which
both accept a result only where it differs from a float64 reference by its
dtype's rounding plus the float32 evaluation error.
"""
from __future__ import annotations

from typing import Sequence

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
LAMBDA = 2.0  # of the probabilistic float32 error bound (float32_error_bound)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values at ``|x|`` (float64), subnormals included; 0 for float64."""
    if dtype == torch.float64:
        return torch.zeros_like(x)
    info = torch.finfo(dtype)
    mantissa_bits = round(-torch.log2(torch.tensor(info.eps)).item())
    _, exponent = torch.frexp(x.abs().clamp(min=info.tiny))
    return torch.ldexp(torch.ones_like(x), (exponent - 1 - mantissa_bits).to(torch.int32))


def float32_error_bound(weight: torch.Tensor, factors: Sequence[torch.Tensor], strength: float,
                        result: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on the float32 evaluation error of ``W + s W (T - I)``
    (``T - I`` the product of ``factors``) before the one rounding to the
    weight's dtype. Each product of inner length n errs by at most
    ``LAMBDA * sqrt(n) * u`` times the sum of its terms' magnitudes (the
    probabilistic bound of Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019;
    the worst case, ``n * u``, is too loose to tell float32 from fp16
    arithmetic here), then one rounding each for the scaling and the sum."""
    magnitude = weight.double().abs()
    inner = 0.0
    for factor in factors:
        inner += LAMBDA * factor.shape[0] ** 0.5 * U32
        magnitude = magnitude @ factor.double().abs()
    return (inner + U32) * abs(strength) * magnitude + U32 * result.abs()

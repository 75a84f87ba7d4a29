"""The RECE loop done the straightforward way, as the authors' code does it.

For comparison only: per layer, the text encoder is run again and the
layer's projections of every text are computed, the closed form is built
with an explicit matrix inverse, all in float32; the adversarial embedding of
each epoch sums every layer's projections again. Same mathematics as
``rece_ops.erase`` (same rows, same scales), none of its structure.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from rece_ops import EncodedText, RECESettings, uce_erase_rows
from rece_ops.texts import epoch_targets

Encode = Callable[[Sequence[str]], list[EncodedText]]


def _uce_layer(weight: torch.Tensor, erase: torch.Tensor, target: torch.Tensor, keep: torch.Tensor,
               settings: RECESettings) -> torch.Tensor:
    """UCE's closed form for one layer, on its current weight: ``mat1 @ inv(mat2)``."""
    eye = torch.eye(weight.shape[1], dtype=weight.dtype)
    mat1 = (settings.lamb * weight + settings.erase_scale * (weight @ target.T) @ erase
            + settings.preserve_scale * (weight @ keep.T) @ keep)
    mat2 = settings.lamb * eye + settings.erase_scale * erase.T @ erase + settings.preserve_scale * keep.T @ keep
    return mat1 @ torch.inverse(mat2)


def per_layer_rece(
    weights: Mapping[str, torch.Tensor],
    encode: Encode,
    concepts: Sequence[str],
    guide: str,
    preserves: Sequence[str],
    settings: RECESettings,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The erased K/V weights ``{name: W'}`` (float32 unless ``dtype``), computed layer by layer."""
    original = {k: w.to(dtype) for k, w in weights.items()}
    current = dict(original)
    for name in current:  # the UCE step
        texts = encode([*concepts, guide, *preserves])  # re-run for every layer, as the authors' loop does
        rows = [uce_erase_rows(c, texts[len(concepts)]) for c in texts[:len(concepts)]]
        erase = torch.cat([c for c, _ in rows]).to(dtype)
        target = torch.cat([t for _, t in rows]).to(dtype)
        keep = torch.cat([p.rows for p in texts[len(concepts) + 1:]]).to(dtype)
        current[name] = _uce_layer(current[name], erase, target, keep, settings)
    for _ in range(settings.epochs):
        texts = encode([*concepts, guide])
        found = []
        for concept in texts[:len(concepts)]:
            c = concept.rows.to(dtype)
            lhs = sum(w.T @ w for w in current.values())  # every layer's projections, summed again
            rhs = sum(current[k].T @ (original[k] @ c.T) for k in current)
            eye = torch.eye(lhs.shape[0], dtype=dtype)
            found.append((torch.inverse(lhs + settings.reg_scale * eye) @ rhs).T)
        for name in current:
            texts = encode([*concepts, guide, *preserves])
            targets = torch.cat([epoch_targets(c, texts[len(concepts)]) for c in texts[:len(concepts)]]).to(dtype)
            keep = torch.cat([p.rows for p in texts[len(concepts) + 1:]]).to(dtype)
            current[name] = _uce_layer(current[name], torch.cat(found), targets, keep, settings)
    return current

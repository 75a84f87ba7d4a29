"""The RECE loop done the straightforward way, as the authors' code does it.

For comparison only. It follows the structure of the authors' ``edit_model``
(UCE's training script, which RECE calls for its UCE step and every epoch):
layer by layer, the text encoder is run again for every concept and preserve
text; every layer's projections of the texts are computed although only the
current layer's are used; the closed form is summed from per-token outer
products (``[tokens, d_out, d]`` batches) and finished with an explicit
``torch.inverse``, all in float32. Each epoch's adversarial embedding sums
every layer's ``W'^T W'`` and ``W'^T W c`` again, per concept. Same
mathematics as ``rece_ops.erase`` (same rows, same scales), none of its
structure.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from rece_ops import EncodedText, RECESettings, uce_erase_rows
from rece_ops.texts import epoch_targets

Encode = Callable[[Sequence[str]], list[EncodedText]]
# (context rows c, target rows t): the layer's W c should become W t.
RowPair = tuple[torch.Tensor, torch.Tensor]


def _uce_layer(current: dict[str, torch.Tensor], name: str, erase_pairs: Sequence[RowPair],
               keep_pairs: Sequence[RowPair], settings: RECESettings) -> torch.Tensor:
    """UCE's closed form for one layer on the current weights, as ``edit_model`` builds it."""
    weight = current[name]
    width = weight.shape[1]
    mat1 = settings.lamb * weight
    mat2 = settings.lamb * torch.eye(width, dtype=weight.dtype)
    for scale, pairs in ((settings.erase_scale, erase_pairs), (settings.preserve_scale, keep_pairs)):
        for context, target in pairs:
            values = {n: target @ w.T for n, w in current.items()}  # every layer's, as the authors compute them
            tokens = context.shape[0]
            context_vector = context.reshape(tokens, width, 1)
            context_vector_t = context.reshape(tokens, 1, width)
            value_vector = values[name].reshape(tokens, -1, 1)
            mat1 = mat1 + scale * (value_vector @ context_vector_t).sum(dim=0)
            mat2 = mat2 + scale * (context_vector @ context_vector_t).sum(dim=0)
    return mat1 @ torch.inverse(mat2)


def _keep_pairs(encode: Encode, preserves: Sequence[str], dtype: torch.dtype) -> list[RowPair]:
    pairs = []
    for text in preserves:  # the authors encode [text, text] for every preserve text
        rows = encode([text, text])
        pairs.append((rows[0].rows.to(dtype), rows[1].rows.to(dtype)))
    return pairs


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
        erase_pairs = []
        for concept in concepts:  # re-encoded for every layer, as the authors' loop does
            old, new = encode([concept, guide])
            c, t = uce_erase_rows(old, new)
            erase_pairs.append((c.to(dtype), t.to(dtype)))
        current[name] = _uce_layer(current, name, erase_pairs, _keep_pairs(encode, preserves, dtype), settings)
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
            erase_pairs = []
            for concept, adversarial in zip(texts[:len(concepts)], found):
                (guide_rows,) = encode([guide])  # the guide re-encoded for every layer
                erase_pairs.append((adversarial, epoch_targets(concept, guide_rows).to(dtype)))
            current[name] = _uce_layer(current, name, erase_pairs, _keep_pairs(encode, preserves, dtype), settings)
    return current


def per_layer_speed(
    weights: Mapping[str, torch.Tensor],
    encode: Encode,
    concepts: Sequence[str],
    anchor: str,
    retain_texts: Sequence[str],
    invariants: torch.Tensor,
    *,
    threshold: float = 0.1,
    retain_scale: float = 1.0,
    lamb: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """SPEED's edit (no augmentation) the way the authors' ``edit_model``
    (Ouxiang-Li/SPEED, ``train_erase_null.py``) computes it: per layer, an SVD
    of the retained second moment, explicit inverses, all in ``dtype``.
    ``retain_texts`` as the authors pass them (``[""]`` for the empty prompt
    only); ``invariants`` are ``K2``'s rows. Returns ``{name: W'}``."""
    targets, anchors = [], []
    for concept in concepts:
        old, new = encode([concept, anchor])
        if list(concepts) == ["nudity"]:
            targets.append(old.rows[1:].to(dtype))
            anchors.append(new.rows[1:].to(dtype))
        else:
            targets.append(old.rows[old.n_words:old.n_words + 1].to(dtype))
            anchors.append(new.rows[new.n_words:new.n_words + 1].to(dtype))
    target_target = torch.stack([t.T @ t for t in targets]).mean(0)
    anchor_target = torch.stack([a.T @ t for a, t in zip(anchors, targets)]).mean(0)
    encoded = encode(list(retain_texts))
    if list(retain_texts) == [""]:
        retained = encoded[0].rows[1:].to(dtype)
    else:
        retained = torch.stack([e.rows[e.n_words] for e in encoded]).to(dtype)
    k2 = invariants.to(dtype).T
    width = k2.shape[0]
    eye, eye2 = torch.eye(width, dtype=dtype), torch.eye(k2.shape[1], dtype=dtype)
    edited = {}
    for name, weight in weights.items():
        w = weight.to(dtype)
        moment = retained.T @ retained / retained.shape[0]
        u, s, _ = torch.svd(moment)
        p = u[:, s < threshold] @ u[:, s < threshold].T
        m = torch.inverse(target_target @ p + retain_scale * eye)
        delta = w @ (anchor_target - target_target) @ p @ (
            eye - m @ k2 @ torch.inverse(k2.T @ p @ m @ k2 + lamb * eye2) @ k2.T @ p) @ m
        edited[name] = w + delta
    return edited

"""The RECE loop: one UCE step, then epochs of adversarial re-erasure.

Gong et al., ECCV 2024 (arXiv 2407.12383), Sec. 3, with the erase step of
UCE (Gandikota et al., WACV 2024). Because each step multiplies every K/V
matrix by one ``d x d`` transform, the loop never touches per-layer weights:
it needs only ``G = sum_l W_l^T W_l`` of the original weights.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .closed_form import (StepCallback, adversarial_from_grams, algebra_device, as_algebra, edited_grams, gram,
                          no_wider_than_d, uce_step)
from .erasure import Erasure
from .null_space import NullSpace, SpeedSettings, null_space_of, speed_rows, speed_step
from .settings import RECESettings
from .texts import EncodedText, epoch_targets, uce_erase_rows


def _stack_rows(texts: Sequence[EncodedText], device: torch.device) -> torch.Tensor | None:
    if not texts:
        return None
    return torch.cat([as_algebra(t.rows, device) for t in texts])


def _check_widths(width: int, groups: Mapping[str, Sequence[EncodedText]]) -> None:
    for role, texts in groups.items():
        for text in texts:
            if text.width != width:
                raise ValueError(
                    f"{role} text {text.text!r} is {text.width} wide but the K/V weights read a "
                    f"{width}-wide context: the text encoder does not match the model"
                )


def erase(
    concepts: Sequence[EncodedText],
    guides: Sequence[EncodedText],
    preserves: Sequence[EncodedText],
    settings: RECESettings,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    gram_matrix: torch.Tensor | None = None,
    epoch_preserves: Sequence[EncodedText] | None = None,
    anchors: Sequence[EncodedText | None] | None = None,
    speed: SpeedSettings | None = None,
    callback: StepCallback | None = None,
) -> Erasure:
    """Run UCE and ``settings.epochs`` RECE epochs; return the edit.

    With ``speed``, every step is SPEED's null-space step instead of UCE's
    (``null_space.speed_step``): the first erases SPEED's rows of each
    concept, each epoch the adversarial rows found against the model so far,
    all confined to the same null space of the preserve texts. ``lamb``,
    ``erase_scale`` and ``preserve_scale`` are then unused.

    Args:
        concepts: the concepts to erase, encoded.
        guides: one guide per concept (what it should become; the paper's
            default is the empty prompt).
        preserves: preserve texts of every step, exactly as used (callers add
            the empty prompt; see ``texts.preserve_prompts``).
        settings: scales and epoch count.
        weights: the original K/V matrices ``{name: [d_out, d]}``; used only
            for ``G``. Give ``gram_matrix`` instead to reuse a cached ``G``.
        gram_matrix: ``G = sum W^T W`` of the original weights (float64).
        epoch_preserves: preserve texts of the epochs when they differ from
            the UCE step's (the authors' scripts pass different lists).
        anchors: per concept, the embedding that ``reg_scale`` pulls the
            adversarial embedding toward; None (for all or one concept) is
            zero, the paper's regulariser.
        speed: SPEED's settings to erase with its null-space step, or None
            for the paper's UCE step. ``preserves`` must include the empty
            prompt, whose rows SPEED keeps exactly.
        callback: progress hook, see ``StepCallback``.

    Returns:
        An ``Erasure`` with every step's transform and every epoch's
        adversarial embeddings. Nothing is modified in place.
    """
    if not concepts:
        raise ValueError("no concepts to erase: give at least one concept")
    if len(guides) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(guides)} guides: give one guide per concept")
    if anchors is not None and len(anchors) != len(concepts):
        raise ValueError(f"{len(concepts)} concepts but {len(anchors)} anchors")
    if gram_matrix is None:
        if weights is None:
            raise ValueError("give the K/V weights or their Gram matrix")
        gram_matrix = gram(weights)
    width = gram_matrix.shape[0]
    epoch_preserves = preserves if epoch_preserves is None else epoch_preserves
    _check_widths(width, {"concept": concepts, "guide": guides, "preserve": preserves,
                          "epoch preserve": epoch_preserves, "anchor": [a for a in anchors or () if a is not None]})
    if not torch.isfinite(gram_matrix).all():
        raise ValueError("the K/V weights contain NaN or infinite values")

    device = algebra_device(gram_matrix.device)
    g = as_algebra(gram_matrix, device)
    scales = dict(lamb=settings.lamb, erase_scale=settings.erase_scale, preserve_scale=settings.preserve_scale)
    total = 1 + settings.epochs

    kept: NullSpace | None = None
    if speed is None:
        # UCE step: word-aligned rows of each concept against its guide.
        pairs = [uce_erase_rows(c, t) for c, t in zip(concepts, guides)]
        erase_rows = torch.cat([as_algebra(c, device) for c, _ in pairs])
        target_rows = torch.cat([as_algebra(t, device) for _, t in pairs])
        steps = [uce_step(erase_rows, target_rows, _stack_rows(preserves, device), **scales)]
    else:
        kept = null_space_of(concepts, preserves, speed)
        steps = [_speed_step(kept, *speed_rows(concepts, guides))]
    # The edit so far as T = I + up @ down: the adversarial system then costs
    # O(d^2 r) to form instead of O(d^3).
    up, down = steps[0].up, steps[0].down
    if callback:
        callback(1, total)

    # Epochs: all 77 rows of each guide are the targets of every epoch.
    guide_rows = torch.cat([as_algebra(epoch_targets(c, t), device) for c, t in zip(concepts, guides)])
    epoch_keep = _stack_rows(epoch_preserves, device)
    # All concepts share one adversarial system, so their rows are solved
    # together; a zero anchor row is exactly the paper's "toward zero".
    concept_rows = torch.cat([as_algebra(c.rows, device) for c in concepts])
    anchor_rows = None
    if anchors is not None and any(a is not None for a in anchors):
        anchor_rows = torch.cat([
            torch.zeros_like(as_algebra(c.rows, device)) if a is None else as_algebra(a.rows, device)
            for c, a in zip(concepts, anchors)
        ])
    row_counts = [c.rows.shape[0] for c in concepts]
    adversarial: list[tuple[torch.Tensor, ...]] = []
    for epoch in range(settings.epochs):
        # Every concept's c' is derived before this epoch's edit.
        found = adversarial_from_grams(concept_rows, *edited_grams(g, up, down), settings.reg_scale, anchor_rows)
        adversarial.append(tuple(found.split(row_counts)))
        if kept is None:
            step = uce_step(found, guide_rows, epoch_keep, **scales)
        else:
            step = _speed_step(kept, found.split(row_counts), guide_rows.split(row_counts))
        steps.append(step)
        # T (I + u v) = I + [up, T u] [down; v]
        up, down = no_wider_than_d(torch.cat([up, step.up + up @ (down @ step.up)], dim=1),
                                   torch.cat([down, step.down]))
        if callback:
            callback(epoch + 2, total)

    return Erasure(
        steps=tuple(steps),
        adversarial=tuple(adversarial),
        settings=settings,
        concepts=tuple(c.text for c in concepts),
        guides=tuple(t.text for t in guides),
        preserves=tuple(p.text for p in preserves),
        null_space=kept,
    )


def _speed_step(kept: NullSpace, targets: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]):
    return speed_step(targets, anchors, kept.projector, kept.invariants,
                      retain_scale=kept.settings.retain_scale, lamb=kept.settings.lamb)

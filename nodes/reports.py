"""The short text reports the nodes output, in words a user reads."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..rece_ops import EncodedText, Erasure, NullSpace, RECESettings, metrics, uce_erase_rows
from ..rece_ops.texts import epoch_targets


def _quoted(texts: Sequence[str], limit: int = 60) -> str:
    def one(text: str) -> str:
        if not text.strip():
            return "the empty prompt"
        return repr(text) if len(text) <= limit else repr(text[:limit].rstrip() + "...")
    return ", ".join(one(t) for t in texts)


def chunks_note(texts: Sequence[EncodedText]) -> list[str]:
    """A report line naming the texts longer than one 77-token chunk, if any."""
    long = [t for t in texts if t.n_chunks > 1]
    if not long:
        return []
    described = ", ".join(f"{_quoted([t.text], 30)} ({t.n_chunks} chunks)" for t in long)
    return [f"long texts: {described}; every chunk's rows take part (each chunk aligned as a prompt of its own)"]


def _rank_words(erasure: Erasure) -> str:
    """The edit's rank; with more factor columns than d (many concepts) its
    bound, since the exact rank would cost a d x d SVD (seconds for SDXL)."""
    if erasure.thin:
        return f"rank {erasure.rank()} of {erasure.width}"
    return f"rank at most {erasure.rank_bound} of {erasure.width}"


def erase_report(
    method: str,
    erasure: Erasure,
    gram_matrix: torch.Tensor,
    concepts: Sequence[EncodedText],
    guides: Sequence[EncodedText],
    preserves: Sequence[EncodedText],
    *,
    preset_name: str,
    strength: float,
    n_matrices: int,
    seconds: Mapping[str, float],
) -> str:
    settings: RECESettings = erasure.settings
    steps = len(erasure.steps)
    # The figures describe the model as patched, at its strength.
    erasure = erasure if strength == 1 else erasure.scaled(strength)
    pairs = [uce_erase_rows(c, g) for c, g in zip(concepts, guides)]
    erase_rows = torch.cat([c for c, _ in pairs])
    target_rows = torch.cat([t for _, t in pairs])
    remaining = metrics.remaining_distance(gram_matrix, erasure, erase_rows, target_rows)
    drift = metrics.preserve_drift(gram_matrix, erasure, torch.cat([p.rows for p in preserves]))
    recovery = max(metrics.adversarial_recoveries(
        gram_matrix, erasure, [c.rows for c in concepts], [epoch_targets(c, g) for c, g in zip(concepts, guides)],
        settings.reg_scale))
    gram_time = "reused" if seconds.get("gram_cached") else f"{seconds['gram']:.2f} s"
    source = "published preset " + preset_name if preset_name != "custom" else "custom numbers"
    kept = erasure.null_space
    step_name = "UCE" if kept is None else "SPEED"
    epochs = " only" if steps == 1 else f" + {steps - 1} RECE epoch" + ("s" if steps > 2 else "")
    if kept is None:
        settings_line = (f"settings ({source}): lamb {settings.lamb}, erase_scale {settings.erase_scale}, "
                         f"preserve_scale {settings.preserve_scale}, reg_scale {settings.reg_scale}, "
                         f"epochs {settings.epochs}; strength {strength}")
    else:
        speed = kept.settings
        settings_line = (f"preserve mode: SPEED null space (Li et al., ICLR 2026), retained rows: {speed.retained}, "
                         f"threshold {speed.threshold}, "
                         f"retain_scale {speed.retain_scale}; from the {source}: reg_scale {settings.reg_scale}, "
                         f"epochs {settings.epochs} (lamb, erase_scale, preserve_scale unused); strength {strength}")
    lines = [
        f"{method if kept is None else 'SPEED' if method == 'UCE' else 'SPEED + RECE'} erased "
        f"{_quoted([c.text for c in concepts])} -> {_quoted([guides[0].text])}; "
        f"preserved {_quoted([p.text for p in preserves])}",
        settings_line,
        f"edit: {step_name} step{epochs} on {n_matrices} K/V matrices, {_rank_words(erasure)}; "
        f"weights changed {100 * metrics.weight_change(gram_matrix, erasure):.2f}%",
        f"erased rows: distance left to the guide's outputs {remaining:.4f} (0 = mapped onto the guide, 1 = untouched); "
        f"preserved rows moved {100 * drift:.3f}%",
        *([] if kept is None else null_space_lines(gram_matrix, erasure, kept)),
        f"red team: the best adversarial embedding (reg_scale {settings.reg_scale}) still recovers "
        f"{100 * recovery:.1f}% of the concept's original outputs (0% = no closer than the guide)",
        f"time: text encoding {seconds['text']:.2f} s, reading the K/V weights {seconds['weights']:.2f} s, "
        f"G {gram_time}, "
        f"algebra {seconds['algebra']:.3f} s, patches {seconds['patches']:.3f} s",
        *chunks_note([*concepts, *guides[:1], *preserves]),
    ]
    return "\n".join(lines)


def null_space_lines(gram_matrix: torch.Tensor, erasure: Erasure, kept: NullSpace) -> list[str]:
    """What SPEED kept, and how far it moved (output changes through G)."""
    words = [t for t in kept.retained_texts if t.strip()]
    if kept.settings.retained == "every token":
        retained = "the empty prompt's rows" + (f" and every token of {_quoted(words)}" if words else "")
    else:
        retained = f"the last word of {_quoted(words)}" if words else "the empty prompt's rows"
    lines = [
        f"null space: the edit may use {kept.free_dimensions} of {erasure.width} directions, those where "
        f"{retained} ({kept.retained_rows.shape[0]} rows) vary less than the threshold; outputs moved: "
        f"retained rows {100 * metrics.preserve_drift(gram_matrix, erasure, kept.retained_rows):.3g}%, "
        f"the retained span outside the null space {100 * _span_drift(gram_matrix, erasure, kept):.2g}%, "
        f"start token and empty-prompt centres {100 * metrics.preserve_drift(gram_matrix, erasure, kept.invariants):.2g}% "
        "(both 0 up to float rounding)",
    ]
    if kept.free_dimensions == 0:
        lines.append("warning: the preserved concepts use every direction, so nothing was erased: raise the threshold "
                     "or preserve fewer concepts")
    if kept.dropped:
        lines.append(f"not retained (they name an erased concept): {_quoted(list(kept.dropped))}")
    return lines


def _span_drift(gram_matrix: torch.Tensor, erasure: Erasure, kept: NullSpace) -> float:
    basis = kept.kept_basis()
    return metrics.preserve_drift(gram_matrix, erasure, basis) if basis.shape[0] else 0.0


def adversarial_report(
    concept: str,
    reg_scale: float,
    reach_adversarial: float,
    reach_plain: float,
    original_source: str,
    chunks: int = 1,
) -> str:
    name = _quoted([concept])
    length = f" ({chunks} chunks of 77 tokens, all solved for)" if chunks > 1 else ""
    return "\n".join([
        f"adversarial embedding of {name}{length} (reg_scale {reg_scale}) against {original_source}",
        f"the erased model's outputs for it miss the original outputs of {name} by "
        f"{100 * reach_adversarial:.1f}% (the plain prompt misses by {100 * reach_plain:.1f}%; 0% = fully restored)",
    ])

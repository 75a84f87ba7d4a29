"""Derive Adversarial Embedding: the prompt embedding that best brings an
erased concept back, as CONDITIONING for a KSampler (red-teaming)."""
from __future__ import annotations

import torch

from ..rece_ops import metrics
from ..rece_ops.closed_form import adversarial_from_grams, cross_gram

from . import model_weights, reports, text_encoding
from .erase_concept import CATEGORY, GRAM_CACHE
from .erasure_state import original_model
from .progress import StepProgress


def derive_adversarial(model, clip, concept: str, reg_scale: float, original=None) -> tuple[list, str]:
    """``(CONDITIONING, report)`` for ``concept`` against the erased ``model``."""
    if not concept.strip():
        raise ValueError("no concept given: type the erased concept whose adversarial embedding to derive")
    if not reg_scale > 0:
        raise ValueError(f"reg_scale must be > 0, got {reg_scale}")
    source = "the original_model input"
    if original is None:
        original = original_model(model)
        source = "the model before its erasure"
        if original is None:
            raise ValueError(
                "this MODEL was not erased by a RECE/UCE node in this graph (e.g. it was loaded from a saved "
                "checkpoint), so its original weights are unknown: connect the model before erasure to 'original_model'"
            )
    keys = model_weights.kv_keys(model)
    if keys != model_weights.kv_keys(original):
        raise ValueError("original_model has different cross-attention layers than the erased MODEL: connect the "
                         "checkpoint the erased model came from")
    # Phases: text, K/V weights, the three Gram matrices, the solve and report.
    progress = StepProgress(6)
    encoded, pooled = text_encoding.encode_with_pooled(clip, concept)
    progress.step()
    edited = model_weights.effective_kv_weights(model)
    before = model_weights.effective_kv_weights(original)
    progress.step()
    model_weights.check_text_width(encoded.width, edited)
    for key in keys:
        if edited[key].shape != before[key].shape:
            raise ValueError(f"{key} is {tuple(edited[key].shape)} in the MODEL but {tuple(before[key].shape)} in "
                             "original_model: connect the checkpoint the erased model came from")
    if all(torch.equal(edited[k], before[k]) for k in keys):
        raise ValueError("the MODEL's cross-attention weights equal the original's: nothing was erased; connect an "
                         "erased MODEL (the output of RECE/UCE Erase Concept, or a saved erased checkpoint)")
    gram_edited = GRAM_CACHE.get(edited, progress.phase())
    gram_original = GRAM_CACHE.get(before, progress.phase())
    gram_cross = cross_gram(edited, before, callback=progress.phase())
    found = adversarial_from_grams(encoded.rows, gram_edited, gram_cross, reg_scale)
    report = reports.adversarial_report(
        concept, reg_scale,
        reach_adversarial=metrics.output_miss(gram_edited, gram_cross, gram_original, found, encoded.rows),
        reach_plain=metrics.output_miss(gram_edited, gram_cross, gram_original, encoded.rows, encoded.rows),
        original_source=source, chunks=encoded.n_chunks,
    )
    extras = {} if pooled is None else {"pooled_output": pooled}
    conditioning = [[found.to(dtype=torch.float32, device="cpu").unsqueeze(0), extras]]
    progress.step()
    return conditioning, report


class RECEDeriveAdversarialEmbedding:
    DESCRIPTION = (
        "Red-team an erased model: derive, in closed form (RECE, ECCV 2024), the prompt embedding that makes the "
        "erased model's cross-attention reproduce the erased concept as closely as possible, and output it as "
        "CONDITIONING for a KSampler. If the erased model still draws the concept from it, the erasure is not robust."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "report")
    OUTPUT_TOOLTIPS = ("The adversarial embedding: connect it to a KSampler's positive input with the erased model.",
                       "How close the adversarial embedding gets to the concept's original outputs.")
    FUNCTION = "derive"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The erased model to attack (from an erase node, or a saved erased checkpoint)."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint."}),
                "concept": ("STRING", {"multiline": True, "default": "nudity",
                                       "tooltip": "The erased concept whose original outputs the embedding should reproduce."}),
                "reg_scale": ("FLOAT", {"default": 0.1, "min": 0.0001, "max": 100.0, "step": 0.0001,
                                        "tooltip": "Regulariser toward a small embedding: smaller finds a stronger but less "
                                                   "natural attack. The authors use 0.1 (nudity, objects) and 0.001 (styles)."}),
            },
            "optional": {
                "original_model": ("MODEL", {"tooltip": "The model before erasure. Optional when the erased model comes from "
                                                        "an erase node in this graph; required for a saved erased checkpoint."}),
            },
        }

    def derive(self, model, clip, concept, reg_scale, original_model=None):
        with torch.inference_mode():
            return derive_adversarial(model, clip, concept, reg_scale, original_model)

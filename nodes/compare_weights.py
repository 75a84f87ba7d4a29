"""Compare Cross-Attention Weights: how far two MODELs' K/V weights differ."""
from __future__ import annotations

import torch

from ..rece_ops import metrics

from . import model_weights
from .erase_concept import CATEGORY


def compare_kv_weights(model_a, model_b) -> str:
    keys = model_weights.kv_keys(model_a)
    if keys != model_weights.kv_keys(model_b):
        raise ValueError("the two MODELs have different cross-attention layers: compare models of one family")
    a = model_weights.effective_kv_weights(model_a)
    b = model_weights.effective_kv_weights(model_b)
    for key in keys:
        if a[key].shape != b[key].shape:
            raise ValueError(f"{key} is {tuple(a[key].shape)} in model_a but {tuple(b[key].shape)} in model_b")
    per_matrix = metrics.relative_differences(a, b)
    worst = max(per_matrix, key=per_matrix.get)
    return (f"K/V weights of model_a vs model_b over {len(keys)} matrices: relative difference "
            f"{metrics.overall_difference(a, b):.3e} overall, largest {per_matrix[worst]:.3e} ({worst})")


class RECECompareKVWeights:
    DESCRIPTION = (
        "Compare the cross-attention key/value weights of two models as they would run (all patches and LoRAs "
        "applied): e.g. an erased model against the same erasure loaded from a file or a LoRA. 0 = identical."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The relative difference of the K/V weights, overall and for the most different matrix.",)
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model_a": ("MODEL", {"tooltip": "A model, e.g. the erased model."}),
            "model_b": ("MODEL", {"tooltip": "The model to compare with (the reference the difference is relative to)."}),
        }}

    def compare(self, model_a, model_b):
        with torch.inference_mode():
            return (compare_kv_weights(model_a, model_b),)

"""An erasure as a ComfyUI weight patch: ``W -> W + strength * W @ (T - I)``.

Every K/V matrix gets the same small ``d x d`` edit, so the patch stores that
one matrix (shared by all keys) instead of a full-size delta per matrix. ComfyUI
computes ``W @ (T - I)`` when it applies patches (when the model is loaded
for sampling, or read with ``calculate_weight``), on its device, from the
weight as it is at that point of the patch list: LoRAs and erasures upstream
included, anything added later applied after it.
"""
from __future__ import annotations

import torch

import comfy.model_management
from comfy.weight_adapter.base import WeightAdapterBase


class KVTransformPatch(WeightAdapterBase):
    """ComfyUI weight adapter holding ``T - I`` (float32, CPU)."""

    name = "rece_kv_transform"

    def __init__(self, edit: torch.Tensor):
        if edit.ndim != 2 or edit.shape[0] != edit.shape[1]:
            raise ValueError(f"the edit must be a square d x d matrix, got {tuple(edit.shape)}")
        self.loaded_keys = set()
        # A plain tensor even when made in inference mode, so the patch also
        # applies where autograd is on (a weight read outside inference mode).
        with torch.inference_mode(False):
            self.weights = [edit.detach().to(device="cpu", dtype=torch.float32).clone()]

    @property
    def edit(self) -> torch.Tensor:
        return self.weights[0]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0.0:
            return weight
        if weight.ndim != 2 or weight.shape[1] != self.edit.shape[0]:
            raise ValueError(f"{key}: a {tuple(weight.shape)} weight does not read the {self.edit.shape[0]}-wide "
                             "context this erasure was made for")
        with torch.no_grad():
            edit = comfy.model_management.cast_to_device(self.edit, weight.device, intermediate_dtype)
            change = weight.to(intermediate_dtype) @ edit
            weight += function((strength * change).type(weight.dtype))
        return weight


def transformed_clone(model, keys, edit: torch.Tensor, strength: float = 1.0):
    """A clone of ``model`` whose matrices ``keys`` become ``W @ (I + strength * edit)``."""
    clone = model.clone()
    patch = KVTransformPatch(edit)
    missing = set(keys) - set(clone.add_patches({key: patch for key in keys}, strength))
    if missing:
        raise ValueError(f"the model has no weights named {sorted(missing)[:3]}")
    return clone

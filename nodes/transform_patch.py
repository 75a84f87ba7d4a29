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

from ..rece_ops import Erasure
from .model_weights import check_strength


class KVTransformPatch(WeightAdapterBase):
    """ComfyUI weight adapter holding ``T - I = up @ down`` (float32, CPU).

    ``down`` None means ``up`` is the dense ``d x d`` edit. Factors of rank
    ``r`` make applying the patch ``O(d_out d r)`` instead of ``O(d_out d^2)``.
    """

    name = "rece_kv_transform"

    def __init__(self, up: torch.Tensor, down: torch.Tensor | None = None):
        width = up.shape[0]
        if up.ndim != 2 or (down is None and up.shape[1] != width) or (
                down is not None and (down.ndim != 2 or down.shape != (up.shape[1], width))):
            raise ValueError(f"the edit must be d x d or factors [d, r] @ [r, d], got {tuple(up.shape)} and "
                             f"{None if down is None else tuple(down.shape)}")
        self.loaded_keys = set()
        # Plain tensors even when made in inference mode, so the patch also
        # applies where autograd is on (a weight read outside inference mode).
        with torch.inference_mode(False):
            self.weights = [t.detach().to(device="cpu", dtype=torch.float32).clone()
                            for t in (up, down) if t is not None]

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0.0:
            return weight
        if weight.ndim != 2 or weight.shape[1] != self.width:
            raise ValueError(f"{key}: a {tuple(weight.shape)} weight does not read the {self.width}-wide "
                             "context this erasure was made for")
        with torch.no_grad():
            change = weight.to(intermediate_dtype)
            for factor in self.weights:
                change = change @ comfy.model_management.cast_to_device(factor, weight.device, intermediate_dtype)
            weight += function((strength * change).type(weight.dtype))
        return weight


def _patch_for(erasure: Erasure) -> KVTransformPatch:
    """Orthogonal factors (from the SVD, exact at the numerical rank) when they
    are thin (one concept: rank 306 of 768 or 2048); float32 keeps them accurate.
    Otherwise one dense d x d edit; edits with more factor columns than d (many
    concepts) skip the SVD, which would cost seconds for SDXL."""
    if erasure.thin:
        up, down = erasure.low_rank()
        if 2 * up.shape[1] < up.shape[0]:
            return KVTransformPatch(up, down)
    return KVTransformPatch(erasure.edit)


def transformed_clone(model, keys, erasure: Erasure, strength: float = 1.0):
    """A clone of ``model`` whose matrices ``keys`` become ``W @ (I + strength * (T - I))``."""
    check_strength(strength)
    patch = _patch_for(erasure)
    clone = model.clone()
    missing = set(keys) - set(clone.add_patches({key: patch for key in keys}, strength))
    if missing:
        raise ValueError(f"the model has no weights named {sorted(missing)[:3]}")
    return clone

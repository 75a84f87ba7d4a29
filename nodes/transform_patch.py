"""An erasure as a ComfyUI weight patch: ``W -> W + strength * W @ (T - I)``.

Every K/V matrix gets the same small ``d x d`` edit, so the patch stores that
one matrix (shared by all keys) instead of a full-size delta per matrix. ComfyUI
computes ``W @ (T - I)`` when it applies patches (when the model is loaded
for sampling, or read with ``calculate_weight``), on its device, from the
weight as it is at that point of the patch list: LoRAs and erasures upstream
included, anything added later applied after it.

ComfyUI reaches the patch through ``comfy.lora.calculate_weight`` on every
path: a full load (``patch_weight_to_device``, float32 or the device's LoRA
compute dtype), lowvram (``LowVramPatch``, in the weight's own dtype, e.g.
fp16) and dynamic VRAM (0.33's ``ModelPatcherDynamic``: ``LowVramPatch`` on a
copy of the patch that ``comfy.lora.prefetch_prepared_value`` rebuilds as
``type(patch)(patch.loaded_keys, weights moved to the GPU)``). So the
constructor has the other adapters' signature, and the edit is computed in at
least float32 whatever ``intermediate_dtype`` says.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

import comfy.model_management
from comfy.weight_adapter.base import WeightAdapterBase

from ..rece_ops import Erasure
from .model_weights import check_strength

BYPASS_REFUSAL = (
    "an erasure is a weight patch (ModelPatcher.add_patches) and has no bypass mode: ComfyUI's bypass mode would "
    "cast and move this patch's shared edit for every layer, and an unimplemented bypass would silently run the "
    "model unerased; apply the erasure as the erase nodes do")


class KVTransformPatch(WeightAdapterBase):
    """ComfyUI weight adapter holding ``T - I = up @ down`` (``weights``).

    ``weights`` is ``[edit]`` (the dense ``d x d`` edit) or ``[up, down]``
    (factors of rank ``r``, making the patch ``O(d_out d r)`` instead of
    ``O(d_out d^2)``). Make one with ``from_edit``, which keeps float32 copies
    on the CPU; the constructor takes the tensors as they are, because ComfyUI
    rebuilds an adapter with them moved into its staging buffers.
    """

    name = "rece_kv_transform"

    def __init__(self, loaded_keys: set[str], weights: Sequence[torch.Tensor]):
        weights = list(weights)
        shapes = [tuple(t.shape) for t in weights]
        width = shapes[0][0] if shapes and len(shapes[0]) == 2 else None
        dense = len(shapes) == 1 and shapes[0] == (width, width)
        factors = len(shapes) == 2 and width is not None and shapes[1] == (shapes[0][1], width)
        if not (dense or factors):
            raise ValueError(f"the edit must be d x d or factors [d, r] @ [r, d], got shapes {shapes}")
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def from_edit(cls, up: torch.Tensor, down: torch.Tensor | None = None) -> KVTransformPatch:
        """The patch for ``T - I = up`` (``down`` None) or ``up @ down``, as float32 CPU copies."""
        # Plain tensors even when made in inference mode, so the patch also
        # applies where autograd is on (a weight read outside inference mode).
        with torch.inference_mode(False):
            weights = [t.detach().to(device="cpu", dtype=torch.float32).clone() for t in (up, down) if t is not None]
        return cls(set(), weights)

    @property
    def width(self) -> int:
        return self.weights[0].shape[0]

    def calculate_shape(self, key: str) -> None:
        """None: the patch keeps the weight's shape (0.33's dynamic VRAM loads
        a weight whose patches change its shape in full instead)."""
        return None

    def calculate_weight(self, weight: torch.Tensor, key: str, strength: float, strength_model: float, offset,
                         function: Callable[[torch.Tensor], torch.Tensor],
                         intermediate_dtype: torch.dtype = torch.float32, original_weight=None) -> torch.Tensor:
        """``weight`` updated in place to ``W + strength * function(W @ (T - I))``, and returned
        (in place also because ComfyUI narrows ``weight`` for an offset patch and keeps the whole)."""
        if strength == 0.0:
            return weight
        if weight.ndim != 2 or weight.shape[1] != self.width:
            raise ValueError(f"{key}: a {tuple(weight.shape)} weight does not read the {self.width}-wide "
                             "context this erasure was made for")
        # lowvram and dynamic VRAM pass the weight's dtype (fp16, bf16) as
        # intermediate_dtype: W @ (T - I) there would lose digits of the edit
        # in the factors' rounding and the products' sums. Never below float32.
        compute = torch.float64 if intermediate_dtype == torch.float64 else torch.float32
        with torch.no_grad():
            base = weight.to(compute)
            change = base
            for factor in self.weights:
                change = change @ comfy.model_management.cast_to_device(factor, weight.device, compute)
            change = function(strength * change)
            if weight.dtype in (compute, torch.float64):
                weight += change.to(weight.dtype)
            else:
                # One rounding, of the patched weight: adding a delta rounded
                # to fp16 in fp16 would round twice.
                weight.copy_(base + change.to(compute))
        return weight

    # Bypass mode (0.33: comfy.weight_adapter.bypass, used for LoRA files by
    # LoraLoaderBypass and for training) is refused. BypassForwardHook sets
    # ``multiplier`` first, before it moves the adapter's tensors: refusing
    # there leaves this shared patch as it was.
    @property
    def multiplier(self) -> float:
        return 1.0

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        raise NotImplementedError(BYPASS_REFUSAL)

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(BYPASS_REFUSAL)

    def bypass_forward(self, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError(BYPASS_REFUSAL)


def _patch_for(erasure: Erasure) -> KVTransformPatch:
    """Orthogonal factors (from the SVD, exact at the numerical rank) when they
    are thin (one concept: rank 306 of 768 or 2048); float32 keeps them accurate.
    Otherwise one dense d x d edit; edits with more factor columns than d (many
    concepts) skip the SVD, which would cost seconds for SDXL."""
    if erasure.thin:
        up, down = erasure.low_rank()
        if 2 * up.shape[1] < up.shape[0]:
            return KVTransformPatch.from_edit(up, down)
    return KVTransformPatch.from_edit(erasure.edit)


def transformed_clone(model, keys, erasure: Erasure, strength: float = 1.0):
    """A clone of ``model`` whose matrices ``keys`` become ``W @ (I + strength * (T - I))``."""
    check_strength(strength)
    patch = _patch_for(erasure)
    clone = model.clone()
    missing = set(keys) - set(clone.add_patches({key: patch for key in keys}, strength))
    if missing:
        raise ValueError(f"the model has no weights named {sorted(missing)[:3]}")
    return clone

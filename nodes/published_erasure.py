"""Load Published Erasure: the UCE and RECE authors' released weights as patches.

The UCE authors release safetensors files holding only the edited
``attn2.to_k`` / ``attn2.to_v`` weights under diffusers names; the RECE
authors release whole diffusers UNet state dicts (``torch.save``, ``.pt``).
Both are read without running code (``rece_ops.tensor_files``), matched to
the MODEL's K/V weights by name, and applied as patches of the difference to
the MODEL's stored weights: nothing else in the file is used.
"""
from __future__ import annotations

import torch

import comfy.utils

from ..rece_ops import metrics
from ..rece_ops.erasure_file import METADATA_KEY
from ..rece_ops.tensor_files import read_tensors

from . import folders, model_weights
from .erase_concept import CATEGORY
from .erasure_state import remember_original
from .progress import check_cancel

# Names are matched after dropping one of these (diffusers pipelines save
# "unet.", ldm checkpoints "model.diffusion_model.").
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.", "model.")
# Every UCE/RECE edit is W -> W @ T with one T for all matrices; a file whose
# change from this model is far from that was made from another base model.
# (Half-precision storage of a real erasure leaves about 1% unexplained.)
OTHER_BASE_UNEXPLAINED = 0.1


def kv_weights_in_file(model, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """``({model K/V key: tensor}, number of other tensors ignored)``: the
    file's tensors by diffusers or ldm name, mapped onto the MODEL's keys."""
    keys = set(model_weights.kv_keys(model))
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    found: dict[str, torch.Tensor] = {}
    ignored = 0
    for name, tensor in tensors.items():
        bare = next((name[len(p):] for p in _PREFIXES if name.startswith(p)), name)
        key = model_weights.DIFFUSION_PREFIX + to_ldm.get(bare, bare)
        if key in keys:
            found[key] = tensor
        else:
            ignored += 1
    return found, ignored


def load_published(model, file_name: str, strength: float) -> tuple[object, str]:
    path = folders.full_path(folders.ERASURES, file_name)
    tensors, metadata = read_tensors(path)
    if METADATA_KEY in metadata:
        raise ValueError(f"{file_name} is an erasure file written by this pack: apply it with Load Erasure")
    found, ignored = kv_weights_in_file(model, tensors)
    keys = model_weights.kv_keys(model)
    if not found:
        raise ValueError(
            f"{file_name} holds no cross-attention key/value weights of this model ({model_weights.family_name(model)}): "
            f"none of its {len(tensors)} tensors is named like attn2.to_k / attn2.to_v of its layers (diffusers or "
            "ComfyUI names); use a UCE/RECE file made for this model family")
    stored = model_weights.stored_kv_weights(model)
    for key, weight in found.items():
        if tuple(weight.shape) != tuple(stored[key].shape):
            raise ValueError(f"{file_name}: {key} is {tuple(weight.shape)} in the file but {tuple(stored[key].shape)} "
                             "in this MODEL: the file was made for another model family")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{file_name}: {key} has NaN or infinite values; nothing was applied")
    check_cancel()
    published = {k: w.to(device=stored[k].device, dtype=torch.float32) for k, w in found.items()}
    deltas = {k: published[k] - stored[k] for k in found}
    patched = model_weights.patched_clone(model, deltas, strength)
    remember_original(patched, model)
    base = {k: stored[k] for k in found}
    change = metrics.overall_difference(published, base)
    unexplained = metrics.unexplained_change(base, published)
    lines = [f"applied {file_name} at strength {strength}: {len(found)} of {len(keys)} K/V matrices "
             f"(the file's other {ignored} tensors are not used)" if ignored else
             f"applied {file_name} at strength {strength}: {len(found)} of {len(keys)} K/V matrices",
             f"the file's K/V weights differ from this model's by {100 * change:.2f}%; {100 * unexplained:.1f}% of that "
             "change is not an edit of this model's own weights (about 0% for an erasure made from this model)"]
    if len(found) < len(keys):
        lines.append(f"warning: the file has no weights for {len(keys) - len(found)} K/V matrices; they are unchanged")
    if unexplained > OTHER_BASE_UNEXPLAINED:
        lines.append("warning: the file was probably made from another base model; applying it brings that model's "
                     "K/V weights along, not only its erasure. Load it on the model it was made from")
    return patched, "\n".join(lines)


class RECELoadPublishedErasure:
    DESCRIPTION = (
        "Apply an erasure published by the UCE or RECE authors: a safetensors file of edited attn2.to_k/to_v "
        "weights (UCE) or a whole diffusers UNet state dict (.pt, RECE). Only the cross-attention key/value weights "
        "are taken, as patches; pickled files are read only if they hold plain tensors."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the published K/V weights applied.",
                       "How many matrices were applied and how far they move this model's weights.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model the published erasure was made from (e.g. SD 1.4 for "
                                           "the RECE/UCE releases). It is not changed."}),
            "file": (folders.file_choices(folders.ERASURES), {
                "tooltip": "The published file, placed in models/rece_erasures/ (.safetensors, or .pt/.pth holding "
                           "plain tensors)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "1 = the published weights; between 0 and 1 blends toward this model's."}),
        }}

    @classmethod
    def IS_CHANGED(cls, file: str = "", **_) -> str:
        return folders.file_version(folders.ERASURES, file)

    def load(self, model, file, strength):
        with torch.inference_mode():
            return load_published(model, file, strength)

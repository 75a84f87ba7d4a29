"""Read a ComfyUI MODEL's cross-attention K/V weights and patch them.

Weights are read as the model will run them: the stored weight with every
patch already on the ModelPatcher (LoRAs, merges, earlier erasures) applied,
the way ComfyUI's merging nodes read them (``get_key_patches``). Edits go
back as patches on a clone, never into the weights themselves: a clone shares
its tensors with the original.
"""
from __future__ import annotations

from typing import Mapping

import torch

import comfy.lora
import comfy.model_management

DIFFUSION_PREFIX = "diffusion_model."
KV_SUFFIXES = (".attn2.to_k.weight", ".attn2.to_v.weight")


def kv_keys(model) -> list[str]:
    """Names of every cross-attention key/value projection in the denoiser."""
    if model is None or not hasattr(model, "model_state_dict"):
        raise ValueError("no MODEL connected: connect the MODEL output of a checkpoint loader")
    keys = [k for k in model.model_state_dict(DIFFUSION_PREFIX) if k.endswith(KV_SUFFIXES)]
    if not keys:
        raise ValueError(
            f"this MODEL ({family_name(model)}) has no cross-attention key/value projections that read the text "
            "(attn2.to_k / attn2.to_v): RECE edits UNet models with cross-attention; supported: SD1.x "
            "(SD 1.4, 1.5 and their fine-tunes). Flux, SD3 and other transformer models cannot be erased this way"
        )
    return sorted(keys)


def family_name(model) -> str:
    """ComfyUI's name for the model's family (its model config class, e.g. SD15)."""
    inner = getattr(model, "model", model)
    return type(getattr(inner, "model_config", inner)).__name__


def check_text_width(width: int, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a CLIP whose embeddings are not as wide as the K/V weights read."""
    expected = next(iter(weights.values())).shape[1]
    if width != expected:
        raise ValueError(
            f"the CLIP gives {width}-wide embeddings but this MODEL's cross-attention reads a {expected}-wide "
            "context: connect the CLIP of the same checkpoint as the MODEL"
        )


def effective_kv_weights(model, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``{key: W}`` float32 on ``device`` (default: ComfyUI's torch device),
    with all of the model's patches applied; the model is not modified."""
    return _kv_weights(model, device, with_patches=True)


def stored_kv_weights(model, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``{key: W}`` float32 on ``device``: the K/V weights as stored, without
    the model's patches (what a file of full weights replaces)."""
    return _kv_weights(model, device, with_patches=False)


def _kv_weights(model, device: torch.device | None, with_patches: bool) -> dict[str, torch.Tensor]:
    device = device or comfy.model_management.get_torch_device()
    patches = model.get_key_patches(DIFFUSION_PREFIX)
    weights: dict[str, torch.Tensor] = {}
    for key in kv_keys(model):
        (base, convert), *rest = patches[key]
        weight = convert(base.to(device=device, dtype=torch.float32, copy=True), inplace=True)
        if rest and with_patches:
            weight = comfy.lora.calculate_weight(rest, weight, key)
        if not torch.isfinite(weight).all():
            raise ValueError(f"the model's weight {key} has NaN or infinite values; nothing was changed")
        weights[key] = weight
    return weights


def patched_clone(model, deltas: Mapping[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` whose K/V weights get ``strength * delta`` added.

    Deltas are kept in float32 on the CPU, like ComfyUI's LoRA patches: it
    computes patched weights in float32 and casts the sum to the weight's
    dtype, so an fp16 model loses nothing of the edit before that cast.
    """
    clone = model.clone()
    patch = {key: (delta.to(device="cpu", dtype=torch.float32),) for key, delta in deltas.items()}
    missing = set(deltas) - set(clone.add_patches(patch, strength))
    if missing:
        raise ValueError(f"the model has no weights named {sorted(missing)[:3]}")
    return clone

"""Read a ComfyUI MODEL's cross-attention K/V weights and patch them.

Weights are read as the model will run them: the stored weight with every
patch already on the ModelPatcher (LoRAs, merges, earlier erasures) applied,
the way ComfyUI's merging nodes read them (``get_key_patches``). Edits go
back as patches on a clone, never into the weights themselves: a clone shares
its tensors with the original.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

import comfy.lora
import comfy.model_management

DIFFUSION_PREFIX = "diffusion_model."


# ComfyUI model config classes this pack is tested on; a family with
# cross-attention on a text context is refused until a test covers it.
SUPPORTED_FAMILIES = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL"}
SUPPORTED = ("SD1.x (1.4, 1.5 and their fine-tunes), SD2.x (2.0/2.1, 512 and 768-v) and SDXL (base and its "
             "fine-tunes: Pony, Illustrious ...)")


def context_width(model) -> int | None:
    """Width of the text context the denoiser's cross-attention reads (ComfyUI's ``context_dim``)."""
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None) or {}
    return config.get("context_dim")


def cross_attention_kv_keys(model) -> list[str]:
    """Every K/V projection that reads the text context, found from the
    model's structure: an attention module whose key and value take
    ``context_width`` inputs while its query does not (a self-attention
    reads one input for all three)."""
    width = context_width(model)
    denoiser = getattr(getattr(model, "model", None), "diffusion_model", None)
    if width is None or denoiser is None:
        return []
    keys = []
    for name, module in denoiser.named_modules():
        q, k, v = (getattr(module, attr, None) for attr in ("to_q", "to_k", "to_v"))
        if not all(isinstance(layer, torch.nn.Linear) for layer in (q, k, v)):
            continue
        if k.in_features == v.in_features == width != q.in_features:
            keys += [f"{DIFFUSION_PREFIX}{name}.to_k.weight", f"{DIFFUSION_PREFIX}{name}.to_v.weight"]
    return sorted(keys)


def kv_keys(model) -> list[str]:
    """Names of every cross-attention key/value projection of a supported model."""
    if model is None or not hasattr(model, "model_state_dict"):
        raise ValueError("no MODEL connected: connect the MODEL output of a checkpoint loader")
    family = family_name(model)
    keys = cross_attention_kv_keys(model)
    if family not in SUPPORTED_FAMILIES:
        if keys:
            raise ValueError(
                f"this MODEL ({family}) has cross-attention on a text context, but this pack is not tested on "
                f"{family} yet, so it refuses to erase it rather than risk a wrong edit; supported: {SUPPORTED}")
        raise ValueError(
            f"this MODEL ({family}) has no cross-attention key/value projections that read the text: RECE edits "
            f"UNet models with cross-attention; supported: {SUPPORTED}. Flux, SD3, AuraFlow and other joint-attention "
            "transformers (and video models) cannot be erased this way")
    if not keys:
        raise ValueError(f"found no cross-attention key/value projections in this {family} MODEL; is it damaged?")
    return keys


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


def effective_kv_weights(model, device: torch.device | None = None, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """``{key: W}`` float32 on ``device`` (default: ComfyUI's torch device),
    with all of the model's patches applied; the model is not modified.

    ``check_finite=False`` skips the NaN/infinity check (a pass over every
    weight) for callers that check something computed from all of them, such
    as ``G``, and call ``check_finite`` only when that fails.
    """
    return _kv_weights(model, device, with_patches=True, finite=check_finite)


def stored_kv_weights(model, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """``{key: W}`` float32 on ``device``: the K/V weights as stored, without
    the model's patches (what a file of full weights replaces)."""
    return _kv_weights(model, device, with_patches=False)


def check_finite(weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights with NaN or infinite values, naming the first such matrix."""
    for key, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise ValueError(f"the model's weight {key} has NaN or infinite values; nothing was changed")


def patched_weight(key: str, entries: list, device: torch.device, with_patches: bool = True) -> torch.Tensor:
    """One weight as ComfyUI applies it, in float32 on ``device``, from its
    ``get_key_patches`` entries ``[(stored, convert), *patches]``; a new
    tensor, made in whatever inference mode the caller is in."""
    (base, convert), *rest = entries
    # detach: ComfyUI's parameters may require grad, and nothing here is trained.
    weight = convert(base.detach().to(device=device, dtype=torch.float32, copy=True), inplace=True)
    if rest and with_patches:
        weight = comfy.lora.calculate_weight(rest, weight, key)
    return weight


def _kv_weights(model, device: torch.device | None, with_patches: bool, finite: bool = True) -> dict[str, torch.Tensor]:
    device = device or comfy.model_management.get_torch_device()
    patches = model.get_key_patches(DIFFUSION_PREFIX)
    weights: dict[str, torch.Tensor] = {}
    for key in kv_keys(model):
        weights[key] = patched_weight(key, patches[key], device, with_patches)
    if finite:
        check_finite(weights)
    return weights


def check_strength(strength: float) -> None:
    """Refuse a strength that would fill the weights with NaN (an API prompt
    can send NaN: ComfyUI's min/max check lets it through)."""
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}: use 1.0 for the full edit")


def patched_clone(model, deltas: Mapping[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``model`` whose K/V weights get ``strength * delta`` added.

    Deltas are kept in float32 on the CPU, like ComfyUI's LoRA patches: it
    computes patched weights in float32 and casts the sum to the weight's
    dtype, so an fp16 model loses nothing of the edit before that cast.
    """
    check_strength(strength)
    clone = model.clone()
    patch = {key: (delta.to(device="cpu", dtype=torch.float32),) for key, delta in deltas.items()}
    missing = set(deltas) - set(clone.add_patches(patch, strength))
    if missing:
        raise ValueError(f"the model has no weights named {sorted(missing)[:3]}")
    return clone

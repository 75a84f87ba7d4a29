"""The demo model's text encoder: the stock SD1 CLIP-L at a seeded random init, frozen.

It is never trained, so it is not shipped: the checkpoint builder regenerates
it bit for bit from ``CLIP_SEED`` (every tensor from its own seeded
generator), and ``CLIP_SHA256`` (a digest of its keys, shapes and fp16
bytes) proves it is the encoder the shipped UNet was trained against.
"""
from __future__ import annotations

import hashlib

import torch

from devkit import checkpoint_builder

VARIANT = "sd15-mini"
CLIP_SEED = 20241001
CLIP_SHA256 = "1a56ff106b768b22d596344083b86f7e093a4a5bb7969d3bc1222aebeed63dc1"


def clip_state_dict(seed: int = CLIP_SEED) -> dict[str, torch.Tensor]:
    """The frozen CLIP-L's tensors under the checkpoint's ``cond_stage_model.`` keys (fp16)."""
    layout = checkpoint_builder.checkpoint_layout(VARIANT)
    return {key: checkpoint_builder.init_tensor(key, shape, kind, seed, VARIANT)
            for key, (shape, kind) in layout.items() if key.startswith(checkpoint_builder.CLIP_PREFIX)}


def digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, shapes, dtypes and bytes."""
    sha = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].contiguous()
        sha.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def checked_clip_state_dict() -> dict[str, torch.Tensor]:
    """The frozen CLIP-L, refused unless it matches the stored checksum."""
    state_dict = clip_state_dict()
    found = digest(state_dict)
    if found != CLIP_SHA256:
        raise RuntimeError(
            f"the regenerated demo text encoder does not match its checksum ({found} != {CLIP_SHA256}): "
            "the checkpoint builder's random init changed; the shipped UNet was trained against the old one")
    return state_dict

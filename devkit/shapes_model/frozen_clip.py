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
# The digest at each token-embedding scale the encoder is known at. 1.0 is the
# shipped model's. A larger scale keeps each word's own row more distinct after
# 12 random layers; 10 and 50 were tried (README, the demo model's experiments).
CLIP_SHA256_BY_TOKEN_SCALE = {
    1.0: "1a56ff106b768b22d596344083b86f7e093a4a5bb7969d3bc1222aebeed63dc1",
    10.0: "fe810a1b18c54d66a26ab49907da1e120cecbeb20d3f2d0fa03e168eb68fb3a8",
    50.0: "af8eeb222d053111004873da6fc394765043af9b733a9b38275997f3832e1261",
}
CLIP_SHA256 = CLIP_SHA256_BY_TOKEN_SCALE[1.0]
TOKEN_EMBEDDING_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"


def clip_state_dict(seed: int = CLIP_SEED, token_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The frozen CLIP-L's tensors under the checkpoint's ``cond_stage_model.`` keys (fp16),
    its token embedding multiplied by ``token_scale``."""
    layout = checkpoint_builder.checkpoint_layout(VARIANT)
    state_dict = {key: checkpoint_builder.init_tensor(key, shape, kind, seed, VARIANT)
                  for key, (shape, kind) in layout.items() if key.startswith(checkpoint_builder.CLIP_PREFIX)}
    if token_scale != 1.0:
        state_dict[TOKEN_EMBEDDING_KEY] = (state_dict[TOKEN_EMBEDDING_KEY].float() * token_scale).half()
    return state_dict


def digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, shapes, dtypes and bytes."""
    sha = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].contiguous()
        sha.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


def checked_clip_state_dict(token_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The frozen CLIP-L, refused unless it matches the stored checksum."""
    if token_scale not in CLIP_SHA256_BY_TOKEN_SCALE:
        raise ValueError(f"no stored checksum for token scale {token_scale}; known: {sorted(CLIP_SHA256_BY_TOKEN_SCALE)}")
    expected = CLIP_SHA256_BY_TOKEN_SCALE[token_scale]
    state_dict = clip_state_dict(token_scale=token_scale)
    found = digest(state_dict)
    if found != expected:
        raise RuntimeError(
            f"the regenerated demo text encoder does not match its checksum ({found} != {expected}): "
            "the checkpoint builder's random init changed; the shipped UNet was trained against the old one")
    return state_dict

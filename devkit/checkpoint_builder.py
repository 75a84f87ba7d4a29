"""Random-weight SD1.5 single-file checkpoints with ComfyUI's real key names and shapes.

The key names and shapes come from ComfyUI's own classes, built on the meta
device (no memory, no weights): the UNet from
``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``, the CLIP-L text
encoder from ``comfy.sd1_clip.SDClipModel`` and the VAE from
``comfy.ldm.models.autoencoder.AutoencoderKL`` or ``comfy.taesd.taesd.TAESD``.
They are written under the prefixes of an original (LDM-format) SD1.5 file:
``model.diffusion_model.``, ``cond_stage_model.transformer.text_model.`` and
``first_stage_model.``. Nothing else is needed: ComfyUI ignores the scheduler
buffers (``alphas_cumprod`` ...) of real checkpoints and detects the model from
UNet shapes alone.

Variants:
  ``sd15-slim``  tests: the SD1.5 UNet with channel_mult [1, 1], one res block
                 per level, depth-1 transformers everywhere (7 cross-attention
                 layers, 44M parameters), full CLIP-L, TAESD-shaped VAE (about
                 324 MiB in fp16). ComfyUI still detects it as ``SD15``.
  ``sd15-full``  benchmarks: the exact SD1.5 UNet (16 cross-attention layers,
                 860M), CLIP-L and the SD KL VAE (about 2 GB in fp16).

CLIP-L is always complete: ComfyUI builds all 12 layers from a fixed config,
and layers missing from the file would stay uninitialised memory. Like real
SD1.5 files, the checkpoint has no ``text_projection`` (so ComfyUI's SD1
pooled output is meaningless) and no ``logit_scale``.

Weights: N(0, 0.02) for weight matrices, convolutions and embeddings, 1 for
norm weights, 0 for biases; TAESD's ``vae_scale``/``vae_shift`` get SD1's
0.18215/0, as ComfyUI's ``VAELoader`` gives a TAESD. Every tensor comes from
its own generator, seeded from ``seed`` (0 <= seed < 2**32) plus
``zlib.crc32`` of its key, so the values do not depend on key order or on
which other keys exist. Stored fp16; the same seed gives the same file bytes.

CLI: ``python -m devkit.checkpoint_builder OUT.safetensors --variant sd15-slim
--seed 0 [--overwrite]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Iterable

import torch

from devkit import host

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."
METADATA_KEY = "rece.checkpoint_builder"  # JSON: {"seed": ..., "variant": ...}
STORE_DTYPE = torch.float16
INIT_STD = 0.02

# Exactly what comfy.model_detection.detect_unet_config reads back from the
# file; comfy.supported_models.SD15 adds num_heads 8, num_head_channels -1.
_SD15_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
UNET_CONFIGS = {
    "sd15-slim": dict(_SD15_UNET_COMMON, num_res_blocks=[1, 1], channel_mult=[1, 1],
                      transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                      transformer_depth_middle=1),
    "sd15-full": dict(_SD15_UNET_COMMON, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                      transformer_depth_middle=1),
}
# ComfyUI's default SD1.x/SD2.x VAE (comfy/sd.py, VAE.__init__).
_SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}
VAE_KINDS = {"sd15-slim": "taesd", "sd15-full": "kl"}
VARIANTS = tuple(UNET_CONFIGS)

# Parameters of ComfyUI's classes that SD1.5 files do not carry.
_CLIP_SKIP = ("logit_scale", "transformer.text_projection.weight")
# Fixed values (nodes.VAELoader gives a TAESD for SD1 the same ones).
_CONSTANTS = {VAE_PREFIX + "vae_scale": 0.18215, VAE_PREFIX + "vae_shift": 0.0}


def _check_variant(variant: str) -> None:
    if variant not in UNET_CONFIGS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _meta_modules(variant: str) -> list[tuple[str, torch.nn.Module]]:
    """ComfyUI's UNet, CLIP-L and VAE for ``variant`` on the meta device, with their file prefixes."""
    host.prepare_comfy_imports()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model_config = comfy.supported_models.SD15(UNET_CONFIGS[variant])  # adds num_heads etc.
    unet_kwargs = {k: (list(v) if isinstance(v, list) else v) for k, v in model_config.unet_config.items()}
    with torch.device("meta"):
        unet = UNetModel(**unet_kwargs, device="meta", operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        if VAE_KINDS[variant] == "taesd":
            vae = comfy.taesd.taesd.TAESD(latent_channels=4)
        else:
            vae = AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
    return [(UNET_PREFIX, unet), (CLIP_PREFIX, clip), (VAE_PREFIX, vae)]


def _init_kind(module: torch.nn.Module, name: str) -> str:
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase)
    if isinstance(module, norms) and name == "weight":
        return "ones"
    if name == "bias" or name.endswith("_bias"):
        return "zeros"
    return "normal"


def checkpoint_layout(variant: str = "sd15-slim") -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of the ``variant`` checkpoint: its shape and init (normal, ones, zeros, const)."""
    _check_variant(variant)
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for prefix, root in _meta_modules(variant):
        for module_name, module in root.named_modules():
            tensors = list(module.named_parameters(recurse=False))
            tensors += [(n, b) for n, b in module.named_buffers(recurse=False)
                        if n not in module._non_persistent_buffers_set]
            for name, tensor in tensors:
                local = f"{module_name}.{name}" if module_name else name
                if prefix == CLIP_PREFIX and local in _CLIP_SKIP:
                    continue
                key = prefix + local
                kind = "const" if key in _CONSTANTS else _init_kind(module, name)
                layout[key] = (tuple(tensor.shape), kind)
    return layout


def unet_cross_attention_keys(variant: str = "sd15-slim") -> list[str]:
    """The ``attn2.to_k`` / ``attn2.to_v`` weight keys (file names) of the variant's UNet."""
    return [k for k in checkpoint_layout(variant)
            if k.startswith(UNET_PREFIX) and k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight"))]


def key_seed(seed: int, key: str) -> int:
    """The generator seed of one key: (seed + crc32(key)) mod 2**32.

    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so
    the two are added rather than packed side by side. Within one file the
    keys' crc32 values are all distinct (the tests check), so no two tensors
    share a stream; one key gets a different stream for every seed.
    """
    return (seed + zlib.crc32(key.encode("utf-8"))) & 0xFFFFFFFF


def init_tensor(key: str, shape: Iterable[int], kind: str, seed: int) -> torch.Tensor:
    """The stored (fp16) value of one key; depends only on key, shape, kind and seed."""
    shape = tuple(shape)
    if kind == "ones":
        value = torch.ones(shape)
    elif kind == "zeros":
        value = torch.zeros(shape)
    elif kind == "const":
        value = torch.full(shape, _CONSTANTS[key])
    elif kind == "normal":
        generator = torch.Generator().manual_seed(key_seed(seed, key))
        value = torch.randn(shape, generator=generator).mul_(INIT_STD)
    else:
        raise ValueError(f"unknown init kind {kind!r}")
    return value.to(STORE_DTYPE).contiguous()


def build_state_dict(variant: str = "sd15-slim", seed: int = 0) -> dict[str, torch.Tensor]:
    """The full checkpoint state dict (fp16 tensors) for ``variant`` and ``seed``."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return {key: init_tensor(key, shape, kind, seed) for key, (shape, kind) in checkpoint_layout(variant).items()}


def build_checkpoint(target: Path, variant: str = "sd15-slim", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-weight SD1.5 checkpoint of ``variant`` to ``target`` (.safetensors).

    Deterministic in ``seed``. Written to a temporary file in the same folder
    and then moved into place, so ``target`` is never seen half-written. An
    existing ``target`` is an error (FileExistsError) unless ``overwrite``.
    Returns ``target``.
    """
    from safetensors.torch import save_file

    target = Path(target)
    _check_variant(variant)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    state_dict = build_state_dict(variant, seed)
    # One metadata entry: safetensors writes several in a random order, and
    # the same seed should give the same bytes.
    metadata = {METADATA_KEY: json.dumps({"variant": variant, "seed": seed}, sort_keys=True)}
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(state_dict, str(tmp), metadata=metadata)
        del state_dict
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                os.link(tmp, target)  # atomic, and fails rather than clobber a file written meanwhile
            except FileExistsError:
                raise FileExistsError(f"{target} appeared while building; left it as it was") from None
            except OSError:  # no hard links on this file system
                if target.exists():
                    raise FileExistsError(f"{target} appeared while building; left it as it was") from None
                os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    parser.add_argument("--variant", choices=VARIANTS, default="sd15-slim")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        build_checkpoint(args.out, variant=args.variant, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({args.variant}, seed {args.seed}): {size / 2**20:.1f} MiB "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Random-weight SD1.5, SD2.x and SDXL single-file checkpoints with the real key names and shapes.

The key names and shapes come from ComfyUI's own classes, built on the meta
device (no memory, no weights): the UNet from
``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``, the text
encoders from ComfyUI's CLIP classes (CLIP-L, OpenCLIP ViT-H for SD2,
CLIP-L + OpenCLIP bigG for SDXL) and the VAE from
``comfy.ldm.models.autoencoder.AutoencoderKL`` or ``comfy.taesd.taesd.TAESD``.
They are written under the prefixes and in the formats of the original
(LDM/SGM) files: ``model.diffusion_model.``; SD1's
``cond_stage_model.transformer.text_model.`` (Hugging Face layout), SD2's
``cond_stage_model.model.`` and SDXL's ``conditioner.embedders.1.model.``
(OpenCLIP layout: ``transformer.resblocks.N.attn.in_proj_weight``,
``text_projection``), SDXL's ``conditioner.embedders.0.transformer.`` (CLIP-L);
``first_stage_model.``. Nothing else is needed: ComfyUI ignores the scheduler
buffers (``alphas_cumprod`` ...) of real checkpoints and detects the model from
UNet shapes alone.

Variants:
  ``sd15-slim``  tests: the SD1.5 UNet with channel_mult [1, 1], one res block
                 per level, depth-1 transformers everywhere (7 cross-attention
                 layers, 44M parameters), full CLIP-L, TAESD-shaped VAE (about
                 324 MiB in fp16). ComfyUI still detects it as ``SD15``.
  ``sd15-mini``  the UNet shape of the trained shapes demo model
                 (``devkit.shapes_model``): channel_mult [1], one res block,
                 no middle block, 3 cross-attention layers (18.7M), full
                 CLIP-L, TAESD-shaped VAE. Its CLIP-L is the demo model's
                 frozen text encoder.
  ``sd15-full``  benchmarks: the exact SD1.5 UNet (16 cross-attention layers,
                 860M), CLIP-L and the SD KL VAE (about 2 GB in fp16).
  ``sd2-slim``   tests: an SD2.x UNet (context 1024, linear projections,
                 64-channel heads) with SD2's 12 output blocks at 320 channels,
                 attention at the first level and the middle (6 layers),
                 full OpenCLIP ViT-H, TAESD-shaped VAE. ComfyUI detects ``SD20``,
                 epsilon prediction (SD 2.x base, 512).
  ``sd2-v-slim`` the same as a v-prediction model (SD 2.x 768-v): ComfyUI
                 tells them apart by the spread of one norm bias
                 (``output_blocks.11.1.transformer_blocks.0.norm1.bias``), so
                 that bias gets std 0.2 here and 0 in ``sd2-slim``.
  ``sdxl-slim``  tests: the SDXL UNet's detected structure (transformer depths
                 [0, 0, 2, 2, 10, 10] on the way down, 2816-wide ADM input,
                 context 2048) at 320 channels on every level, one
                 transformer per output level block and in the middle
                 (31 cross-attention layers), full CLIP-L and OpenCLIP bigG,
                 TAESD-shaped VAE. ComfyUI detects ``SDXL``.
  ``sdxl-full``  benchmarks: the exact SDXL base UNet (70 cross-attention
                 layers, 2.6B), both text encoders, the KL VAE (about 6.5 GB).

Text encoders are always complete: ComfyUI builds every layer from a fixed
config, and layers missing from the file would stay uninitialised memory.
Like real SD1.5 files, SD1's CLIP-L has no ``text_projection`` (so ComfyUI's
SD1 pooled output is meaningless); the OpenCLIP encoders have theirs (SDXL's
pooled output feeds its UNet). No ``logit_scale`` anywhere.

Weights: N(0, 0.02) for weight matrices, convolutions and embeddings, 1 for
norm weights, 0 for biases; TAESD's ``vae_scale``/``vae_shift`` get SD1's
0.18215/0 (SDXL: 0.13025/0), as ComfyUI's ``VAELoader`` gives a TAESD. Every tensor comes from
its own generator, seeded from ``seed`` (0 <= seed < 2**32) plus
``zlib.crc32`` of its key, so the values do not depend on key order or on
which other keys exist. Stored fp16; the same seed gives the same file bytes.

CLI: ``python -m devkit.checkpoint_builder OUT.safetensors --variant sd15-slim
--seed 0 [--overwrite]`` (any variant above).
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
# file; the family's model config class adds its head settings.
_UNET_COMMON = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
_SD15_UNET = dict(_UNET_COMMON, use_linear_in_transformer=False, context_dim=768)
_SD2_UNET = dict(_UNET_COMMON, use_linear_in_transformer=True, context_dim=1024)
_SDXL_UNET = dict(_UNET_COMMON, use_linear_in_transformer=True, context_dim=2048, adm_in_channels=2816,
                  num_classes="sequential")
UNET_CONFIGS = {
    "sd15-slim": dict(_SD15_UNET, num_res_blocks=[1, 1], channel_mult=[1, 1],
                      transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                      transformer_depth_middle=1),
    "sd15-full": dict(_SD15_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
                      transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                      transformer_depth_middle=1),
    # The trained shapes demo model (devkit.shapes_model): no downsampling, no
    # middle block, three cross-attention layers; still detected as SD15.
    "sd15-mini": dict(_SD15_UNET, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                      transformer_depth_output=[1, 1], transformer_depth_middle=-2),
    "sd2-slim": dict(_SD2_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1],
                     transformer_depth=[1, 1, 0, 0, 0, 0, 0, 0],
                     transformer_depth_output=[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                     transformer_depth_middle=1),
    "sdxl-slim": dict(_SDXL_UNET, num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
                      transformer_depth=[0, 0, 2, 2, 10, 10],
                      transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
                      transformer_depth_middle=1),
    "sdxl-full": dict(_SDXL_UNET, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                      transformer_depth=[0, 0, 2, 2, 10, 10],
                      transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
                      transformer_depth_middle=10),
}
# Output depths are listed from the last output block back (UNetModel pops them).
UNET_CONFIGS["sd2-v-slim"] = UNET_CONFIGS["sd2-slim"]
# Variant -> (ComfyUI model config class, VAE kind).
FAMILY = {"sd15-slim": "SD15", "sd15-full": "SD15", "sd15-mini": "SD15", "sd2-slim": "SD20", "sd2-v-slim": "SD20",
          "sdxl-slim": "SDXL", "sdxl-full": "SDXL"}
VAE_KINDS = {v: ("kl" if v.endswith("-full") else "taesd") for v in FAMILY}
VARIANTS = tuple(FAMILY)
# ComfyUI's default SD1.x/SD2.x VAE (comfy/sd.py, VAE.__init__); SDXL's has the same shapes.
_SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0}
# SD 2.x 768-v: ComfyUI's SD20.model_type reads v-prediction from this bias's spread.
V_PREDICTION_BIAS = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PREDICTION_BIAS_STD = 0.2

# Parameters of ComfyUI's CLIP classes that the original files do not carry.
_HF_CLIP_SKIP = ("logit_scale", "transformer.text_projection.weight")
_OPENCLIP_SKIP = ("logit_scale",)


def _constants(variant: str) -> dict[str, float]:
    """Fixed values (nodes.VAELoader gives a TAESD the same ones)."""
    scale = 0.13025 if FAMILY[variant] == "SDXL" else 0.18215
    return {VAE_PREFIX + "vae_scale": scale, VAE_PREFIX + "vae_shift": 0.0}


def _check_variant(variant: str) -> None:
    if variant not in UNET_CONFIGS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")


def _meta_modules(variant: str) -> list[tuple[str, str, torch.nn.Module]]:
    """ComfyUI's UNet, text encoders and VAE for ``variant`` on the meta
    device, as ``(file prefix, key layout, module)``; the layout is ``plain``,
    ``hf_clip`` (Hugging Face CLIP, as SD1/SDXL-L files store it) or
    ``openclip`` (as SD2/SDXL-G files store it)."""
    host.prepare_comfy_imports()
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.taesd.taesd
    import comfy.text_encoders.sd2_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    family = FAMILY[variant]
    kwargs = unet_kwargs(variant)
    with torch.device("meta"):
        modules = [(UNET_PREFIX, "plain", UNetModel(**kwargs, device="meta", operations=comfy.ops.disable_weight_init))]
        if family == "SD15":
            modules.append((CLIP_PREFIX, "hf_clip", comfy.sd1_clip.SDClipModel(device="meta")))
        elif family == "SD20":
            modules.append((CLIP_PREFIX + "model.", "openclip", comfy.text_encoders.sd2_clip.SD2ClipHModel(device="meta")))
        else:
            modules.append(("conditioner.embedders.0.", "hf_clip", comfy.sd1_clip.SDClipModel(device="meta")))
            modules.append(("conditioner.embedders.1.model.", "openclip", comfy.sdxl_clip.SDXLClipG(device="meta")))
        if VAE_KINDS[variant] == "taesd":
            vae = comfy.taesd.taesd.TAESD(latent_channels=4)
        else:
            vae = AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
        modules.append((VAE_PREFIX, "plain", vae))
    return modules


def unet_kwargs(variant: str) -> dict:
    """The arguments of ComfyUI's ``UNetModel`` for ``variant``, as ComfyUI would
    build it after detecting the file (the family's config adds num_heads etc.)."""
    host.prepare_comfy_imports()
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, FAMILY[variant])(UNET_CONFIGS[variant])
    return {k: (list(v) if isinstance(v, list) else v) for k, v in model_config.unet_config.items()}


_OPENCLIP_RESBLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                      "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _openclip_layout(hf: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """A Hugging Face CLIP layout (``transformer.text_model.*``) renamed to the
    OpenCLIP layout of SD2/SDXL files: the inverse of ComfyUI's
    ``clip_text_transformers_convert`` (q/k/v stacked into ``in_proj``,
    ``text_projection`` stored transposed)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for key, (shape, kind) in hf.items():
        if key == "transformer.text_projection.weight":
            out["text_projection"] = ((shape[1], shape[0]), kind)
            continue
        local = key[len("transformer.text_model."):]
        if local in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[local]] = (shape, kind)
            continue
        _, _, layer, rest = local.split(".", 3)  # encoder.layers.N.<rest>
        block = f"transformer.resblocks.{layer}."
        part, name = rest.rsplit(".", 1)
        if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if part.endswith("q_proj"):  # one stacked tensor for q, k and v
                out[f"{block}attn.in_proj_{name}"] = ((3 * shape[0], *shape[1:]), kind)
            continue
        out[f"{block}{_OPENCLIP_RESBLOCK[part]}.{name}"] = (shape, kind)
    return out


def _init_kind(module: torch.nn.Module, name: str) -> str:
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase)
    if isinstance(module, norms) and name == "weight":
        return "ones"
    if name == "bias" or name.endswith("_bias"):
        return "zeros"
    return "normal"


def checkpoint_layout(variant: str = "sd15-slim") -> dict[str, tuple[tuple[int, ...], str]]:
    """Every key of the ``variant`` checkpoint: its shape and init (normal,
    ones, zeros, const, v_bias)."""
    _check_variant(variant)
    constants = _constants(variant)
    layout: dict[str, tuple[tuple[int, ...], str]] = {}
    for prefix, style, root in _meta_modules(variant):
        local_layout: dict[str, tuple[tuple[int, ...], str]] = {}
        for module_name, module in root.named_modules():
            tensors = list(module.named_parameters(recurse=False))
            tensors += [(n, b) for n, b in module.named_buffers(recurse=False)
                        if n not in module._non_persistent_buffers_set]
            for name, tensor in tensors:
                local = f"{module_name}.{name}" if module_name else name
                skip = _OPENCLIP_SKIP if style == "openclip" else _HF_CLIP_SKIP if style == "hf_clip" else ()
                if local not in skip:
                    local_layout[local] = (tuple(tensor.shape), _init_kind(module, name))
        if style == "openclip":
            local_layout = _openclip_layout(local_layout)
        for local, (shape, kind) in local_layout.items():
            key = prefix + local
            layout[key] = (shape, "const" if key in constants else kind)
    if variant == "sd2-v-slim":
        layout[V_PREDICTION_BIAS] = (layout[V_PREDICTION_BIAS][0], "v_bias")
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


def init_tensor(key: str, shape: Iterable[int], kind: str, seed: int, variant: str = "sd15-slim") -> torch.Tensor:
    """The stored (fp16) value of one key; depends only on key, shape, kind, seed (and for constants the variant)."""
    shape = tuple(shape)
    if kind == "ones":
        value = torch.ones(shape)
    elif kind == "zeros":
        value = torch.zeros(shape)
    elif kind == "const":
        value = torch.full(shape, _constants(variant)[key])
    elif kind in ("normal", "v_bias"):
        generator = torch.Generator().manual_seed(key_seed(seed, key))
        value = torch.randn(shape, generator=generator).mul_(INIT_STD if kind == "normal" else V_PREDICTION_BIAS_STD)
    else:
        raise ValueError(f"unknown init kind {kind!r}")
    return value.to(STORE_DTYPE).contiguous()


def build_state_dict(variant: str = "sd15-slim", seed: int = 0) -> dict[str, torch.Tensor]:
    """The full checkpoint state dict (fp16 tensors) for ``variant`` and ``seed``."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return {key: init_tensor(key, shape, kind, seed, variant) for key, (shape, kind) in checkpoint_layout(variant).items()}


def build_checkpoint(target: Path, variant: str = "sd15-slim", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random-weight checkpoint of ``variant`` to ``target`` (.safetensors).

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

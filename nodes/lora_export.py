"""Export Erasure as LoRA: an erased MODEL's edit as a standard LoRA file."""
from __future__ import annotations

import json

import torch

import comfy.utils

from .. import rece_ops
from ..rece_ops.erasure_file import METADATA_KEY
from ..rece_ops.lora_export import lora_factors, lora_state_dict
from ..rece_ops.tensor_files import write_new_safetensors

from . import folders, model_weights
from .erase_concept import CATEGORY
from .erasure_files import other_changes_note, recorded_erasure, summary
from .erasure_state import original_model
from .progress import check_cancel

PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def lora_names(model, keys) -> dict[str, str]:
    """Each K/V weight's kohya LoRA name in diffusers layout
    (``lora_unet_down_blocks_0_attentions_0_..._attn2_to_k``), the naming
    ComfyUI, A1111/Forge and kohya's scripts all read; ComfyUI's own layout
    where no diffusers name exists."""
    to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    to_diffusers = {model_weights.DIFFUSION_PREFIX + ldm: name for name, ldm in to_ldm.items()}
    names = {}
    for key in keys:
        source = to_diffusers.get(key) or key[len(model_weights.DIFFUSION_PREFIX):]
        names[key] = "lora_unet_" + source[:-len(".weight")].replace(".", "_")
    return names


def export_lora(model, filename_prefix: str, rank: int, precision: str) -> tuple[dict, str]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if rank < 0:
        raise ValueError(f"rank must be 0 (exact) or a positive cap, got {rank}")
    records, erasure = recorded_erasure(model)
    # The erasure's patches are W @ (T - I) of the weights it started from.
    before = model_weights.effective_kv_weights(original_model(model))
    check_cancel()
    factors = lora_factors(before, erasure, rank or None, PRECISIONS[precision])
    lora = lora_state_dict(factors, lora_names(model, before))
    entries = [e for r in records for e in r.described()]
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(factors.rank),
        "ss_network_alpha": str(factors.rank), "ss_base_model_version": model_weights.family_name(model),
        METADATA_KEY + "_source": json.dumps({"erasures": entries, "pack_version": rece_ops.__version__}),
    }
    path = folders.save_new(folders.LORAS, filename_prefix, lambda p: write_new_safetensors(p, lora, metadata))
    exact = erasure.rank()
    fidelity = (f"full rank {factors.rank} (= the edit's numerical rank: exact but for {precision} rounding), "
                f"relative error of the K/V change {factors.relative_error:.2e}" if factors.rank == exact else
                f"rank {factors.rank} of the edit's {exact}: relative error of the K/V change "
                f"{factors.relative_error:.4f} overall, worst matrix {factors.worst_relative_error:.4f}")
    report = (f"saved LoRA {folders.display_name(folders.LORAS, path)} ({path.stat().st_size / 2**20:.1f} MiB, "
              f"{precision}) for {len(factors.layers)} K/V matrices: {fidelity}\n{summary(entries)}\n"
              f"load it with LoraLoader (strength_model 1, strength_clip 0) on the model the erasure was made on"
              + other_changes_note(model, erasure, before))
    return lora, report


class RECEExportErasureLoRA:
    DESCRIPTION = (
        "Write the erasures of a MODEL as a standard LoRA file (kohya format, read by LoraLoader and other UIs). "
        "RECE's edit is exactly low rank, so at rank 0 (= the edit's own rank) the LoRA reproduces the erased "
        "model to float precision; a smaller rank gives a smaller file and reports the error it costs. "
        "Written to models/loras/; the lora output feeds Load LoRA Model directly."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_MODEL", "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The LoRA weights, for the stock Load LoRA Model node.",
                       "The file written, its rank and how exactly it reproduces the erasure.")
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An erased model: the output of an erase node or of Load Erasure."}),
            "filename_prefix": ("STRING", {"default": "rece/erased", "tooltip": (
                "File name start, under models/loras/ (subfolders allowed). A counter is added; existing files are "
                "never replaced.")}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": (
                "LoRA rank. 0 = the edit's exact rank (reproduces the erasure exactly); a smaller number caps it: "
                "smaller file, approximate erasure (the report gives the error).")}),
            "precision": (list(PRECISIONS), {"default": "float32", "tooltip": (
                "Number format of the file. float32 is exact; float16/bfloat16 halve the size and add about "
                "1e-3 / 1e-2 relative error to the change.")}),
        }}

    def export(self, model, filename_prefix, rank, precision):
        with torch.inference_mode():
            return export_lora(model, filename_prefix, rank, precision)

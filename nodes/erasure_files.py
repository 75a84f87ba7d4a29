"""Save Erasure and Load Erasure: an erased MODEL's edit as a small file."""
from __future__ import annotations

from pathlib import Path

import torch

from .. import rece_ops
from ..rece_ops import Erasure
from ..rece_ops.erasure_file import load_erasure_file, save_erasure_file
from ..rece_ops.fingerprint import fingerprint_difference, fingerprints_match

from . import folders, model_weights
from .erase_concept import CATEGORY
from .erasure_state import ErasureRecord, combined_erasure, erasure_records, original_model, remember_erasure
from .progress import check_cancel
from .transform_patch import transformed_clone

ERASURE_FILE_EXTENSIONS = (".safetensors", ".sft")


def recorded_erasure(model) -> tuple[tuple[ErasureRecord, ...], Erasure]:
    """The MODEL's erasures by this pack and their combined edit."""
    records = erasure_records(model)
    if not records:
        raise ValueError("this MODEL carries no erasure from this pack: connect the MODEL output of RECE Erase "
                         "Concept, UCE Erase Concept or Load Erasure")
    if model_weights.kv_keys(model) != list(records[0].kv_keys):
        raise ValueError("this MODEL's cross-attention layers are not the ones its erasures were made on")
    return records, combined_erasure(records)


def unrecorded_change(model, erasure: Erasure, before: dict[str, torch.Tensor]) -> float:
    """How much of the MODEL's K/V change since its original is not the
    recorded erasures (e.g. a LoRA added after them): relative to the change."""
    after = model_weights.effective_kv_weights(model)
    change = sum(float((after[k] - w).norm()) ** 2 for k, w in before.items())
    miss = sum(float((after[k] - w - erasure.delta(w)).norm()) ** 2 for k, w in before.items())
    return (miss / change) ** 0.5 if change > 0 else 0.0


def other_changes_note(model, erasure: Erasure, before: dict[str, torch.Tensor]) -> str:
    """A report line when the MODEL's K/V weights changed in ways its
    erasure records do not cover; empty otherwise."""
    extra = unrecorded_change(model, erasure, before)
    if extra <= 1e-4:
        return ""
    return (f"\nnote: {100 * extra:.2f}% of this MODEL's K/V change is not from its erasures (e.g. a LoRA or merge "
            "applied after them); the file holds the erasures only")


def summary(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        concepts = ", ".join(repr(c) for c in e.get("concepts", ())) or "?"
        guide = e.get("guide", "")
        target = f"{concepts} -> {repr(guide) if guide.strip() else 'the empty prompt'}"
        if e.get("preserve_mode") == "SPEED":  # files written before preserve_mode existed are the paper's
            lines.append(f"  {e.get('method', '?')} with SPEED's null space {target}: threshold {e.get('threshold')}, "
                         f"retain_scale {e.get('retain_scale')}, retained rows: {e.get('retained_rows')}, "
                         f"reg {e.get('reg_scale')}, epochs {e.get('epochs')}, strength {e.get('strength')}")
            continue
        lines.append(f"  {e.get('method', '?')} {target}: "
                     f"lamb {e.get('lamb')}, erase {e.get('erase_scale')}, preserve {e.get('preserve_scale')}, "
                     f"reg {e.get('reg_scale')}, epochs {e.get('epochs')}, strength {e.get('strength')}")
    return "\n".join(lines)


def save_erasure(model, filename_prefix: str) -> str:
    records, erasure = recorded_erasure(model)
    original = original_model(model)
    before = model_weights.effective_kv_weights(original)
    check_cancel()
    entries = [e for r in records for e in r.described()]
    path = folders.save_new(folders.ERASURES, filename_prefix, lambda p: save_erasure_file(
        p, erasure, erasures=entries, fingerprint=records[0].fingerprint,
        family=model_weights.family_name(model), matrices=len(records[0].kv_keys), pack_version=rece_ops.__version__))
    return (f"saved {folders.display_name(folders.ERASURES, path)} ({path.stat().st_size / 1024:.0f} KiB) in "
            f"{Path(path).parent}\nrank {erasure.rank()} edit of the {erasure.width}-wide context, "
            f"{len(entries)} erasure(s):\n{summary(entries)}\n"
            f"apply it with Load Erasure to any model with a {erasure.width}-wide text context"
            + other_changes_note(model, erasure, before))


def load_erasure(model, erasure_name: str, strength: float) -> tuple[object, str]:
    path = folders.full_path(folders.ERASURES, erasure_name)
    loaded = load_erasure_file(path)
    erasure, info = loaded.erasure, loaded.info
    keys = model_weights.kv_keys(model)
    weights = model_weights.effective_kv_weights(model)
    width = next(iter(weights.values())).shape[1]
    if erasure.width != width:
        raise ValueError(f"{erasure_name} is an erasure of a {erasure.width}-wide text context ({info['family']}), "
                         f"but this MODEL ({model_weights.family_name(model)}) reads a {width}-wide context: "
                         "use a file made for this model family")
    check_cancel()
    erased = transformed_clone(model, keys, erasure, strength)
    remember_erasure(erased, model, ErasureRecord(erasure, strength, tuple(keys), tuple(loaded.fingerprint),
                                                  tuple(info["erasures"])))
    here = rece_ops.kv_fingerprint(weights)
    if fingerprints_match(here, loaded.fingerprint):
        origin = "it was computed on these very weights: the result is the original erasure"
    else:
        difference = fingerprint_difference(here, loaded.fingerprint)
        how = ("a different number of K/V matrices" if difference == float("inf")
               else f"weights that differ by up to {100 * difference:.2f}%")
        origin = (f"it was computed on other weights ({info['family']}, {info['matrices']} K/V matrices; {how}): "
                  "the UCE step carries over exactly, the RECE epochs were derived against that model")
    family = "" if info["family"] == model_weights.family_name(model) else f" (file made on {info['family']})"
    return erased, (f"applied {erasure_name} at strength {strength} to {len(keys)} K/V matrices{family}: "
                    f"rank {erasure.rank()} of {erasure.width}, written by pack version {info['pack_version']}\n"
                    f"{summary(info['erasures'])}\n{origin}")


class RECESaveErasure:
    DESCRIPTION = (
        "Save the erasures of a MODEL (from RECE/UCE Erase Concept or Load Erasure) as a small .safetensors file, "
        "a few MB instead of a whole checkpoint: the shared key/value transform's low-rank factors plus what was "
        "erased, with which settings, on which weights. Written to models/rece_erasures/, where Load Erasure lists it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("report",)
    OUTPUT_TOOLTIPS = ("The file written and what it holds.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "An erased model: the output of an erase node or of Load Erasure."}),
            "filename_prefix": ("STRING", {"default": "rece_erasure", "tooltip": (
                "File name start, under models/rece_erasures/ (subfolders allowed, e.g. 'nudity/sd15'). A counter "
                "is added; existing files are never replaced.")}),
        }}

    def save(self, model, filename_prefix):
        with torch.inference_mode():
            return (save_erasure(model, filename_prefix),)


class RECELoadErasure:
    DESCRIPTION = (
        "Apply an erasure file (written by Save Erasure) to a MODEL as patches on its cross-attention key/value "
        "weights. It works on any model with the same text-context width; the report says whether the file was "
        "computed on this model's weights. The input MODEL is not changed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The model with the erasure applied.", "What the file erases, and whether it was made on these weights.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to erase from (it is not changed)."}),
            "erasure": (folders.file_choices(folders.ERASURES, ERASURE_FILE_EXTENSIONS), {
                "tooltip": "An erasure file from models/rece_erasures/ (written by Save Erasure)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "How much of the erasure to apply: 1 = as saved, 0 = none."}),
        }}

    @classmethod
    def IS_CHANGED(cls, erasure: str = "", **_) -> str:
        return folders.file_version(folders.ERASURES, erasure)

    def load(self, model, erasure, strength):
        with torch.inference_mode():
            return load_erasure(model, erasure, strength)

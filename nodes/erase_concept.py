"""RECE Erase Concept and UCE Erase Concept: MODEL + CLIP -> erased MODEL."""
from __future__ import annotations

import time

import torch

from .. import rece_ops
from ..rece_ops import PRESETS, RECESettings, SpeedSettings
from ..rece_ops.gram_cache import GramCache

from . import model_weights, reports, text_encoding
from .erasure_state import ErasureRecord, remember_erasure
from .progress import StepProgress
from .transform_patch import transformed_clone

CATEGORY = "RECE"
CUSTOM = "custom"
PRESET_CHOICES = [*PRESETS, CUSTOM]
PAPER, SPEED, SPEED_EVERY_TOKEN = "paper", "SPEED null space", "SPEED null space, every token kept"
PRESERVE_MODES = [PAPER, SPEED, SPEED_EVERY_TOKEN]
# Which rows of the preserve texts each SPEED mode keeps (rece_ops.null_space).
RETAINED = {SPEED: "last word", SPEED_EVERY_TOKEN: "every token"}

# G = sum W^T W of the weights an erasure starts from, shared by every node
# of the pack: it depends only on those weights, not on texts or scales.
GRAM_CACHE = GramCache()


# The page's preset dropdown fills the numbers (web/rece_presets.js).
PRESET_NOTE = " Set by the preset; editing it switches the preset to 'custom'."


def _float(default: float, tooltip: str, low: float = 0.0, high: float = 100.0, step: float = 0.001) -> tuple:
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


def erase_inputs(with_epochs: bool) -> dict:
    """The inputs of both erase nodes (UCE has no epochs)."""
    nudity = PRESETS["nudity"].settings
    required = {
        "model": ("MODEL", {"tooltip": "The model to erase from (SD1.x, SD2.x or SDXL). It is not changed: the erased model is a patched copy."}),
        "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint; it turns the concepts into the embeddings the edit works on."}),
        "concepts": ("STRING", {"multiline": True, "default": "nudity",
                                "tooltip": "What to erase: one concept per line (commas also separate). All are erased together."}),
        "guide": ("STRING", {"default": "",
                             "tooltip": "What the concepts should turn into. Empty = the empty prompt (the paper's default); "
                                        "the authors used 'art' for artistic styles."}),
        "preserve": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "Concepts to keep unchanged, one per line (e.g. other artists). "
                                           "The empty prompt is always preserved."}),
        "preset": (PRESET_CHOICES, {"default": "nudity",
                                    "tooltip": "The RECE authors' published settings by concept type. Choosing one fills the numbers "
                                               "below with its values; editing a number switches to 'custom', the only "
                                               "choice that runs with the numbers as set. A named preset always runs with "
                                               "its own numbers."}),
    }
    if with_epochs:
        required["epochs"] = ("INT", {"default": nudity.epochs, "min": 0, "max": 50,
                                      "tooltip": "RECE epochs after the UCE step: each derives the adversarial embedding that "
                                                 "still brings the concept back and erases it too. 0 = plain UCE." + PRESET_NOTE})
    # ComfyUI's page rounds a FLOAT widget to its step's decimals: lamb and
    # reg_scale get four, so a typed 0.0001 stays 0.0001.
    required.update({
        "lamb": _float(nudity.lamb, "How strongly the weights stay close to the current ones (must be > 0)." + PRESET_NOTE,
                       0.0001, step=0.0001),
        "erase_scale": _float(nudity.erase_scale, "Weight of mapping the concepts onto the guide." + PRESET_NOTE),
        "preserve_scale": _float(nudity.preserve_scale, "Weight of keeping the preserved concepts' outputs unchanged." + PRESET_NOTE),
        "reg_scale": _float(nudity.reg_scale, "Regulariser of the adversarial embedding: smaller finds stronger attacks, "
                                              "which the epochs then erase." + PRESET_NOTE, 0.0001, step=0.0001),
        "strength": _float(1.0, "How much of the edit to apply: 1 = the full erasure, 0 = none.", -10.0, 10.0, 0.01),
    })
    speed = SpeedSettings()
    # Optional, so that graphs saved before these inputs existed run as they did.
    optional = {
        "preserve_mode": (PRESERVE_MODES, {
            "default": PAPER,
            "tooltip": "How the edit keeps what should stay. 'paper': the UCE/RECE step, which only weighs the "
                       "preserved concepts (the authors' numbers reproduce exactly). 'SPEED null space' (Li et al., "
                       "ICLR 2026): the edit may only use directions the preserved concepts' last words do not use "
                       "(the empty prompt's rows when none is given), and the outputs of the start token and of 3 "
                       "centres of the empty prompt's rows stay exactly; lamb, erase_scale and preserve_scale are then unused. 'SPEED null "
                       "space, every token kept': the same, keeping every token of each preserved concept and the "
                       "whole empty prompt (this pack's variant; on the demo model it keeps the other captions best)."}),
        "threshold": _float(speed.threshold, "SPEED only: a direction is free for the edit when the preserved "
                                             "concepts' second moment along it is below this (the authors' 0.1). "
                                             "Lower keeps more and erases less.", 0.0, 1000.0, 0.0001),
        "retain_scale": _float(speed.retain_scale, "SPEED only: how strongly the weights stay as they were (the "
                                                   "authors' 1.0). Higher erases less.", 0.0001, 1000.0, 0.0001),
    }
    return {"required": required, "optional": optional}


def resolve_speed(preserve_mode: str, threshold: float, retain_scale: float) -> SpeedSettings | None:
    """SPEED's settings for the SPEED preserve mode, None for the paper's."""
    if preserve_mode == PAPER:
        return None
    if preserve_mode not in RETAINED:
        raise ValueError(f"unknown preserve_mode {preserve_mode!r}; choose one of {PRESERVE_MODES}")
    return SpeedSettings(threshold=threshold, retain_scale=retain_scale, retained=RETAINED[preserve_mode])


def resolve_settings(preset_name: str, with_epochs: bool, **numbers: float) -> RECESettings:
    """The settings a node runs with: the preset's, or the number inputs."""
    if preset_name == CUSTOM:
        settings = RECESettings(**numbers)
    else:
        settings = rece_ops.preset(preset_name).settings
    return settings if with_epochs else settings.with_changes(epochs=0)


def erase_concepts(
    model, clip, method: str, concepts: str, guide: str, preserve: str,
    preset_name: str, settings: RECESettings, strength: float, speed: SpeedSettings | None = None,
) -> tuple[object, str, dict[str, float]]:
    """Erase ``concepts`` from ``model``; return (patched clone, report, seconds per part).
    With ``speed``, every step is SPEED's null-space step instead of UCE's."""
    model_weights.check_strength(strength)
    names = rece_ops.split_concepts(concepts)
    if not names:
        raise ValueError("no concepts to erase: type at least one concept in 'concepts' (one per line)")
    kept = rece_ops.split_concepts(preserve)
    for name in names:
        if name.casefold() == guide.strip().casefold():
            raise ValueError(f"the guide {guide!r} is also a concept to erase: choose a guide the concept should become")
        if name.casefold() in (k.casefold() for k in kept):
            raise ValueError(f"{name!r} is both erased and preserved: remove it from one of the two lists")
    keys = model_weights.kv_keys(model)

    # Phases: text, K/V weights, G, the algebra, patches, report.
    progress = StepProgress(6)
    started = time.perf_counter()
    encoded = text_encoding.encode_texts(clip, names + [guide] + rece_ops.preserve_prompts(kept), progress.phase())
    concept_rows, guide_rows, preserve_rows = encoded[:len(names)], encoded[len(names)], encoded[len(names) + 1:]
    seconds = {"text": time.perf_counter() - started}

    started = time.perf_counter()
    weights = model_weights.effective_kv_weights(model, check_finite=False)
    model_weights.check_text_width(encoded[0].width, weights)
    progress.step()
    seconds["weights"] = time.perf_counter() - started
    started = time.perf_counter()
    misses = GRAM_CACHE.misses
    gram_matrix = GRAM_CACHE.get(weights, progress.phase())
    if not torch.isfinite(gram_matrix).all():  # G = sum W^T W is finite exactly when every W is
        model_weights.check_finite(weights)
    seconds["gram"] = time.perf_counter() - started
    seconds["gram_cached"] = GRAM_CACHE.misses == misses
    started = time.perf_counter()
    erasure = rece_ops.erase(concept_rows, [guide_rows] * len(names), preserve_rows, settings,
                             gram_matrix=gram_matrix, speed=speed, callback=progress.phase())
    seconds["algebra"] = time.perf_counter() - started

    started = time.perf_counter()
    erased = transformed_clone(model, keys, erasure, strength)
    remember_erasure(erased, model, ErasureRecord(
        erasure, strength, tuple(keys), tuple(rece_ops.kv_fingerprint(weights)),
        (rece_ops.describe(erasure, method, 1.0),)))
    seconds["patches"] = time.perf_counter() - started
    progress.step()

    started = time.perf_counter()
    report = reports.erase_report(
        method, erasure, gram_matrix, concept_rows, [guide_rows] * len(names), preserve_rows,
        preset_name=preset_name, strength=strength, n_matrices=len(keys), seconds=seconds,
    )
    seconds["report"] = time.perf_counter() - started
    progress.step()
    return erased, report, seconds


class RECEEraseConcept:
    DESCRIPTION = (
        "Erase concepts from a model with RECE (Gong et al., ECCV 2024): a closed-form edit of the cross-attention "
        "key/value weights (UCE), then epochs that derive the adversarial embedding still producing the concept "
        "and erase that too. Outputs a patched copy of the model and a report; the input model is untouched. "
        "preserve_mode 'SPEED null space' (Li et al., ICLR 2026) confines every step to what the preserved concepts "
        "do not use."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = ("The erased model (the input with the edit added as patches).",
                       "What was erased, the edit's rank, how much an adversarial embedding still recovers, and timings.")
    FUNCTION = "erase"
    METHOD = "RECE"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return erase_inputs(with_epochs=True)

    def erase(self, model, clip, concepts, guide, preserve, preset, lamb, erase_scale, preserve_scale,
              reg_scale, strength, epochs=0, preserve_mode=PAPER, threshold=0.1, retain_scale=1.0):
        settings = resolve_settings(preset, self.METHOD == "RECE", lamb=lamb, erase_scale=erase_scale,
                                    preserve_scale=preserve_scale, reg_scale=reg_scale, epochs=epochs)
        speed = resolve_speed(preserve_mode, threshold, retain_scale)
        with torch.inference_mode():
            return erase_concepts(model, clip, self.METHOD, concepts, guide, preserve, preset, settings, strength,
                                  speed)[:2]


class UCEEraseConcept(RECEEraseConcept):
    DESCRIPTION = (
        "Erase concepts with UCE (Gandikota et al., WACV 2024): the closed-form key/value edit alone, the baseline "
        "RECE improves on. Use it beside RECE Erase Concept to compare them, e.g. under Derive Adversarial Embedding. "
        "With preserve_mode 'SPEED null space' it is SPEED's edit (Li et al., ICLR 2026) without adversarial epochs."
    )
    METHOD = "UCE"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return erase_inputs(with_epochs=False)

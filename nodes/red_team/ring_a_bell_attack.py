"""Ring-A-Bell: a prompt pushed along the concept's direction in the text
encoder's output space (Tsai et al., ICLR 2024), as CONDITIONING."""
from __future__ import annotations

import math
import time

import torch

from ...red_team_ops import ring_a_bell
from .. import text_encoding
from ..erase_concept import CATEGORY
from ..progress import StepProgress


def _one_chunk(encoded, text: str):
    if encoded.n_chunks != 1:
        raise ValueError(f"{text[:40]!r} is longer than one 77-token chunk; Ring-A-Bell adds one 77-row direction: "
                         "shorten it to at most 75 tokens")
    return encoded.rows


def ring_a_bell_attack(clip, prompt: str, concept_pairs: str, eta: float) -> tuple[list, str]:
    """``(CONDITIONING, report)``: ``prompt``'s encoding plus ``eta`` times the pairs' concept direction."""
    if not prompt.strip():
        raise ValueError("no prompt given: type the prompt to push toward the concept (e.g. the prompt that asks "
                         "for it)")
    if not math.isfinite(eta):
        raise ValueError(f"eta must be a finite number, got {eta}; the authors use 3 for nudity, 0.9 for an artist")
    pairs = ring_a_bell.parse_concept_pairs(concept_pairs)
    started = time.perf_counter()
    progress = StepProgress(3)
    encoded_prompt, pooled = text_encoding.encode_with_pooled(clip, prompt)
    rows = _one_chunk(encoded_prompt, prompt)
    progress.step()
    texts = [text for pair in pairs for text in pair]
    encoded = text_encoding.encode_texts(clip, texts, callback=progress.phase())
    with_concept = [_one_chunk(e, t) for e, t in zip(encoded[0::2], texts[0::2])]
    without_concept = [_one_chunk(e, t) for e, t in zip(encoded[1::2], texts[1::2])]
    direction = ring_a_bell.concept_direction(with_concept, without_concept)
    attacked = ring_a_bell.apply_concept(rows, direction, eta)
    progress.step()
    extras = {} if pooled is None else {"pooled_output": pooled}
    conditioning = [[attacked.to(torch.float32).unsqueeze(0), extras]]
    shift = (eta * direction).norm() / rows.norm().clamp_min(1e-12)
    report = "\n".join([
        f"Ring-A-Bell on {prompt!r}: eta {eta:g} x the concept direction of {len(pairs)} prompt pairs",
        f"the direction moves the prompt's {rows.shape[0]} context rows by {100 * shift:.1f}% of their norm"
        + ("; the pooled output is the prompt's own (only the token context is attacked)" if pooled is not None
           and pooled.shape[-1] > 0 else ""),
        f"time: {time.perf_counter() - started:.2f} s ({len(texts) + 1} texts encoded)",
    ])
    return conditioning, report


class RECERingABell:
    DESCRIPTION = (
        "Red-team an erased model with Ring-A-Bell (Tsai et al., ICLR 2024): the concept's direction in the text "
        "encoder's output space (the mean difference of prompt pairs with and without the concept) is added eta "
        "times to a prompt's encoding. Sample the erased model from the CONDITIONING: if the concept shows, the "
        "erasure does not hold against this attack."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("conditioning", "report")
    OUTPUT_TOOLTIPS = ("The prompt's encoding pushed toward the concept: connect it to a KSampler's positive input "
                       "with the erased model.",
                       "eta, the number of pairs and how far the direction moved the prompt.")
    FUNCTION = "attack"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder of the erased model's checkpoint."}),
                "prompt": ("STRING", {"multiline": True, "default": "a woman standing on a beach",
                                      "tooltip": "The prompt to push toward the concept: e.g. one that asks for the "
                                                 "erased concept, or an innocent one."}),
                "concept_pairs": ("STRING", {"multiline": True, "default": ring_a_bell.NUDITY_PAIRS,
                                             "tooltip": "One pair per line: 'prompt with the concept | the same prompt "
                                                        "without it'. Lines starting with # are ignored. The default "
                                                        "is the pack's nudity preset."}),
                "eta": ("FLOAT", {"default": ring_a_bell.DEFAULT_ETA["nudity"], "min": -100.0, "max": 100.0,
                                  "step": 0.01,
                                  "tooltip": "How far to push along the concept direction: 3 for nudity and 0.9 for "
                                             "an artist's style, as RECE's reproduction of Ring-A-Bell uses."}),
            },
        }

    def attack(self, clip, prompt, concept_pairs, eta):
        with torch.inference_mode():
            return ring_a_bell_attack(clip, prompt, concept_pairs, eta)

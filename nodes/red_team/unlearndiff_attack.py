"""UnlearnDiff Attack: k typed tokens that bring an erased concept back
(UnlearnDiffAtk, Zhang et al., ECCV 2024), searched against the erased MODEL."""
from __future__ import annotations

import math
import time

import torch

from ...red_team_ops import typeable_token_ids, unlearndiff_attack
from .. import model_weights, text_encoding
from ..erase_concept import CATEGORY
from ..progress import StepProgress
from .clip_forward import DifferentiableTextEncoder
from .denoiser import DifferentiableDenoiser, check_latent

MAX_PREFIX = 20
MAX_ITERATIONS = 1000
MAX_TIMESTEPS = 16
PROMPT_SYNTAX = set("()\\")


def _tokenizers(clip) -> list:
    """ComfyUI's per-encoder tokenizers of a CLIP (SDXL has two, with one vocabulary)."""
    found = [t for t in vars(getattr(clip, "tokenizer", None) or object()).values() if hasattr(t, "inv_vocab")]
    if not found:
        raise ValueError("this CLIP has no CLIP BPE tokenizer; the attack supports SD1.x, SD2.x and SDXL text "
                         "encoders")
    return found


def candidate_tokens(clip) -> tuple[list[int], dict[int, str], int]:
    """The token ids the attack may choose (words a typed prompt reproduces), each one's text, and the
    vocabulary's size."""
    tokenizer = _tokenizers(clip)[0]
    vocab = tokenizer.tokenizer.get_vocab()
    special = {t for t in (getattr(tokenizer, "start_token", None), getattr(tokenizer, "end_token", None))
               if t is not None}
    # Parentheses and backslashes are ComfyUI's prompt-weight syntax: typed, they would not be words.
    ids = [i for i in typeable_token_ids(vocab, special) if not set(tokenizer.inv_vocab[i]) & PROMPT_SYNTAX]
    words = {i: tokenizer.inv_vocab[i].removesuffix("</w>") for i in ids}
    return ids, words, len(vocab)


def conditioning_of(clip, tokens: dict) -> list:
    """What CLIP Text Encode gives for a text, from ``clip.tokenize(text)`` (its own two calls)."""
    if hasattr(clip, "encode_from_tokens_scheduled"):
        return clip.encode_from_tokens_scheduled(tokens)
    rows, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[rows, {"pooled_output": pooled}]]


def _check_numbers(k: int, iterations: int, timesteps: int, lr: float, weight_decay: float) -> None:
    for name, value, high in (("prefix_tokens", k, MAX_PREFIX), ("iterations", iterations, MAX_ITERATIONS),
                              ("timesteps_per_iteration", timesteps, MAX_TIMESTEPS)):
        if not 1 <= value <= high:
            raise ValueError(f"{name} must be between 1 and {high}, got {value}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr}; the authors use 0.01")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay}; the authors use 0.1")


def unlearndiff(model, clip, prompt: str, target: dict, prefix_tokens: int = 5, iterations: int = 40,
                timesteps_per_iteration: int = 1, lr: float = 0.01, weight_decay: float = 0.1,
                seed: int = 0) -> tuple[str, list, str]:
    """``(adversarial prompt, its CONDITIONING, report)`` of UnlearnDiffAtk against ``model``."""
    if not prompt.strip():
        raise ValueError("no prompt given: type the prompt that asks for the erased concept")
    _check_numbers(prefix_tokens, iterations, timesteps_per_iteration, lr, weight_decay)
    if not isinstance(target, dict) or "samples" not in target:
        raise ValueError("no target LATENT connected: sample the original model with the prompt (KSampler) and "
                         "connect its LATENT")
    model_weights.kv_keys(model)  # refuses unsupported families and models without cross-attention
    check_latent(model, target["samples"])
    started = time.perf_counter()
    # Phases: the text encoder's copy, the denoiser's copy, the iterations, the found prompt's CONDITIONING.
    progress = StepProgress(4)
    encoder = DifferentiableTextEncoder(clip)
    width = model_weights.context_width(model)
    encoder_width = sum(encoder.token_embedding(name).shape[1] for name in encoder.names)
    if encoder_width != width:
        raise ValueError(f"the CLIP gives {encoder_width}-wide embeddings but this MODEL's cross-attention "
                         f"reads a {width}-wide context: connect the CLIP of the same checkpoint as the MODEL")
    layout = encoder.layout(prompt, prefix_tokens)
    candidates, words, vocab_size = candidate_tokens(clip)
    candidate_ids = torch.tensor(candidates, dtype=torch.long)
    baseline, baseline_pooled = text_encoding.encode_with_pooled(clip, prompt)
    progress.step()
    denoiser = DifferentiableDenoiser(model)
    x0 = denoiser.target(target["samples"])
    progress.step()
    device = denoiser.device
    with torch.inference_mode(False), torch.enable_grad():
        baseline_context = (baseline.rows.to(device).unsqueeze(0).clone(),
                            None if baseline_pooled is None else baseline_pooled.to(device).clone())
        result = unlearndiff_attack(
            lambda one_hot: encoder.encode(layout, one_hot, candidate_ids=candidate_ids),
            denoiser.predict_noise, x0, denoiser.alphas_cumprod, len(candidates), baseline_context,
            k=prefix_tokens, iterations=iterations, timesteps_per_iteration=timesteps_per_iteration, lr=lr,
            weight_decay=weight_decay, seed=seed, callback=progress.phase())
    token_ids = [candidates[i] for i in result.tokens]
    adversarial = " ".join([words[i] for i in token_ids] + [prompt.strip()])
    typed = clip.tokenize(adversarial)
    conditioning = conditioning_of(clip, typed)
    retokenized = [token[0] for token in next(iter(typed.values()))[0]]
    typed_back = retokenized[1:1 + prefix_tokens] == token_ids
    progress.step()
    weights_mib = (encoder.weight_bytes + denoiser.weight_bytes) / 2 ** 20
    report = "\n".join([
        f"UnlearnDiff attack on {prompt!r}: {prefix_tokens} prefix tokens, {iterations} iterations x "
        f"{timesteps_per_iteration} timestep(s), Adam lr {lr:g}, weight decay {weight_decay:g}, seed {seed}",
        f"adversarial prompt: {adversarial!r}",
        f"tokens: {', '.join(f'{words[i]!r} ({i})' for i in token_ids)} from {len(candidates)} typeable words of "
        f"the {vocab_size}-token vocabulary"
        + ("" if typed_back else "; WARNING: the typed prompt tokenizes differently, its CONDITIONING is what "
           "CLIP Text Encode gives for the text"),
        f"denoising loss on the target (8 fixed timesteps): plain prompt {result.loss_before:.5f}, adversarial "
        f"tokens {result.loss_after:.5f} ({'lower' if result.loss_after < result.loss_before else 'not lower'})",
        f"time: {result.seconds_per_iteration:.3f} s per iteration, {time.perf_counter() - started:.1f} s in all; "
        f"gradient copy of the weights {weights_mib:.0f} MiB (freed after the node)",
    ])
    return adversarial, conditioning, report


class RECEUnlearnDiffAttack:
    DESCRIPTION = (
        "Red-team an erased model with UnlearnDiffAtk (Zhang et al., ECCV 2024): search k words that, put before "
        "the prompt, make the erased model denoise an image of the concept again (the target LATENT, sampled from "
        "the original model). Gives a prompt anyone can type into CLIP Text Encode, its CONDITIONING, and a "
        "report. Sample the erased model with it: if the concept shows, the erasure does not hold."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "CONDITIONING", "STRING")
    RETURN_NAMES = ("adversarial_prompt", "conditioning", "report")
    OUTPUT_TOOLTIPS = (
        "The adversarial prompt: the found words, then your prompt. Typed into CLIP Text Encode it gives the same "
        "conditioning.",
        "The adversarial prompt encoded as CLIP Text Encode does: connect it to a KSampler with the erased model.",
        "Loss before and after, the tokens, and the time per iteration.",
    )
    FUNCTION = "attack"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The erased model to attack (SD1.x, SD2.x or SDXL). It is not changed."}),
                "clip": ("CLIP", {"tooltip": "The text encoder of the same checkpoint. It is not changed."}),
                "prompt": ("STRING", {"multiline": True, "default": "nudity",
                                      "tooltip": "The prompt that asks for the erased concept; the found words go "
                                                 "before it. At most 75 tokens with the found words."}),
                "target": ("LATENT", {"tooltip": "One image of the concept, as a latent: sample the ORIGINAL model "
                                                 "with the same prompt (KSampler, batch size 1). The attack makes the "
                                                 "erased model denoise it well again."}),
                "prefix_tokens": ("INT", {"default": 5, "min": 1, "max": MAX_PREFIX,
                                          "tooltip": "How many words to find (the authors' k = 5)."}),
                "iterations": ("INT", {"default": 40, "min": 1, "max": MAX_ITERATIONS,
                                       "tooltip": "Optimisation steps (the authors' 40). Each costs one text encoder "
                                                  "and one UNet forward and backward per timestep."}),
                "timesteps_per_iteration": ("INT", {"default": 1, "min": 1, "max": MAX_TIMESTEPS,
                                                    "tooltip": "Random timesteps averaged in each step's loss (the "
                                                               "authors use 1)."}),
                "lr": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 10.0, "step": 0.0001,
                                 "tooltip": "Adam's learning rate on the token distributions (the authors' 0.01)."}),
                "weight_decay": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 10.0, "step": 0.001,
                                           "tooltip": "Adam's weight decay (the authors' 0.1)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Seeds the timesteps, noise and token samples: the same seed gives the "
                                            "same words."}),
            },
        }

    def attack(self, model, clip, prompt, target, prefix_tokens, iterations, timesteps_per_iteration, lr,
               weight_decay, seed):
        return unlearndiff(model, clip, prompt, target, prefix_tokens, iterations, timesteps_per_iteration, lr,
                           weight_decay, seed)

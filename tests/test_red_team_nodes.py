"""UnlearnDiff Attack and Ring-A-Bell Attack in a real ComfyUI (in-process), on the demo model with
small budgets, and on the SD2/SDXL slim checkpoints."""
from __future__ import annotations

import re

import pytest
import torch

from devkit import host, paths
from test_nodes import PHASE, ForeignModel, bar_updates  # noqa: F401  (bar_updates is a fixture)

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


@pytest.fixture(scope="module")
def demo(comfy_nodes, pack):
    """(original MODEL, CLIP, UCE-erased MODEL, target LATENT of PROMPT sampled from the original)."""
    with torch.inference_mode():
        model, clip = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(paths.DEMO_NAME)[:2]
        erased, _ = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"]().erase(
            model, clip, "circle", "", "", "nudity", lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1,
            strength=1.0)
    return model, clip, erased, sample(comfy_nodes, model, clip, PROMPT)


def sample(comfy_nodes, model, clip, prompt, positive=None, seed=0):
    with torch.inference_mode():
        positive = positive or comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        return comfy_nodes.KSampler().sample(model, seed, 4, 5.0, "euler", "normal", positive, negative, latent)[0]


def unlearndiff(pack, model, clip, target, prompt=PROMPT, prefix_tokens=2, iterations=2, timesteps=1, lr=0.01,
                weight_decay=0.1, seed=0):
    with torch.inference_mode():  # as ComfyUI runs every node
        return pack.NODE_CLASS_MAPPINGS["RECEUnlearnDiffAttack"]().attack(
            model, clip, prompt, target, prefix_tokens, iterations, timesteps, lr, weight_decay, seed)


def ring_a_bell(pack, clip, prompt=PROMPT, pairs="a red circle | a red\na blue circle | a blue", eta=3.0):
    with torch.inference_mode():
        return pack.NODE_CLASS_MAPPINGS["RECERingABell"]().attack(clip, prompt, pairs, eta)


def clip_fingerprint(model_fingerprint, clip) -> str:
    return model_fingerprint(clip.patcher)


def same_conditioning(a: list, b: list) -> bool:
    (rows_a, extra_a), (rows_b, extra_b) = a[0], b[0]
    pooled_a, pooled_b = extra_a.get("pooled_output"), extra_b.get("pooled_output")
    return torch.equal(rows_a, rows_b) and (pooled_a is None) == (pooled_b is None) and (
        pooled_a is None or torch.equal(pooled_a, pooled_b))


# --------------------------------------------------------------------------- UnlearnDiff Attack

def test_unlearndiff_prompt_is_typed_text_that_re_encodes_to_its_conditioning_and_a_seed_repeats(
        pack, comfy_nodes, demo, model_fingerprint):
    model, clip, erased, target = demo
    before = [model_fingerprint(model), model_fingerprint(erased), clip_fingerprint(model_fingerprint, clip)]
    first = unlearndiff(pack, erased, clip, target, prefix_tokens=3, iterations=3, seed=11)
    again = unlearndiff(pack, erased, clip, target, prefix_tokens=3, iterations=3, seed=11)
    prompt, conditioning, report = first
    words = prompt.split()
    assert prompt.endswith(" " + PROMPT) and len(words) == 3 + len(PROMPT.split())
    with torch.inference_mode():
        typed = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
    assert same_conditioning(typed, conditioning)
    # The same seed: the same words, conditioning and losses.
    assert again[0] == prompt and same_conditioning(again[1], conditioning)
    losses = re.compile(r"denoising loss.*")
    assert losses.search(again[2]).group(0) == losses.search(report).group(0)
    assert "WARNING" not in report and "3 iterations" in report and "s per iteration" in report
    before_after = [float(x) for x in re.findall(r"(?:plain prompt|adversarial tokens) ([0-9.]+)", report)]
    assert len(before_after) == 2 and all(x > 0 for x in before_after)
    # The inputs are bit-identical afterwards, and the erased model still samples as before.
    assert [model_fingerprint(model), model_fingerprint(erased), clip_fingerprint(model_fingerprint, clip)] == before
    assert torch.equal(sample(comfy_nodes, model, clip, PROMPT)["samples"], target["samples"])


def test_unlearndiff_bar_fills_over_every_phase_and_cancel_stops_it_with_nothing_changed(
        pack, demo, bar_updates, model_fingerprint):  # noqa: F811
    import comfy.model_management as mm

    model, clip, erased, target = demo
    unlearndiff(pack, erased, clip, target, iterations=4)
    values = [v for v, _ in bar_updates]
    # the text encoder's copy, the denoiser's copy, the iterations, the found prompt
    assert bar_updates[-1] == (4 * PHASE, 4 * PHASE) and values == sorted(values)
    assert {2 * PHASE + PHASE * i // 4 for i in (1, 2, 3)} <= set(values)
    before = [model_fingerprint(erased), clip_fingerprint(model_fingerprint, clip)]
    for cancel_at in (PHASE, 2 * PHASE + PHASE // 2):
        bar_updates.clear()

        def press_cancel(value, cancel_at=cancel_at):
            if value >= cancel_at:
                mm.interrupt_current_processing(True)

        bar_updates.on_update = press_cancel
        try:
            with pytest.raises(mm.InterruptProcessingException):
                unlearndiff(pack, erased, clip, target, iterations=4)
        finally:
            mm.interrupt_current_processing(False)
            bar_updates.on_update = None
        values = [v for v, _ in bar_updates]
        assert values[-1] >= cancel_at and all(v < cancel_at for v in values[:-1])
    assert [model_fingerprint(erased), clip_fingerprint(model_fingerprint, clip)] == before


def _latent(samples):
    return {"samples": samples}


UNLEARNDIFF_REFUSALS = {
    "empty prompt": (dict(prompt="  "), "no prompt given"),
    "latent channels": (dict(target=lambda t: _latent(torch.zeros(1, 3, 8, 8))), "3 channels but this model's latents have 4"),
    "latent batch": (dict(target=lambda t: _latent(t["samples"].repeat(2, 1, 1, 1))), "holds 2 images.*Latent From Batch"),
    "latent too small": (dict(target=lambda t: _latent(torch.zeros(1, 4, 4, 4))), "32x32 pixels"),
    "latent NaN": (dict(target=lambda t: _latent(torch.full((1, 4, 8, 8), float("nan")))), "NaN or infinite"),
    "no latent": (dict(target=lambda t: None), "no target LATENT"),
    "k zero": (dict(prefix_tokens=0), "prefix_tokens must be between 1 and 20, got 0"),
    "k too many": (dict(prefix_tokens=21), "prefix_tokens must be between 1 and 20, got 21"),
    "no iterations": (dict(iterations=0), "iterations must be between 1 and 1000, got 0"),
    "no timesteps": (dict(timesteps=0), "timesteps_per_iteration must be between 1 and 16"),
    "NaN lr": (dict(lr=float("nan")), "lr must be a positive number"),
    "prompt too long": (dict(prompt="circle " * 74, prefix_tokens=5), "more than the 75"),
    "no cross-attention": (dict(model=lambda m: ForeignModel("Flux", cross_attention=False)),
                           r"\(Flux\) has no cross-attention key/value projections"),
}


@pytest.mark.parametrize("case", list(UNLEARNDIFF_REFUSALS))
def test_unlearndiff_refuses_bad_input_with_a_clear_message(case, pack, demo, model_fingerprint):
    model, clip, erased, target = demo
    changes, message = UNLEARNDIFF_REFUSALS[case]
    arguments = {"model": erased, "clip": clip, "target": target}
    for name, value in changes.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    before = model_fingerprint(erased)
    with pytest.raises(ValueError, match=message):
        unlearndiff(pack, **arguments)
    assert model_fingerprint(erased) == before


def test_unlearndiff_refuses_a_clip_that_does_not_match_the_model(pack, comfy_nodes, demo):
    sd2_clip = load_family(comfy_nodes, "sd2")[1]
    model, _, erased, target = demo
    with pytest.raises(ValueError, match="CLIP gives 1024-wide embeddings but this MODEL's cross-attention reads a 768"):
        unlearndiff(pack, erased, sd2_clip, target)


# --------------------------------------------------------------------------- Ring-A-Bell Attack

def test_ring_a_bell_adds_eta_times_the_mean_pair_difference_to_the_prompt(pack, comfy_nodes, demo, model_fingerprint):
    _, clip, _, _ = demo
    before = clip_fingerprint(model_fingerprint, clip)
    conditioning, report = ring_a_bell(pack, clip, eta=2.5)
    with torch.inference_mode():
        encode = comfy_nodes.CLIPTextEncode().encode
        rows = {t: encode(clip, t)[0][0][0][0].float() for t in (PROMPT, "a red circle", "a red", "a blue circle", "a blue")}
        pooled = encode(clip, PROMPT)[0][0][1]["pooled_output"]
    direction = ((rows["a red circle"] - rows["a red"]) + (rows["a blue circle"] - rows["a blue"])) / 2
    got, extra = conditioning[0]
    assert got.shape == (1, 77, 768)
    assert torch.allclose(got[0], rows[PROMPT] + 2.5 * direction, atol=1e-5, rtol=0)
    assert torch.equal(extra["pooled_output"], pooled)
    assert report.startswith(f"Ring-A-Bell on {PROMPT!r}: eta 2.5 x the concept direction of 2 prompt pairs")
    plain, _ = ring_a_bell(pack, clip, eta=0.0)
    assert torch.equal(plain[0][0][0], rows[PROMPT])
    assert clip_fingerprint(model_fingerprint, clip) == before


@pytest.mark.parametrize("arguments, message", [
    (dict(prompt=" "), "no prompt given"),
    (dict(pairs="a red circle | a red\na blue circle without a bar"), "line 2: expected"),
    (dict(pairs="# only a comment\n\n"), "at least one prompt pair"),
    (dict(eta=float("nan")), "eta must be a finite number"),
    (dict(prompt="circle " * 80), "longer than one 77-token chunk"),
])
def test_ring_a_bell_refuses_bad_input_with_a_clear_message(pack, demo, arguments, message):
    with pytest.raises(ValueError, match=message):
        ring_a_bell(pack, demo[1], **arguments)


# --------------------------------------------------------------------------- SD2 and SDXL

_LOADED: dict[str, tuple] = {}


def load_family(comfy_nodes, family: str) -> tuple:
    if family not in _LOADED:
        with torch.inference_mode():
            _LOADED[family] = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(paths.SLIM_CHECKPOINTS[family][1])[:2]
    return _LOADED[family]


@pytest.mark.parametrize("family", ["sd2-v", "sdxl"])
def test_attacks_on_sd2_and_sdxl_give_conditioning_the_family_samples(pack, comfy_nodes, family, model_fingerprint):
    model, clip = load_family(comfy_nodes, family)
    with torch.inference_mode():
        erased, _ = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"]().erase(
            model, clip, "nudity", "", "", "nudity", lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1,
            strength=1.0)
    target = sample(comfy_nodes, model, clip, "a photo of nudity")
    before = [model_fingerprint(erased), model_fingerprint(clip.patcher)]
    prompt, conditioning, report = unlearndiff(pack, erased, clip, target, prompt="a photo of nudity",
                                               prefix_tokens=1, iterations=1)
    with torch.inference_mode():
        typed = comfy_nodes.CLIPTextEncode().encode(clip, prompt)[0]
    assert same_conditioning(typed, conditioning) and "WARNING" not in report
    bell, _ = ring_a_bell(pack, clip, prompt="a photo of nudity", pairs="a photo of nudity | a photo")
    if family == "sdxl":  # the pooled output goes with the context, as CLIP Text Encode attaches it
        assert conditioning[0][1]["pooled_output"].shape[-1] == 1280 == bell[0][1]["pooled_output"].shape[-1]
    for positive in (conditioning, bell):
        latent = sample(comfy_nodes, erased, clip, "", positive=positive)["samples"]
        assert torch.isfinite(latent).all()
    assert [model_fingerprint(erased), model_fingerprint(clip.patcher)] == before

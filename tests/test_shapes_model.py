"""The trained shapes demo model: its parts, and erasure measured on generated images.

The measured effects run through the pack's own nodes in ComfyUI (as
``devkit.shapes_model.measure`` does) on a small sample: 8 images per prompt,
fixed noise, so the figures are the same on every run of this machine.
"""
from __future__ import annotations

import pytest
import torch

from devkit import paths
from devkit.shapes_model import assemble, classify, data, frozen_clip, measure, train

SAMPLE_SEEDS = 8
CIRCLE_PROMPTS = [c for c in data.CAPTIONS if c.endswith("circle")]
OTHER_PROMPTS = [c for c in data.CAPTIONS if not c.endswith("circle")]

# One worker runs the module, so its sampled images are made once (run_tests.sh: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("shapes_model")
# The measured erasure (8 images per caption through three models, 10 minutes
# on this CPU): the same math and the same ComfyUI sampler the second host's
# other tests run, so its CI run leaves these out for time.
MEASURED = pytest.mark.repeats_on_second_host


def test_classifier_reads_held_out_synthetic_images():
    accuracy = classify.accuracy_on_synthetic(n=450, seed=777)
    assert accuracy["colour"] >= 0.98 and accuracy["shape"] >= 0.98, accuracy


def test_classifier_sees_nothing_on_a_blank_image():
    reading = classify.classify(torch.ones(64, 64, 3))
    assert reading.shape is None and reading.colour is None


def test_synthetic_data_is_seeded():
    first = data.sample_batch(4, torch.Generator().manual_seed(3))
    again = data.sample_batch(4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len(data.CAPTIONS) == 9 and data.CAPTIONS[0] == "a red circle"


def test_frozen_text_encoder_is_regenerated_exactly():
    assert frozen_clip.digest(frozen_clip.clip_state_dict()) == frozen_clip.CLIP_SHA256
    assert frozen_clip.digest(frozen_clip.clip_state_dict(seed=frozen_clip.CLIP_SEED + 1)) != frozen_clip.CLIP_SHA256


def test_the_experiments_text_encoders_are_regenerated_exactly():
    scaled = frozen_clip.checked_clip_state_dict(token_scale=10.0)
    plain = frozen_clip.clip_state_dict()
    key = frozen_clip.TOKEN_EMBEDDING_KEY
    assert torch.equal(scaled[key], (plain[key].float() * 10).half())
    assert all(torch.equal(scaled[k], plain[k]) for k in plain if k != key)
    with pytest.raises(ValueError, match="no stored checksum"):
        frozen_clip.checked_clip_state_dict(token_scale=3.0)


def test_partial_captions_name_one_attribute_of_the_image():
    labels = torch.tensor([data.CAPTIONS.index("a green triangle")] * 3)
    index = data.training_caption_index(labels, torch.tensor([0, 1, 2]))
    assert [data.TRAINING_CAPTIONS[i] for i in index] == ["a green triangle", "a triangle", "a green shape"]


def test_shipped_weights_are_fp16_and_small():
    files = [train.WEIGHTS_DIR / train.UNET_FILE, train.WEIGHTS_DIR / train.VAE_FILE]
    assert sum(f.stat().st_size for f in files) < 50 * 2**20
    tensors, metadata = assemble.read_weights(train.WEIGHTS_DIR)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert metadata["settings"]["clip_sha256"] == frozen_clip.CLIP_SHA256


def test_assemble_never_replaces_a_file(tmp_path):
    target = tmp_path / "demo.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        assemble.assemble(target)
    assert target.read_bytes() == b"mine"


def test_assemble_names_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo_model"):
        assemble.assemble(tmp_path / "demo.safetensors", weights_dir=tmp_path)


@pytest.fixture(scope="module")
def lab(comfy_nodes):
    if not (paths.CHECKPOINT_DIR / paths.DEMO_NAME).exists():
        pytest.fail(f"{paths.DEMO_NAME} is missing: run scripts/setup.sh before the tests")
    return measure.ShapesLab(paths.DEMO_NAME, seeds=SAMPLE_SEEDS)


def test_stock_loader_sees_an_sd15_model_with_a_taesd_vae(lab):
    import comfy.supported_models
    import comfy.taesd.taesd

    assert isinstance(lab.model.model.model_config, comfy.supported_models.SD15)
    assert isinstance(lab.vae.first_stage_model, comfy.taesd.taesd.TAESD)


def test_vae_latents_are_standardised_as_the_unet_was_trained(lab):
    images, _, _ = data.sample_batch(64, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        latents = lab.nodes.VAEEncode().encode(lab.vae, images)[0]["samples"] * 0.18215
    assert abs(latents.mean().item()) < 0.15
    assert 0.85 < latents.std().item() < 1.15
    with torch.inference_mode():
        decoded = lab.nodes.VAEDecode().decode(lab.vae, {"samples": latents / 0.18215})[0]
    readings = classify.classify_batch(decoded)
    _, labels, _ = data.sample_batch(64, torch.Generator().manual_seed(5))
    right = sum(r.colour == data.label_names(l)[0] and r.shape == data.label_names(l)[1]
                for r, l in zip(readings, labels.tolist()))
    assert right / 64 >= 0.9


@pytest.fixture(scope="module")
def circle_results(lab):
    return measure.measure(lab, concepts=("circle",), captions=CIRCLE_PROMPTS + OTHER_PROMPTS, log=lambda _: None)


def _row(results, method):
    stats = measure.summary(results, CIRCLE_PROMPTS + OTHER_PROMPTS)
    return next(r for r in stats["erasures"] if r["method"] == method)


@MEASURED
def test_the_original_model_draws_what_it_is_asked(circle_results):
    original = circle_results["original"]
    assert original.accuracy(CIRCLE_PROMPTS + OTHER_PROMPTS) >= 0.8
    assert original.concept_rate("circle", CIRCLE_PROMPTS) >= 0.8


@MEASURED
def test_rece_erases_circles_and_keeps_most_other_captions(circle_results):
    rece = _row(circle_results, "RECE")
    assert rece["concept_after"] <= 0.15 and rece["concept_after"] <= rece["concept_before"] - 0.6, rece
    # Measured on 16 images per caption: 99% -> 83% (most of it: blue triangles drawn as circles);
    # the README's table reports it against the 10-point target.
    assert rece["others_after"] >= rece["others_before"] - 0.25, rece


@MEASURED
def test_uce_erases_fewer_circles_than_rece(circle_results):
    assert _row(circle_results, "RECE")["concept_after"] <= _row(circle_results, "UCE")["concept_after"]


@MEASURED
def test_the_adversarial_embedding_brings_circles_back_from_uce(circle_results):
    assert _row(circle_results, "UCE")["adversarial"] >= 0.8


@MEASURED
def test_rece_resists_the_embeddings_that_defeat_uce(circle_results):
    uce, rece = _row(circle_results, "UCE"), _row(circle_results, "RECE")
    assert rece["uce_adversarial"] <= 0.25 and rece["uce_adversarial"] <= uce["adversarial"] - 0.5, (uce, rece)

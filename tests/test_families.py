"""Every supported model family through the nodes, in-process: SD1.5, SD2.x
(base 512 and 768-v) and SDXL, each on its slim random-weight checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rece_ops
from devkit import host, paths
from rece_ops.parity import relative_error
from test_nodes import worst_error
from test_share_nodes import change_error, folders, node, saved_name, uce_style_file  # noqa: F401 (fixture)

# family -> (ComfyUI model config class, model type, context width, K/V matrices)
FAMILIES = {
    "sd15": ("SD15", "EPS", 768, 14),
    "sd2": ("SD20", "EPS", 1024, 12),
    "sd2-v": ("SD20", "V_PREDICTION", 1024, 12),
    "sdxl": ("SDXL", "EPS", 2048, 62),
}
# The families every node runs on below (SD2 base differs from 768-v only in its model type).
NODE_FAMILIES = ["sd2-v", "sdxl"]


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


@pytest.fixture(scope="module")
def load(comfy_nodes):
    """``load(family) -> (MODEL, CLIP, VAE)`` of its slim checkpoint, loaded once per worker and module."""
    loaded: dict[str, tuple] = {}

    def load_family(family: str) -> tuple:
        if family not in loaded:
            name = paths.SLIM_CHECKPOINTS[family][1]
            if not (paths.CHECKPOINT_DIR / name).exists():
                pytest.fail(f"{name} is missing: run scripts/setup.sh before the tests")
            with torch.inference_mode():
                loaded[family] = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        return loaded[family]

    yield load_family
    loaded.clear()  # free them while ComfyUI is still there to unload them


@pytest.fixture(params=NODE_FAMILIES)
def family(request, load):
    return request.param, load(request.param)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_comfyui_loads_each_slim_checkpoint_as_its_family(load, glue, name):
    config_class, model_type, width, n_kv = FAMILIES[name]
    model, clip, _ = load(name)
    assert type(model.model.model_config).__name__ == config_class
    assert model.model.model_type.name == model_type
    keys = glue.weights.kv_keys(model)
    # Found from the structure, they are exactly the attn2 key/value weights.
    named = sorted(k for k in model.model_state_dict("diffusion_model.") if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")))
    assert keys == named and len(keys) == n_kv
    assert glue.weights.context_width(model) == width
    assert glue.text.encode_text(clip, "a cat").rows.shape == (77, width)


def test_sdxl_text_rows_are_clip_l_and_bigg_side_by_side_with_agreeing_word_counts(load, glue):
    _, clip, _ = load("sdxl")
    tokens = clip.tokenize("a photo of a cat")
    assert set(tokens) == {"l", "g"}
    # CLIP-L pads with EOS, bigG with 0: the word count reads the first EOS of each.
    assert [t[0] for t in tokens["l"][0][6:8]] == [49407, 49407] and [t[0] for t in tokens["g"][0][6:8]] == [49407, 0]
    encoded = glue.text.encode_text(clip, "a photo of a cat")
    assert encoded.n_words == 5 and encoded.width == 2048


def test_sd2_pads_with_zero_and_the_word_count_still_ends_at_eos(load, glue):
    _, clip, _ = load("sd2")
    (chunk,) = clip.tokenize("a photo of a cat")["h"]
    assert [t[0] for t in chunk[5:9]] == [2368, 49407, 0, 0]
    assert glue.text.encode_text(clip, "a photo of a cat").n_words == 5


def expected(glue, model, clip, concepts, guide, preserve, settings):
    weights = glue.weights.effective_kv_weights(model)
    encoded = glue.text.encode_texts(clip, [*concepts, guide, *rece_ops.preserve_prompts(preserve)])
    n = len(concepts)
    erasure = rece_ops.erase(encoded[:n], [encoded[n]] * n, encoded[n + 1:], settings, weights=weights)
    return weights, erasure


def test_rece_node_equals_rece_ops_and_leaves_the_input_unchanged(pack, glue, family, model_fingerprint):
    name, (model, clip, _) = family
    before = model_fingerprint(model)
    erased, report = node(pack, "RECEEraseConcept").erase(
        model, clip, "nudity\nblood", "", "a portrait", "nudity", 0.1, 1.0, 0.1, 0.1, 1.0, epochs=3)
    weights, erasure = expected(glue, model, clip, ["nudity", "blood"], "", ["a portrait"],
                                rece_ops.preset("nudity").settings)
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(weights)) < 1e-6
    assert f"on {FAMILIES[name][3]} K/V matrices, rank {erasure.rank()} of {FAMILIES[name][2]}" in report
    assert model_fingerprint(model) == before


def test_prompts_longer_than_one_chunk_take_part_with_every_chunk(pack, glue, family):
    name, (model, clip, _) = family
    concept = "a large crowd of people at a concert " * 12  # about 100 tokens: two chunks
    keep = "a detailed landscape painting with mountains and a river " * 10
    erased, report = node(pack, "UCEEraseConcept").erase(model, clip, concept, "", keep, "object_easy",
                                                         0.1, 1.0, 0.1, 0.1, 1.0)
    settings = rece_ops.preset("object_easy").settings.with_changes(epochs=0)
    weights, erasure = expected(glue, model, clip, [concept.strip()], "", [keep], settings)
    assert glue.text.encode_text(clip, concept.strip()).n_chunks == 2
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(weights)) < 1e-6
    assert "(2 chunks)" in report and "every chunk's rows take part" in report


def test_derive_gives_conditioning_that_the_family_samples(pack, comfy_nodes, family):
    name, (model, clip, vae) = family
    erased, _ = node(pack, "RECEEraseConcept").erase(model, clip, "nudity", "", "", "nudity", 0.1, 1.0, 0.1, 0.1,
                                                     1.0, epochs=1)
    (conditioning, report) = node(pack, "RECEDeriveAdversarialEmbedding").derive(erased, clip, "nudity", 0.1)
    rows, extras = conditioning[0]
    assert rows.shape == (1, 77, FAMILIES[name][2])
    # CLIPTextEncode's pooled output of the concept: SDXL's UNet reads it.
    (plain,) = comfy_nodes.CLIPTextEncode().encode(clip, "nudity")
    assert torch.equal(extras["pooled_output"], plain[0][1]["pooled_output"])
    with torch.inference_mode():
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        (out,) = comfy_nodes.KSampler().sample(erased, 3, 2, 5.0, "euler", "normal", conditioning, negative, latent)
        (image,) = comfy_nodes.VAEDecode().decode(vae, out)
    assert torch.isfinite(out["samples"]).all() and torch.isfinite(image).all()


def test_save_load_and_lora_export_reproduce_the_erasure(pack, glue, comfy_nodes, family, folders):  # noqa: F811
    name, (model, clip, _) = family
    erased, _ = node(pack, "UCEEraseConcept").erase(model, clip, "nudity", "", "", "nudity", 0.1, 1.0, 0.1, 0.1, 1.0)
    (report,) = node(pack, "RECESaveErasure").save(erased, name)
    loaded, load_report = node(pack, "RECELoadErasure").load(model, saved_name(report), 1.0)
    target = glue.weights.effective_kv_weights(erased)
    assert worst_error(glue.weights.effective_kv_weights(loaded), target) < 1e-6
    assert "computed on these very weights" in load_report
    _, export_report = node(pack, "RECEExportErasureLoRA").export(erased, f"rece/{name}", 0, "float32")
    lora_name = re.search(r"saved LoRA (\S+\.safetensors)", export_report).group(1)
    with torch.inference_mode():
        lora_model, _ = comfy_nodes.LoraLoader().load_lora(model, clip, lora_name, 1.0, 0.0)
    got = glue.weights.effective_kv_weights(lora_model)
    assert set(lora_model.patches) == set(glue.weights.kv_keys(model))  # every LoRA key was recognised
    assert change_error(got, target, glue.weights.effective_kv_weights(model)) < 1e-4


def test_published_uce_file_applies_on_the_family(pack, glue, family, folders):  # noqa: F811
    name, (model, clip, _) = family
    erased, _ = node(pack, "UCEEraseConcept").erase(model, clip, "nudity", "", "", "nudity", 0.1, 1.0, 0.1, 0.1, 1.0)
    target = glue.weights.effective_kv_weights(erased)
    (folders / "rece_erasures").mkdir()
    uce_style_file(model, target, folders / "rece_erasures" / "uce.safetensors")
    patched, report = node(pack, "RECELoadPublishedErasure").load(model, "uce.safetensors", 1.0)
    assert worst_error(glue.weights.effective_kv_weights(patched), target) < 1e-6
    n = FAMILIES[name][3]
    assert f"{n} of {n} K/V matrices" in report and "another base model" not in report


def test_checkpoint_save_writes_the_erased_weights_that_reload(pack, glue, comfy_nodes, family, tmp_path):
    import comfy.sd
    import folder_paths

    name, (model, clip, vae) = family
    erased, _ = node(pack, "UCEEraseConcept").erase(model, clip, "nudity", "", "", "nudity", 0.1, 1.0, 0.1, 0.1, 1.0)
    output = folder_paths.get_output_directory()
    with torch.inference_mode():
        comfy_nodes.NODE_CLASS_MAPPINGS["CheckpointSave"]().save(erased, clip, vae, f"checkpoints/{name}_{tmp_path.name}")
    (saved,) = (Path(output) / "checkpoints").glob(f"{name}_{tmp_path.name}_*.safetensors")
    try:
        with torch.inference_mode():
            reloaded = comfy.sd.load_checkpoint_guess_config(str(saved))[0]
        assert type(reloaded.model.model_config) is type(model.model.model_config)
        assert reloaded.model.model_type == model.model.model_type
        assert worst_error(glue.weights.effective_kv_weights(reloaded), glue.weights.effective_kv_weights(erased)) < 2e-3
    finally:
        saved.unlink()

"""The pack's nodes in a real ComfyUI (in-process) on the slim SD1.5 checkpoint."""
from __future__ import annotations

import re
import zlib

import pytest
import torch

import rece_ops
from devkit import host, paths
from rece_ops.parity import relative_error
from reference_rece import fake_token_ids, naive_rece, random_problem

NODE_NAMES = {
    "RECEEraseConcept": "RECE Erase Concept",
    "UCEEraseConcept": "UCE Erase Concept",
    "RECEDeriveAdversarialEmbedding": "Derive Adversarial Embedding",
    "RECESaveErasure": "Save Erasure",
    "RECELoadErasure": "Load Erasure",
    "RECEExportErasureLoRA": "Export Erasure as LoRA",
    "RECELoadPublishedErasure": "Load Published Erasure",
    "RECECompareKVWeights": "Compare Cross-Attention Weights",
    "RECEUnlearnDiffAttack": "UnlearnDiff Attack",
    "RECERingABell": "Ring-A-Bell Attack",
}
NUDITY = dict(lamb=0.1, erase_scale=1.0, preserve_scale=0.1, reg_scale=0.1)


@pytest.fixture(scope="module")
def pack(comfy_nodes):
    return host.pack_module()


def rece_node(pack, model, clip, concepts="nudity", guide="", preserve="", preset="nudity", epochs=3,
              strength=1.0, **scales):
    numbers = dict(NUDITY, **scales)
    out = pack.NODE_CLASS_MAPPINGS["RECEEraseConcept"]().erase(
        model, clip, concepts, guide, preserve, preset, strength=strength, epochs=epochs, **numbers)
    return out


def uce_node(pack, model, clip, concepts="nudity", guide="", preserve="", preset="nudity", strength=1.0, **scales):
    out = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"]().erase(
        model, clip, concepts, guide, preserve, preset, strength=strength, **dict(NUDITY, **scales))
    return out


def derive_node(pack, model, clip, concept="nudity", reg_scale=0.1, original=None):
    out = pack.NODE_CLASS_MAPPINGS["RECEDeriveAdversarialEmbedding"]().derive(model, clip, concept, reg_scale, original)
    return out


def expected_erasure(glue, weights, clip, concepts, guide="", preserve=(), settings=None):
    settings = settings or rece_ops.preset("nudity").settings
    encoded = glue.text.encode_texts(clip, list(concepts))
    guides = glue.text.encode_texts(clip, [guide] * len(concepts))
    preserves = glue.text.encode_texts(clip, rece_ops.preserve_prompts(preserve))
    return rece_ops.erase(encoded, guides, preserves, settings, weights=weights)


def worst_error(got: dict, expected: dict) -> float:
    assert set(got) == set(expected)
    return max(relative_error(got[k], expected[k]) for k in got)


def sample(comfy_nodes, model, clip, positive=None, seed=7):
    with torch.inference_mode():
        if positive is None:
            (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of nudity")
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        (out,) = comfy_nodes.KSampler().sample(model, seed, 2, 7.0, "euler", "normal", positive, negative, latent)
    return out["samples"].clone()


# --------------------------------------------------------------------------- registration

def test_every_node_is_registered_with_its_display_name_category_and_description(pack):
    assert pack.NODE_DISPLAY_NAME_MAPPINGS == NODE_NAMES
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY == "RECE"
        assert len(cls.DESCRIPTION) > 80, name
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        inputs = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        for input_name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_erase_nodes_offer_the_published_presets_and_custom(pack):
    rece = pack.NODE_CLASS_MAPPINGS["RECEEraseConcept"].INPUT_TYPES()["required"]
    uce = pack.NODE_CLASS_MAPPINGS["UCEEraseConcept"].INPUT_TYPES()["required"]
    assert rece["preset"][0] == [*rece_ops.PRESETS, "custom"]
    assert rece["concepts"][1]["multiline"] and rece["preserve"][1]["multiline"]
    assert list(uce) == [k for k in rece if k != "epochs"]


# --------------------------------------------------------------------------- results

def test_rece_node_equals_rece_ops_on_the_same_weights_and_embeddings(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    erased, report = rece_node(pack, model, clip, concepts="nudity\nblood, gore", preserve="a portrait")
    weights = glue.weights.effective_kv_weights(model)
    erasure = expected_erasure(glue, weights, clip, ["nudity", "blood", "gore"], preserve=["a portrait"])
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(weights)) < 1e-6
    # Three concepts over four steps give more factor columns than d: the report
    # states the bound rather than pay for a d x d SVD.
    assert erasure.factors[0].shape[1] > 768 and "rank at most 768 of 768" in report
    assert "UCE step + 3 RECE epochs" in report and "'nudity', 'blood', 'gore'" in report
    assert "text encoding" in report and "algebra" in report and "recovers" in report


def test_uce_node_is_rece_without_epochs(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    erased, report = uce_node(pack, model, clip, concepts="golf ball", preset="object_easy")
    weights = glue.weights.effective_kv_weights(model)
    settings = rece_ops.preset("object_easy").settings.with_changes(epochs=0)
    erasure = expected_erasure(glue, weights, clip, ["golf ball"], settings=settings)
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(weights)) < 1e-6
    assert "UCE step only" in report


def test_custom_preset_uses_the_number_inputs_and_a_named_preset_ignores_them(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    custom, report = rece_node(pack, model, clip, preset="custom", epochs=1, lamb=0.5, preserve_scale=0.3, reg_scale=1e-3)
    weights = glue.weights.effective_kv_weights(model)
    settings = rece_ops.RECESettings(lamb=0.5, erase_scale=1.0, preserve_scale=0.3, reg_scale=1e-3, epochs=1)
    erasure = expected_erasure(glue, weights, clip, ["nudity"], settings=settings)
    assert worst_error(glue.weights.effective_kv_weights(custom), erasure.apply(weights)) < 1e-6
    assert "custom numbers" in report and "lamb 0.5" in report

    preset_run, _ = rece_node(pack, model, clip, preset="nudity", epochs=1, lamb=0.5)
    published = expected_erasure(glue, weights, clip, ["nudity"])
    assert worst_error(glue.weights.effective_kv_weights(preset_run), published.apply(weights)) < 1e-6


def test_guide_is_what_the_concepts_become(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    erased, report = rece_node(pack, model, clip, concepts="Kelly Mckernan", guide="art", preset="artistic_style",
                               preserve="Thomas Kinkade")
    weights = glue.weights.effective_kv_weights(model)
    erasure = expected_erasure(glue, weights, clip, ["Kelly Mckernan"], guide="art", preserve=["Thomas Kinkade"],
                               settings=rece_ops.preset("artistic_style").settings)
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(weights)) < 1e-6
    assert "-> 'art'" in report


def test_strength_scales_the_edit(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    half, report = rece_node(pack, model, clip, strength=0.5)
    weights = glue.weights.effective_kv_weights(model)
    erasure = expected_erasure(glue, weights, clip, ["nudity"])
    expected = {k: w + 0.5 * erasure.delta(w) for k, w in weights.items()}
    assert worst_error(glue.weights.effective_kv_weights(half), expected) < 1e-6
    assert "strength 0.5" in report
    full = rece_node(pack, model, clip)[1]
    changed = [float(re.search(r"weights changed ([\d.]+)%", r).group(1)) for r in (report, full)]
    assert changed[0] == pytest.approx(changed[1] / 2, abs=0.01)  # |W (T_s - I)| is linear in s


def test_every_node_leaves_its_input_models_bit_identical(pack, comfy_nodes, slim_sd15, model_fingerprint):
    model, clip, _ = slim_sd15
    before_hash = model_fingerprint(model)
    before = sample(comfy_nodes, model, clip)
    erased, _ = rece_node(pack, model, clip)
    uce_erased, _ = uce_node(pack, model, clip)
    erased_hash = model_fingerprint(erased)
    derive_node(pack, erased, clip)
    derive_node(pack, uce_erased, clip, original=model)
    assert model_fingerprint(erased) == erased_hash
    erased_latent = sample(comfy_nodes, erased, clip)
    after = sample(comfy_nodes, model, clip)
    assert model_fingerprint(model) == before_hash
    assert torch.equal(before, after)
    assert torch.isfinite(erased_latent).all() and not torch.equal(before, erased_latent)


def test_two_chained_erasures_equal_both_edits_applied_in_order(pack, glue, slim_sd15):
    model, clip, _ = slim_sd15
    first, _ = rece_node(pack, model, clip, concepts="nudity")
    second, _ = rece_node(pack, first, clip, concepts="blood")
    weights = glue.weights.effective_kv_weights(model)
    after_first = expected_erasure(glue, weights, clip, ["nudity"]).apply(weights)
    after_both = expected_erasure(glue, after_first, clip, ["blood"]).apply(after_first)
    assert worst_error(glue.weights.effective_kv_weights(second), after_both) < 1e-5
    # The chain remembers the model before its first erasure and both records.
    state = host.pack_module("nodes.erasure_state")
    assert state.original_model(second) is model
    assert [r.erasure.concepts for r in state.erasure_records(second)] == [("nudity",), ("blood",)]


def kohya_lora(model, keys, rank=4, seed=5) -> dict[str, torch.Tensor]:
    """A LoRA on the given K/V keys in the kohya format LoraLoader reads."""
    generator = torch.Generator().manual_seed(seed)
    state = model.model_state_dict("diffusion_model.")
    lora = {}
    for key in keys:
        out_dim, in_dim = state[key].shape
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        lora[f"{name}.lora_up.weight"] = 0.05 * torch.randn(out_dim, rank, generator=generator)
        lora[f"{name}.lora_down.weight"] = 0.05 * torch.randn(rank, in_dim, generator=generator)
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def test_a_lora_upstream_is_part_of_the_weights_the_edit_starts_from(pack, glue, slim_sd15):
    import comfy.sd

    model, clip, _ = slim_sd15
    keys = glue.weights.kv_keys(model)
    lora = kohya_lora(model, keys[:4])
    with torch.inference_mode():
        lora_model, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0.0)
    plain = glue.weights.effective_kv_weights(model)
    with_lora = glue.weights.effective_kv_weights(lora_model)
    assert relative_error(with_lora[keys[0]], plain[keys[0]]) > 1e-3  # the LoRA is really there

    erased, _ = rece_node(pack, lora_model, clip)
    erasure = expected_erasure(glue, with_lora, clip, ["nudity"])
    assert worst_error(glue.weights.effective_kv_weights(erased), erasure.apply(with_lora)) < 1e-6


# --------------------------------------------------------------------------- progress, cancel, cache

class BarUpdates(list):
    """Every ``(value, total)`` the pack gives its progress bars, in order.

    Read where the pack calls ``ProgressBar.update_absolute``, not in the
    host's hook: ComfyUI 0.33 throttles the hook (at most one call per 100 ms
    and 0.5%, first and last always), 0.3.75 calls it on every update.
    ``on_update``, when set, runs before each update reaches the bar.
    """

    on_update = None


@pytest.fixture
def bar_updates(monkeypatch):
    import comfy.utils

    updates = BarUpdates()
    update_absolute = comfy.utils.ProgressBar.update_absolute

    def recording(bar, value, total=None, preview=None):
        updates.append((value, bar.total if total is None else total))
        if updates.on_update is not None:
            updates.on_update(value)
        return update_absolute(bar, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", recording)
    return updates


@pytest.fixture
def progress_hook():
    """What the host's progress hook (the page's bar) receives."""
    import comfy.utils

    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    yield calls
    comfy.utils.set_progress_bar_global_hook(previous)


PHASE = 100  # progress units per phase of a node (nodes/progress.py)


def test_progress_bar_fills_once_over_every_phase_to_the_end(pack, slim_sd15, bar_updates, progress_hook):
    rece_node(pack, *slim_sd15[:2], epochs=3)
    # text, K/V weights, G, the algebra, patches, report: the bar is full only after the report.
    assert bar_updates[-1] == (6 * PHASE, 6 * PHASE)
    assert {total for _, total in bar_updates} == {6 * PHASE}
    values = [v for v, _ in bar_updates]
    assert values == sorted(values) and values.count(6 * PHASE) == 1
    # The page sees the same bar, however often its host passes updates on.
    assert progress_hook[-1] == (6 * PHASE, 6 * PHASE)
    assert set(progress_hook) <= set(bar_updates) and progress_hook == sorted(progress_hook)
    assert 5 * PHASE in values  # the patches are done before the report
    assert {3 * PHASE + PHASE * k // 4 for k in (1, 2, 3)} <= set(values)  # the UCE step, then each epoch


def test_derive_progress_bar_fills_once_over_every_phase_and_leaves_its_models_unchanged(
        pack, slim_sd15, bar_updates, model_fingerprint):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    before = model_fingerprint(model), model_fingerprint(erased)
    bar_updates.clear()
    derive_node(pack, erased, clip)
    assert bar_updates[-1] == (6 * PHASE, 6 * PHASE)
    assert [v for v, _ in bar_updates] == sorted(v for v, _ in bar_updates)
    assert (model_fingerprint(model), model_fingerprint(erased)) == before


@pytest.mark.parametrize("phase, cancel_at", [
    ("after the text encoding", PHASE),
    ("after G", 3 * PHASE),
    ("after the UCE step, before the epochs", 3 * PHASE + PHASE // 4),
    ("after the patches, before the report", 5 * PHASE),
])
def test_cancel_stops_the_erase_with_nothing_applied(pack, slim_sd15, model_fingerprint, bar_updates,
                                                     phase, cancel_at):
    import comfy.model_management as mm

    model, clip, _ = slim_sd15
    before = model_fingerprint(model)

    def press_cancel(value):
        if value >= cancel_at:
            mm.interrupt_current_processing(True)  # the user presses cancel here

    # Pressed as the bar reaches the phase, whether or not the host's
    # (throttled) hook, where ComfyUI itself checks cancel, is called then.
    bar_updates.on_update = press_cancel
    try:
        with pytest.raises(mm.InterruptProcessingException):
            rece_node(pack, model, clip, concepts="a cancelled concept", epochs=3)
    finally:
        mm.interrupt_current_processing(False)
    # The pack's own check stopped it at the next step, before the bar moved again.
    values = [v for v, _ in bar_updates]
    assert values[-1] >= cancel_at and all(v < cancel_at for v in values[:-1])
    assert model_fingerprint(model) == before


def test_gram_matrix_is_reused_for_the_same_weights_and_recomputed_for_new_ones(pack, slim_sd15):
    model, clip, _ = slim_sd15
    cache = host.pack_module("nodes.erase_concept").GRAM_CACHE
    erased, _ = rece_node(pack, model, clip, strength=0.37)  # weights no other test makes
    misses = cache.misses
    _, report = uce_node(pack, model, clip, concepts="blood")
    assert cache.misses == misses and "G reused" in report
    _, report = rece_node(pack, erased, clip, concepts="blood")
    assert cache.misses == misses + 1 and "G reused" not in report


# --------------------------------------------------------------------------- refusals

class WidenedClip:
    """A CLIP whose embeddings are changed (wider, or NaN), to test refusals."""

    def __init__(self, clip, width=None, nan=False):
        self.clip, self.width, self.nan = clip, width, nan

    def tokenize(self, text):
        return self.clip.tokenize(text)

    def encode_from_tokens(self, tokens, return_pooled=False):
        rows, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        if self.width:
            rows = torch.nn.functional.pad(rows, (0, self.width - rows.shape[-1]))
        if self.nan:
            rows = rows.clone()
            rows[0, 3, 5] = float("nan")
        return (rows, pooled) if return_pooled else rows


class ForeignModel:
    """A MODEL of another family, as far as the erase nodes look: ComfyUI's own
    model config class and a denoiser with (or without) a cross-attention
    layer on a text context."""

    def __init__(self, family: str, cross_attention: bool):
        import comfy.supported_models

        config_class = getattr(comfy.supported_models, family)
        config = config_class(dict(config_class.unet_config))
        width = config.unet_config.get("context_dim") or 64
        attention = torch.nn.Module()
        attention.to_q = torch.nn.Linear(32, 32, bias=False)
        attention.to_k = torch.nn.Linear(width if cross_attention else 32, 32, bias=False)
        attention.to_v = torch.nn.Linear(width if cross_attention else 32, 32, bias=False)
        denoiser = torch.nn.Module()
        denoiser.block = attention
        self.model = type("BaseModel", (), {"model_config": config, "diffusion_model": denoiser})()

    def model_state_dict(self, filter_prefix=None):
        return {}


def nan_model(glue, model):
    key = glue.weights.kv_keys(model)[0]
    broken = model.clone()
    broken.add_patches({key: (torch.full(model.model_state_dict("diffusion_model.")[key].shape, float("nan")),)}, 1.0)
    return broken


REFUSALS = {
    "no concepts": (lambda glue, m, c: (m, c, {"concepts": " \n , "}), "no concepts to erase"),
    "no cross-attention": (lambda glue, m, c: (ForeignModel("Flux", cross_attention=False), c, {}),
                           r"\(Flux\) has no cross-attention key/value projections.*SD1\.x.*SD2\.x.*SDXL.*Flux, SD3"),
    "untested family": (lambda glue, m, c: (ForeignModel("SDXLRefiner", cross_attention=True), c, {}),
                        r"\(SDXLRefiner\) has cross-attention on a text context, but this pack is not tested on"),
    "CLIP width": (lambda glue, m, c: (m, WidenedClip(c, width=1024), {}),
                   "CLIP gives 1024-wide embeddings but this MODEL's cross-attention reads a 768-wide"),
    "NaN weights": (lambda glue, m, c: (nan_model(glue, m), c, {}), "NaN or infinite"),
    "NaN embedding": (lambda glue, m, c: (m, WidenedClip(c, nan=True), {}), "NaN or infinite"),
    "lamb zero": (lambda glue, m, c: (m, c, {"preset": "custom", "lamb": 0.0}), "lamb must be > 0"),
    # An API prompt can send NaN; ComfyUI's min/max check lets it through.
    "NaN strength": (lambda glue, m, c: (m, c, {"strength": float("nan")}), "strength must be a finite number"),
    "guide is a concept": (lambda glue, m, c: (m, c, {"concepts": "nudity", "guide": "Nudity"}), "guide 'Nudity' is also a concept"),
    "erased and preserved": (lambda glue, m, c: (m, c, {"concepts": "nudity\nblood", "preserve": "blood"}),
                             "'blood' is both erased and preserved"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_input_is_refused_with_a_clear_message_and_nothing_changed(case, pack, glue, slim_sd15, model_fingerprint):
    make, message = REFUSALS[case]
    model, clip, extra = make(glue, *slim_sd15[:2])
    before = model_fingerprint(slim_sd15[0])
    for node in (rece_node, uce_node):
        kwargs = {k: v for k, v in extra.items() if node is rece_node or k != "epochs"}
        with pytest.raises(ValueError, match=message):
            node(pack, model, clip, **kwargs)
    assert model_fingerprint(slim_sd15[0]) == before


def test_derive_refuses_a_model_that_is_not_erased_without_an_original(pack, slim_sd15):
    model, clip, _ = slim_sd15
    with pytest.raises(ValueError, match="not erased by a RECE/UCE node.*connect the model before erasure"):
        derive_node(pack, model, clip)
    with pytest.raises(ValueError, match="nothing was erased"):
        derive_node(pack, model, clip, original=model)


def test_derive_refuses_an_empty_concept_and_a_mismatched_clip(pack, slim_sd15):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    with pytest.raises(ValueError, match="no concept given"):
        derive_node(pack, erased, clip, concept="  ")
    with pytest.raises(ValueError, match="CLIP gives 1024-wide"):
        derive_node(pack, erased, WidenedClip(clip, width=1024))


# --------------------------------------------------------------------------- Derive Adversarial Embedding

def test_derived_embedding_is_rece_closed_form_against_the_erased_model(pack, glue, slim_sd15, comfy_nodes):
    model, clip, _ = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    conditioning, report = derive_node(pack, erased, clip, reg_scale=0.1)
    weights = glue.weights.effective_kv_weights(model)
    erasure = expected_erasure(glue, weights, clip, ["nudity"])
    concept = glue.text.encode_text(clip, "nudity")
    expected = rece_ops.adversarial_embedding(concept.rows, erasure.transform, rece_ops.gram(weights), 0.1)
    ((embedding, extras),) = conditioning
    assert embedding.shape == (1, 77, 768) and "pooled_output" in extras
    assert relative_error(embedding[0], expected) < 1e-5
    assert "model before its erasure" in report and "misses by" in report
    # It is CONDITIONING a KSampler takes.
    latent = sample(comfy_nodes, erased, clip, positive=conditioning)
    assert torch.isfinite(latent).all()


def test_derive_with_an_explicit_original_matches_the_default(pack, slim_sd15):
    model, clip, _ = slim_sd15
    erased, _ = uce_node(pack, model, clip)
    default, _ = derive_node(pack, erased, clip)
    explicit, report = derive_node(pack, erased, clip, original=model)
    assert torch.equal(default[0][0], explicit[0][0])
    assert "original_model input" in report


def test_derive_works_on_an_erased_checkpoint_saved_and_reloaded(pack, glue, slim_sd15, comfy_nodes, tmp_path):
    model, clip, vae = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    reloaded = save_and_reload(comfy_nodes, erased, clip, vae, tmp_path)
    with pytest.raises(ValueError, match="connect the model before erasure to 'original_model'"):
        derive_node(pack, reloaded, clip)
    from_file, _ = derive_node(pack, reloaded, clip, original=model)
    in_graph, _ = derive_node(pack, erased, clip)
    # The checkpoint stores the erased weights in fp16.
    assert relative_error(from_file[0][0], in_graph[0][0]) < 2e-2


# --------------------------------------------------------------------------- saving

def save_and_reload(comfy_nodes, model, clip, vae, folder):
    import folder_paths

    output = folder_paths.get_output_directory()
    before = set(folder_paths.get_output_directory and __import__("pathlib").Path(output).rglob("*.safetensors"))
    prefix = f"checkpoints/{folder.name}"
    with torch.inference_mode():
        comfy_nodes.NODE_CLASS_MAPPINGS["CheckpointSave"]().save(model, clip, vae, filename_prefix=prefix)
    (saved,) = set(__import__("pathlib").Path(output).rglob("*.safetensors")) - before
    folder_paths.add_model_folder_path("checkpoints", str(saved.parent))
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(saved.name)[0]


def test_comfyui_checkpoint_save_writes_the_erased_weights(pack, glue, slim_sd15, comfy_nodes, tmp_path):
    model, clip, vae = slim_sd15
    erased, _ = rece_node(pack, model, clip)
    reloaded = save_and_reload(comfy_nodes, erased, clip, vae, tmp_path)
    expected = glue.weights.effective_kv_weights(erased)
    got = glue.weights.effective_kv_weights(reloaded)
    assert worst_error(got, expected) < 2e-3  # fp16 storage
    original = glue.weights.effective_kv_weights(model)
    assert min(relative_error(got[k], original[k]) for k in got) > 1e-3


# --------------------------------------------------------------------------- held-out parity through the node

class FixtureClip:
    """A CLIP that returns a fixture's embeddings, so the node runs on exactly
    the inputs the naive reference used."""

    def __init__(self, texts):
        self.rows = {tuple(fake_token_ids(t.text).tolist()): t.rows for t in texts}

    def tokenize(self, text):
        return {"l": [[(int(i), 1.0, 0) for i in fake_token_ids(text)]]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        # Several chunks (texts encoded together) come back one after another, as from ComfyUI's CLIP.
        rows = torch.cat([self.rows[tuple(t[0] for t in chunk)] for chunk in tokens["l"]]).float().unsqueeze(0)
        return (rows, None) if return_pooled else rows


# Node-shaped held-out cases (one guide for all concepts, one preserve list).
NODE_PARITY = {
    "uce_two_concepts_preserve": dict(node="UCE", concepts=[2, 1], guide=0, preserves=[3], settings=dict(NUDITY, epochs=0)),
    "artist_to_art_epochs1_lamb0.5_preserve0.3_reg1e-3": dict(
        node="RECE", concepts=[2], guide=1, preserves=[2, 2],
        settings=dict(lamb=0.5, erase_scale=1.0, preserve_scale=0.3, reg_scale=1e-3, epochs=1)),
    "two_concepts_epochs4_erase2": dict(
        node="RECE", concepts=[2, 1], guide=0, preserves=[],
        settings=dict(lamb=0.1, erase_scale=2.0, preserve_scale=0.3, reg_scale=0.1, epochs=4)),
}


@pytest.mark.parametrize("case", list(NODE_PARITY))
def test_held_out_reference_cases_through_the_node(case, pack, glue, slim_sd15):
    spec = NODE_PARITY[case]
    model = slim_sd15[0]
    keys = glue.weights.kv_keys(model)
    # Effective, not stored, weights: sampling an erased clone patches the shared weights in place.
    base = glue.weights.effective_kv_weights(model)
    problem = random_problem(
        zlib.crc32(case.encode()) % 1000, width=768, n_tokens=77, d_outs=[base[k].shape[0] for k in keys],
        concept_words=spec["concepts"], guide_words=[spec["guide"]] * len(spec["concepts"]),
        preserve_words=spec["preserves"])
    reference_weights = dict(zip(keys, problem.weights.values()))
    # The MODEL gets the reference weights as patches, as any upstream edit would.
    start = model.clone()
    start.add_patches({k: (reference_weights[k].float() - base[k],) for k in keys}, 1.0)
    clip = FixtureClip(problem.concepts + problem.guides[:1] + problem.preserves)
    settings = spec["settings"]
    concepts = "\n".join(c.text for c in problem.concepts)
    guide = problem.guides[0].text.strip()
    preserve = "\n".join(p.text for p in problem.preserves[1:])
    scales = {k: settings[k] for k in NUDITY}
    if spec["node"] == "UCE":
        erased, _ = uce_node(pack, start, clip, concepts, guide, preserve, preset="custom", **scales)
    else:
        erased, _ = rece_node(pack, start, clip, concepts, guide, preserve, preset="custom",
                              epochs=settings["epochs"], **scales)
    states, _ = naive_rece(reference_weights, problem.concepts, problem.guides, problem.preserves, None, settings)
    final = states["after_uce"] if settings["epochs"] == 0 else states[f"after_epoch{settings['epochs'] - 1}"]
    assert worst_error(glue.weights.effective_kv_weights(erased), final) < 1e-5

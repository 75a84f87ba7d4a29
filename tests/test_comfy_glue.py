"""The pack's ComfyUI glue on a real ComfyUI (in-process) and the slim SD1.5 checkpoint."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

import rece_ops
from devkit import host, paths
from conftest import stored_weights
from rece_ops.parity import relative_error


def sample(comfy_nodes, model, clip, seed=7, steps=2):
    with torch.inference_mode():
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of nudity")
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        (out,) = comfy_nodes.KSampler().sample(model, seed, steps, 7.0, "euler", "normal", positive, negative, latent)
    return out["samples"].clone()


def erase_with_glue(glue, model, clip, concepts=("nudity",), preserve=()):
    weights = glue.weights.effective_kv_weights(model)
    settings = rece_ops.preset("nudity").settings
    encoded = glue.text.encode_texts(clip, list(concepts))
    guides = glue.text.encode_texts(clip, [""] * len(concepts))
    preserves = glue.text.encode_texts(clip, rece_ops.preserve_prompts(preserve))
    erasure = rece_ops.erase(encoded, guides, preserves, settings, weights=weights)
    return weights, erasure, glue.weights.patched_clone(model, erasure.deltas(weights))


def test_comfyui_loads_the_pack_as_a_custom_node(comfy_nodes):
    pack = host.pack_module()
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    loaded_dirs = {str(p) for p in comfy_nodes.LOADED_MODULE_DIRS.values()}
    assert any(paths.PACK_LINK_NAME in d or d == str(paths.REPO_ROOT) for d in loaded_dirs)


def test_kv_keys_are_every_cross_attention_key_and_value(slim_sd15, glue):
    model = slim_sd15[0]
    keys = glue.weights.kv_keys(model)
    state = model.model_state_dict("diffusion_model.")
    assert keys == sorted(k for k in state if ".attn2.to_k.weight" in k or ".attn2.to_v.weight" in k)
    assert len(keys) % 2 == 0 and len(keys) >= 2
    assert {state[k].shape[1] for k in keys} == {768}


def test_effective_weights_without_patches_are_the_stored_weights(slim_sd15, glue):
    model = slim_sd15[0]
    state = stored_weights(model, "diffusion_model.")
    weights = glue.weights.effective_kv_weights(model)
    for key, weight in weights.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight.cpu(), state[key].float().cpu())


def test_effective_weights_include_patches_added_upstream(slim_sd15, glue):
    model = slim_sd15[0]
    key = glue.weights.kv_keys(model)[0]
    base = stored_weights(model, "diffusion_model.")[key].float()
    delta = torch.randn(base.shape, generator=torch.Generator().manual_seed(3)) * 0.01
    upstream = model.clone()
    upstream.add_patches({key: (delta,)}, 0.5)
    weight = glue.weights.effective_kv_weights(upstream)[key].cpu()
    assert relative_error(weight, base + 0.5 * delta) < 1e-6


def test_text_encoding_counts_words_and_treats_blank_as_empty_prompt(slim_sd15, glue):
    clip = slim_sd15[1]
    empty, blank, word = glue.text.encode_texts(clip, ["", " ", "nudity"])
    assert empty.n_words == 0 and blank.n_words == 0
    assert torch.equal(empty.rows, blank.rows)
    ids = [t[0] for t in next(iter(clip.tokenize("nudity").values()))[0]]
    assert word.n_words == rece_ops.count_words(ids) >= 1
    assert word.rows.shape == (77, 768)


def test_text_longer_than_one_chunk_is_encoded_chunk_by_chunk(slim_sd15, glue):
    clip = slim_sd15[1]
    long = glue.text.encode_text(clip, "word " * 100)
    assert long.n_chunks == 2 and long.rows.shape == (154, 768)
    assert sum(long.chunk_words) == 100 and all(0 < w <= 75 for w in long.chunk_words)
    # The rows are exactly what CLIPTextEncode gives a sampler.
    rows = clip.encode_from_tokens(clip.tokenize("word " * 100))[0]
    assert torch.equal(long.rows, rows.float())


def test_erase_through_comfyui_equals_rece_ops_on_the_same_weights(slim_sd15, glue):
    model, clip, _ = slim_sd15
    weights, erasure, erased = erase_with_glue(glue, model, clip)
    expected = erasure.apply(weights)
    got = glue.weights.effective_kv_weights(erased)
    assert set(got) == set(expected)
    worst = max(relative_error(got[k], expected[k]) for k in got)
    assert worst < 1e-6
    # Patches are stored in the model's weight dtype; they did change every K/V matrix.
    assert min(relative_error(got[k], weights[k]) for k in got) > 1e-4


def test_erasing_leaves_the_input_model_bit_identical(slim_sd15, glue, comfy_nodes, model_fingerprint):
    model, clip, _ = slim_sd15
    before_hash = model_fingerprint(model)
    before = sample(comfy_nodes, model, clip)
    _, _, erased = erase_with_glue(glue, model, clip)
    erased_latent = sample(comfy_nodes, erased, clip)
    after = sample(comfy_nodes, model, clip)
    assert model_fingerprint(model) == before_hash
    assert torch.equal(before, after)
    assert torch.isfinite(erased_latent).all()
    assert not torch.equal(before, erased_latent)


def test_patch_strength_scales_the_edit(slim_sd15, glue):
    model, clip, _ = slim_sd15
    weights, erasure, _ = erase_with_glue(glue, model, clip)
    half = glue.weights.patched_clone(model, erasure.deltas(weights), strength=0.5)
    got = glue.weights.effective_kv_weights(half)
    for key, weight in weights.items():
        assert relative_error(got[key], weight + 0.5 * erasure.delta(weight)) < 1e-6


def test_nan_weights_are_refused_before_anything_is_erased(slim_sd15, glue):
    model = slim_sd15[0]
    key = glue.weights.kv_keys(model)[0]
    broken = model.clone()
    shape = model.model_state_dict("diffusion_model.")[key].shape
    broken.add_patches({key: (torch.full(shape, float("nan")),)}, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        glue.weights.effective_kv_weights(broken)


def test_main_job_erases_and_saves_a_checkpoint_comfyui_loads_back(tmp_path, comfy_nodes, glue):
    # The slim random-weight checkpoint named explicitly (the default is now the trained demo model),
    # at the small size and step count the demo used to run with.
    result = run_main_job(str(paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME), "--concepts", "nudity",
                          "--size", "64", "--steps", "4", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for label in ("checkpoint", "workflow", "RECE erased 'nudity'", "comparison", "saved", "time"):
        assert any(line.startswith(label) for line in out.splitlines()), out
    (image,) = sorted(tmp_path.glob("rece_compare_*.png"))
    assert image.stat().st_size > 0
    # 'nudity' is two CLIP tokens: 75 UCE rows + 3 epochs x 77 rows bound the rank (spec).
    rank = int(re.search(r"rank (\d+) of 768", out).group(1))
    assert 0 < rank <= 306
    saved = sorted(tmp_path.rglob("*.safetensors"))
    assert len(saved) == 1, out
    # Written in a per-run staging folder, published under ComfyUI's counter name once complete.
    assert saved[0] == tmp_path / "checkpoints" / "rece_nudity_00001_.safetensors"
    assert f"saved           {saved[0]}" in out and not list(tmp_path.glob(".rece-partial-*"))

    import folder_paths

    folder_paths.add_model_folder_path("checkpoints", str(saved[0].parent))
    with torch.inference_mode():
        reloaded = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(saved[0].name)[0]
        original, clip, _ = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(paths.SLIM_SD15_NAME)[:3]
    weights, erasure, _ = erase_with_glue(glue, original, clip)
    expected = erasure.apply(weights)
    got = glue.weights.effective_kv_weights(reloaded)
    # The checkpoint stores fp16 weights: compare at fp16 precision.
    assert max(relative_error(got[k], expected[k]) for k in got) < 2e-3
    assert min(relative_error(got[k], weights[k]) for k in got) > 1e-3


def test_model_without_cross_attention_is_refused_naming_what_is_supported(glue):
    class NoCrossAttention:
        """Stands for a MODEL whose denoiser has no attn2 (Flux, SD3 ...)."""

        def model_state_dict(self, filter_prefix=None):
            return {"diffusion_model.double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 3)}

    with pytest.raises(ValueError, match=r"no cross-attention key/value projections.*supported: SD1\.x"):
        glue.weights.kv_keys(NoCrossAttention())


def run_main_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/erase_checkpoint.py", *args],
        cwd=paths.REPO_ROOT, capture_output=True, text=True, timeout=600,
    )


def test_main_job_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_text("not a model")
    result = run_main_job(str(fake), "--no-save")
    assert result.returncode != 0
    assert "is not a .safetensors checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_main_job_reports_bad_input_in_one_line_and_saves_nothing(tmp_path):
    # Refused by the node inside ComfyUI, reported by the script in one line.
    result = run_main_job("--concepts", "nudity", "--guide", "Nudity", "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "is also a concept" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.safetensors"))
    assert not list(tmp_path.glob(".rece-partial-*"))  # the per-run staging folder is gone too


def test_main_job_publishes_a_staged_checkpoint_under_the_next_free_number_and_keeps_every_file(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("erase_checkpoint", paths.REPO_ROOT / "scripts" / "erase_checkpoint.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    staged = tmp_path / ".rece-partial-1" / "checkpoints" / "rece_x_00001_.safetensors"
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"complete")
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "rece_x_00003_.safetensors").write_bytes(b"a user's file")
    (folder / "rece_xy_00009_.safetensors").write_bytes(b"another prefix")
    first = job.publish(staged, tmp_path, "checkpoints/rece_x")
    second = job.publish(staged, tmp_path, "checkpoints/rece_x")
    assert (first.name, second.name) == ("rece_x_00004_.safetensors", "rece_x_00005_.safetensors")
    assert (folder / "rece_x_00003_.safetensors").read_bytes() == b"a user's file"
    assert first.read_bytes() == second.read_bytes() == b"complete"

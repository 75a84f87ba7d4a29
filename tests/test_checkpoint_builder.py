"""devkit.checkpoint_builder against the real ComfyUI, imported in this process.

Each worker builds its own slim checkpoint into a temporary folder, registers
that folder as a ComfyUI checkpoint folder and loads it by name with
``CheckpointLoaderSimple``. The full-size variant is checked only by shape
(meta tensors), never built here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from devkit import checkpoint_builder as cb
from devkit import host

SLIM = "sd15-slim"
CLIP_NOT_IN_FILES = {"clip_l.logit_scale", "clip_l.transformer.text_projection.weight"}
# ComfyUI's messages about keys it could not place (comfy/sd.py, comfy/model_base.py).
KEY_PROBLEMS = ("unet missing", "unet unexpected", "Missing VAE keys", "Leftover VAE keys", "clip unexpected")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def strip(prefix: str, state: dict) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="session")
def slim_file(comfy_nodes, tmp_path_factory) -> Path:
    """A slim seed-0 build in a folder ComfyUI searches for checkpoints."""
    import folder_paths

    folder = tmp_path_factory.mktemp("checkpoints")
    target = cb.build_checkpoint(folder / f"builder_test_slim_{os.getpid()}.safetensors", variant=SLIM, seed=0)
    folder_paths.add_model_folder_path("checkpoints", str(folder))
    return target


@pytest.fixture(scope="session")
def slim_tensors(slim_file) -> dict[str, torch.Tensor]:
    return load_file(str(slim_file))


@pytest.fixture(scope="session")
def loaded(comfy_nodes, slim_file):
    """(model, clip, vae, log records) from CheckpointLoaderSimple, loading as ComfyUI's executor does."""
    records = _Records()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with torch.inference_mode():
            model, clip, vae = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(slim_file.name)
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)
    return model, clip, vae, records.records


def test_same_seed_gives_identical_bytes_other_seed_other_values(slim_file, slim_tensors, tmp_path):
    again = tmp_path / "again.safetensors"
    assert cb.main([str(again), "--variant", SLIM, "--seed", "0"]) == 0
    assert sha256(again) == sha256(slim_file)

    layout = cb.checkpoint_layout(SLIM)
    other = cb.build_state_dict(SLIM, seed=1)
    assert other.keys() == slim_tensors.keys() == layout.keys()
    for key, (_shape, kind) in layout.items():
        if kind == "normal":
            assert not torch.equal(other[key], slim_tensors[key]), key
        else:  # ones, zeros, constants do not depend on the seed
            assert torch.equal(other[key], slim_tensors[key]), key


def test_values_follow_the_init_rules_and_not_key_order(slim_tensors):
    layout = cb.checkpoint_layout(SLIM)
    kinds = {kind for _shape, kind in layout.values()}
    assert kinds == {"normal", "ones", "zeros", "const"}
    for key, (shape, kind) in layout.items():
        tensor = slim_tensors[key]
        assert tensor.dtype == torch.float16 and tuple(tensor.shape) == shape, key
        if kind == "ones":
            assert torch.all(tensor == 1), key
        elif kind == "zeros":
            assert torch.all(tensor == 0), key
        elif kind == "normal" and tensor.numel() >= 10_000:
            assert abs(tensor.float().std().item() - 0.02) < 0.001, key
            assert abs(tensor.float().mean().item()) < 0.001, key
    assert slim_tensors["first_stage_model.vae_scale"].item() == pytest.approx(0.18215, rel=1e-3)
    assert slim_tensors["first_stage_model.vae_shift"].item() == 0
    # Each tensor comes from its key alone: rebuilt on its own, in reverse order, it matches.
    some = [k for k, (_s, kind) in layout.items() if kind == "normal"][::-40]
    for key in some:
        shape, kind = layout[key]
        assert torch.equal(cb.init_tensor(key, shape, kind, seed=0), slim_tensors[key]), key


@pytest.mark.parametrize("variant, cross_attention_layers, unet_params", [
    ("sd15-slim", 7, 44_291_844),
    ("sd15-full", 16, 859_520_964),  # the published SD1.5 UNet size
])
def test_layout_is_detected_by_comfyui_as_the_intended_sd15(comfy_nodes, variant, cross_attention_layers, unet_params):
    import comfy.model_detection

    layout = cb.checkpoint_layout(variant)
    meta = {k: torch.empty(shape, device="meta") for k, (shape, _kind) in layout.items()}
    assert comfy.model_detection.unet_prefix_from_state_dict(meta) == cb.UNET_PREFIX
    detected = comfy.model_detection.detect_unet_config(meta, cb.UNET_PREFIX)
    assert detected == cb.UNET_CONFIGS[variant]
    model_config = comfy.model_detection.model_config_from_unet(meta, cb.UNET_PREFIX)
    assert type(model_config).__name__ == "SD15"

    def params(prefix):
        return sum(t.numel() for k, t in meta.items() if k.startswith(prefix))

    # Distinct per-key generator seeds: no two tensors of a file share a random stream.
    assert len({zlib.crc32(k.encode()) for k in layout}) == len(layout)
    assert params(cb.UNET_PREFIX) == unet_params
    assert params(cb.CLIP_PREFIX) == 123_060_480  # CLIP-L text model, no text_projection
    assert params(cb.VAE_PREFIX) == (83_653_863 if variant == "sd15-full" else 2_445_065)
    assert len(cb.unet_cross_attention_keys(variant)) == 2 * cross_attention_layers
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in layout if k.startswith(cb.CLIP_PREFIX))
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.k_proj.weight" in layout
    if variant == "sd15-full":
        assert layout["first_stage_model.decoder.mid.attn_1.q.weight"][0] == (512, 512, 1, 1)
        assert layout["first_stage_model.quant_conv.weight"][0] == (8, 8, 1, 1)
    else:
        assert layout["first_stage_model.taesd_decoder.1.weight"][0] == (64, 4, 3, 3)


def test_comfyui_loads_every_key_and_detects_sd15(loaded, slim_tensors):
    model, clip, vae, records = loaded
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    messages = [r.getMessage() for r in records]
    assert not [m for m in messages if m.startswith(KEY_PROBLEMS)]
    for message in messages:
        if message.startswith("clip missing"):
            assert all(name in message for name in CLIP_NOT_IN_FILES) and message.count("'") == 4

    unet_file = strip(cb.UNET_PREFIX, slim_tensors)
    clip_file = {"clip_l." + k: v for k, v in strip(cb.CLIP_PREFIX, slim_tensors).items()}
    vae_file = strip(cb.VAE_PREFIX, slim_tensors)
    assert len(unet_file) + len(clip_file) + len(vae_file) == len(slim_tensors)  # nothing else in the file
    for module, expected, extra in (
        (model.model.diffusion_model, unet_file, set()),
        (clip.cond_stage_model, clip_file, CLIP_NOT_IN_FILES),
        (vae.first_stage_model, vae_file, set()),
    ):
        actual = module.state_dict()
        assert actual.keys() - extra == expected.keys()
        for key, value in expected.items():
            assert actual[key].shape == value.shape, key
            assert torch.equal(actual[key].float(), value.float()), key


def test_sampling_and_decoding_are_finite(comfy_nodes, loaded):
    model, clip, vae, _records = loaded
    with torch.inference_mode():
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        assert positive[0][0].shape == (1, 77, 768)
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)
        (sampled,) = comfy_nodes.KSampler().sample(model, 7, 4, 7.0, "euler", "normal", positive, negative, latent)
        samples = sampled["samples"]
        assert samples.shape == (1, 4, 8, 8)
        assert torch.isfinite(samples).all() and samples.abs().max() > 0
        (image,) = comfy_nodes.VAEDecode().decode(vae, sampled)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all()
    assert image.min() >= 0 and image.max() <= 1


def test_cross_attention_kv_keys_read_768_wide_context(loaded):
    model = loaded[0]
    state = model.model_state_dict("diffusion_model.")
    kv = sorted(k for k in state if k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")))
    assert len(kv) == 14  # 7 cross-attention layers: 2 down, 1 middle, 4 up
    assert all(state[k].shape == (320, 768) for k in kv)
    assert kv == sorted("diffusion_model." + k[len(cb.UNET_PREFIX):] for k in cb.unet_cross_attention_keys(SLIM))


def test_never_overwrites_unless_asked_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(FileExistsError):
        cb.build_checkpoint(target, variant=SLIM, seed=1)
    assert cb.main([str(target), "--seed", "1"]) == 1
    assert target.read_bytes() == b"not a checkpoint"

    assert cb.build_checkpoint(target, variant=SLIM, seed=1, overwrite=True) == target
    with safe_open(str(target), "pt") as handle:
        assert json.loads(handle.metadata()[cb.METADATA_KEY]) == {"seed": 1, "variant": SLIM}
        assert set(handle.keys()) == set(cb.checkpoint_layout(SLIM))
    assert os.listdir(tmp_path) == ["exists.safetensors"]


def test_rejects_unknown_variant_and_bad_seed(tmp_path):
    with pytest.raises(ValueError, match="unknown variant"):
        cb.build_checkpoint(tmp_path / "x.safetensors", variant="sdxl")
    with pytest.raises(ValueError, match="seed"):
        cb.build_checkpoint(tmp_path / "x.safetensors", seed=-1)
    with pytest.raises(ValueError, match="seed"):
        cb.build_state_dict(SLIM, seed=2**32)
    assert os.listdir(tmp_path) == []

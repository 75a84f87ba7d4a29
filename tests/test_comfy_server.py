"""The pack inside a ComfyUI server on 127.0.0.1, driven over its HTTP API."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from devkit import host, paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME).exists():
        pytest.fail(f"{paths.SLIM_SD15_NAME} is missing: run scripts/setup.sh before the tests")
    with host.server(tmp_path_factory.mktemp("comfy_server")) as running:
        yield running


def txt2img_graph(seed: int) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.SLIM_SD15_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "rece_server_test"}},
    }


def test_server_loads_the_pack_without_import_errors(server):
    log = server.log()
    assert "Import times for custom nodes" in log
    pack_lines = [line for line in log.splitlines() if paths.PACK_LINK_NAME in line]
    assert pack_lines, log[-3000:]
    assert not any("IMPORT FAILED" in line for line in pack_lines)


def test_server_lists_the_checkpoint_built_for_tests(server):
    info = server.get("/object_info/CheckpointLoaderSimple")
    choices = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert paths.SLIM_SD15_NAME in choices


def test_server_samples_and_decodes_the_test_checkpoint(server):
    entry = server.run_prompt(txt2img_graph(seed=11))
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image_info,) = entry["outputs"]["7"]["images"]
    path = server.output_dir / image_info.get("subfolder", "") / image_info["filename"]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape == (64, 64, 3)
    # Random weights give noise, never one flat colour (a NaN decode would).
    assert pixels.std() > 0

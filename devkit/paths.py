"""Where the set-up puts things. One place, so scripts and tests agree."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host"
CHECKPOINT_DIR = HOST_DIR / "checkpoints"
EXTRA_PATHS_FILE = HOST_DIR / "extra_model_paths.yaml"
STUBS_DIR = HOST_DIR / "stubs"
PACK_LINK_NAME = "comfyui-rece"

# The trained shapes demo model (devkit.shapes_model), assembled by the set-up
# from the shipped weights: the main job's default checkpoint.
DEMO_NAME = "rece_demo_shapes_sd15.safetensors"
# The random-weight SD1.5 test checkpoint that the set-up builds.
SLIM_SD15_NAME = "rece_test_sd15_slim.safetensors"
# Every slim test checkpoint the set-up builds: family -> (builder variant, file name).
SLIM_CHECKPOINTS = {
    "sd15": ("sd15-slim", SLIM_SD15_NAME),
    "sd2": ("sd2-slim", "rece_test_sd2_slim.safetensors"),
    "sd2-v": ("sd2-v-slim", "rece_test_sd2_v_slim.safetensors"),
    "sdxl": ("sdxl-slim", "rece_test_sdxl_slim.safetensors"),
}


def comfyui_dir() -> Path:
    """The ComfyUI checkout in use: COMFYUI_PATH if set, else the provisioned one."""
    override = os.environ.get("COMFYUI_PATH")
    return Path(override).resolve() if override else HOST_DIR / "ComfyUI"

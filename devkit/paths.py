"""Where the set-up puts things. One place, so scripts and tests agree."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST_DIR = REPO_ROOT / ".host"
CHECKPOINT_DIR = HOST_DIR / "checkpoints"
EXTRA_PATHS_FILE = HOST_DIR / "extra_model_paths.yaml"
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


SHARED_DIR = REPO_ROOT.parent / "shared"


@dataclass(frozen=True)
class HostSpec:
    """One ComfyUI host the pack is tested on: where it comes from, where it is
    provisioned, and the pinned environment it runs in."""

    name: str                 # what --host and RECE_HOST say
    version: str              # comfyui_version.py of a default provisioning
    comfy_dir: Path           # where provisioning puts it when COMFYUI_PATH is not set
    venv: Path                # scripts/host_env.sh names the same venv and its pinned packages
    stand_ins: tuple[str, ...]  # import-only stand-ins it needs for packages that cannot be installed


HOSTS = {
    # The default: what a fresh machine gets from the package registry.
    "0.3.75": HostSpec(
        "0.3.75", "0.3.75", HOST_DIR / "ComfyUI", REPO_ROOT / ".venv", ("torchvision",)),
    # A current release from a checkout: no registry here carries it.
    "0.33": HostSpec(
        "0.33", "0.33.0", HOST_DIR / "ComfyUI-0.33.0", REPO_ROOT / ".venv-0.33", ("torchvision", "torchaudio")),
}
DEFAULT_HOST = "0.3.75"


def host_spec() -> HostSpec:
    """The host in use: ``RECE_HOST`` (set by ``--host`` of the scripts), else the default."""
    name = os.environ.get("RECE_HOST") or DEFAULT_HOST
    if name not in HOSTS:
        raise SystemExit(f"RECE_HOST={name!r} is not a known host; choose one of {', '.join(HOSTS)}")
    return HOSTS[name]


def comfyui_dir() -> Path:
    """The ComfyUI checkout in use: COMFYUI_PATH if set, else the host's provisioned one."""
    override = os.environ.get("COMFYUI_PATH")
    return Path(override).resolve() if override else host_spec().comfy_dir

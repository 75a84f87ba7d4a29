"""Shared fixtures: the real ComfyUI, loaded in-process once per test worker."""
from __future__ import annotations

import hashlib

import pytest
import torch

from devkit import host, paths

# The repo root is the pack, a package whose __init__ imports comfy; pytest
# imports it while collecting, so comfy must be importable first.
host.prepare_comfy_imports()


# Two xdist workers on two cores: OpenMP threads that spin while the other
# worker computes make every test, and module-scoped fixtures set up before any
# per-test fixture runs, several times slower. Set once, for the whole worker.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def comfy_nodes(tmp_path_factory):
    """ComfyUI's ``nodes`` module, loaded once per worker, output in a temp folder."""
    if not (paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME).exists():
        pytest.fail(f"{paths.SLIM_SD15_NAME} is missing: run scripts/setup.sh before the tests")
    return host.load_in_process(output_dir=tmp_path_factory.mktemp("comfy_output"))


@pytest.fixture(scope="session")
def slim_sd15(comfy_nodes):
    """(MODEL, CLIP, VAE) of the slim SD1.5 test checkpoint, loaded once per worker.

    Shared: tests must not change it (and several check exactly that).
    """
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(paths.SLIM_SD15_NAME)[:3]


@pytest.fixture(scope="session")
def glue(comfy_nodes):
    """The pack's ComfyUI glue modules, as ComfyUI loaded them."""

    class Glue:
        weights = host.pack_module("nodes.model_weights")
        text = host.pack_module("nodes.text_encoding")

    return Glue


def stored_weights(model, prefix: str = "") -> dict[str, torch.Tensor]:
    """The MODEL's own weights, without its patches. Read through
    ``get_key_patches``, because while a patched clone is loaded for sampling
    ComfyUI writes the patched values into the shared tensors (keeping a
    backup), and ``model_state_dict()`` then shows those."""
    return {key: entries[0][0] for key, entries in model.get_key_patches(prefix).items()}


def _fingerprint(model) -> str:
    """SHA-256 over every stored tensor of a MODEL and its patch list."""
    digest = hashlib.sha256()
    for key, value in sorted(stored_weights(model).items()):
        digest.update(key.encode())
        digest.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(sorted((k, len(v)) for k, v in model.patches.items())).encode())
    return digest.hexdigest()


@pytest.fixture
def model_fingerprint():
    """``fingerprint(model) -> str``: changes when any weight or patch of the MODEL does."""
    return _fingerprint

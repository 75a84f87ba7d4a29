"""Reading and writing tensor files safely.

Reading never runs code from a file: safetensors first, and pickled PyTorch
files only through ``torch.load(weights_only=True)``, which refuses anything
but tensors and plain containers. Writing is atomic and never replaces an
existing file.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

# A state dict is sometimes saved inside a checkpoint dict under one of these.
_NESTED_STATE_KEYS = ("state_dict", "unet", "model", "module")


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file starts like a safetensors file (a length-prefixed
    JSON header), whatever its name says."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 1 < length < os.path.getsize(path) and head[8:9] == b"{"


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors or a weights-only PyTorch file.

    Raises ``ValueError`` saying what is wrong when the file is neither, or
    when a PyTorch file needs code to load (a pickled model object, custom
    classes): such files are never unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.name}: no such file")
    if is_safetensors(path):
        try:
            return load_file(str(path), device="cpu"), safetensors_metadata(path)
        except (SafetensorError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"{path.name} is a damaged safetensors file: {error}") from error
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path.name} is a pickled file that needs more than plain tensors to load (e.g. a whole model object); "
            "it was not unpickled, since that could run code from it. Save its state_dict as .safetensors"
        ) from error
    except Exception as error:  # torch raises several types for non-torch files
        raise ValueError(f"{path.name} is neither a safetensors file nor a PyTorch state dict ({error})") from error
    return _state_dict_of(loaded, path.name), {}


def _state_dict_of(loaded: object, name: str) -> dict[str, torch.Tensor]:
    for _ in range(2):  # unwrap {"state_dict": {...}} and the like
        if isinstance(loaded, Mapping) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
            nested = next((loaded[k] for k in _NESTED_STATE_KEYS if isinstance(loaded.get(k), Mapping)), None)
            if nested is not None:
                loaded = nested
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{name} holds a {type(loaded).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def write_new_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to a new safetensors file at ``path``, atomically.

    The file appears complete or not at all, and an existing file is never
    replaced: ``FileExistsError`` then, with nothing written.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, temp,
                  metadata=dict(metadata or {}))
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        publish_new(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return path


def publish_new(temp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give the complete file ``temp`` the name ``path`` only if that name is
    free (``FileExistsError`` otherwise): never replaces a file."""
    path = Path(path)
    try:
        # A hard link creates the name only if it is free, in one step.
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError:
        # File systems without hard links: rename, after checking the name.
        if path.exists():
            raise FileExistsError(f"{path} already exists") from None
        os.replace(temp, path)

"""Where the pack's files live in ComfyUI's folders, and how new ones are named.

Erasure files go to ``models/rece_erasures/`` (a model folder this pack
registers, so Load Erasure lists them and ``extra_model_paths.yaml`` can add
more); exported LoRAs go to the first ``loras`` folder, where the stock
LoraLoader finds them. Both use ComfyUI's counter naming
(``<prefix>_00001_.safetensors``) and never replace a file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import folder_paths

ERASURES = "rece_erasures"
LORAS = "loras"
FILE_EXTENSIONS = {".safetensors", ".sft", ".pt", ".pth", ".ckpt", ".bin"}


def register() -> None:
    """Make ``rece_erasures`` a model folder (kept if a paths file set it)."""
    default = os.path.join(folder_paths.models_dir, ERASURES)
    if ERASURES in folder_paths.folder_names_and_paths:
        paths, _ = folder_paths.folder_names_and_paths[ERASURES]
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[ERASURES] = (paths, FILE_EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[ERASURES] = ([default], FILE_EXTENSIONS)


def file_choices(folder: str, extensions: tuple[str, ...] | None = None) -> list[str]:
    """The files ComfyUI lists in a model folder, optionally by extension."""
    names = folder_paths.get_filename_list(folder)
    return [n for n in names if extensions is None or n.lower().endswith(extensions)]


def full_path(folder: str, name: str) -> Path:
    """The file ``name`` from a dropdown of ``folder``; a clear error if gone."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name!r} is not in ComfyUI's {folder} folders ({', '.join(folder_paths.get_folder_paths(folder))}): "
                         "refresh the page (R) and choose an existing file")
    return Path(path)


def file_version(folder: str, name: str) -> str:
    """What identifies the file's content for ComfyUI's cache (``IS_CHANGED``):
    its size and modification time, so a file replaced under the same name
    is read again instead of its cached result being reused."""
    path = folder_paths.get_full_path(folder, name) if name else None
    if path is None:
        return ""  # validation reports the missing file
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def save_new(folder: str, prefix: str, write: Callable[[Path], object]) -> Path:
    """Call ``write(path)`` with the next free ``<prefix>_NNNNN_.safetensors``
    in the first ``folder`` path; retried with the next number if another
    writer took the name first (``write`` raises FileExistsError then)."""
    root = folder_paths.get_folder_paths(folder)[0]
    prefix = prefix.strip() or "rece"
    for _ in range(100):
        directory, name, counter, _, _ = folder_paths.get_save_image_path(prefix, root)
        path = Path(directory) / f"{name}_{counter:05}_.safetensors"
        try:
            write(path)
        except FileExistsError:
            continue
        folder_paths.filename_list_cache.pop(folder, None)  # list the new file without a restart
        return path
    raise RuntimeError(f"could not find a free file name for {prefix!r} in {root}")


def display_name(folder: str, path: Path) -> str:
    """``path`` as the folder's dropdown shows it (relative to its folder)."""
    for root in folder_paths.get_folder_paths(folder):
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return str(path)

"""Erasure files: an erasure as a small safetensors file anyone can apply.

The whole edit is ``W -> W @ T`` with one ``d x d`` transform shared by every
K/V matrix, so a file needs only the factors of ``T - I`` (``up [d, r]`` and
``down [r, d]``, float32, ``r`` its numerical rank: about 2 MB for one SD1.5
concept instead of a 2-7 GB checkpoint) and a JSON description under the
metadata key ``rece_erasure``:

``format``/``format_version``, ``context_width`` (``d``), ``rank``,
``matrices`` (how many K/V matrices it was computed on), ``family`` (the
model family's name), ``fingerprint`` (``kv_fingerprint`` of the weights it
was computed on), ``pack_version``, and ``erasures``: one entry per erasure
in application order (``describe``: method, concepts, guide, preserves,
scales, epochs, strength, and ``preserve_mode``: "paper", or "SPEED" with
its threshold, retain_scale, invariant settings and retained rows).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .closed_form import EditStep
from .erasure import Erasure
from .tensor_files import read_tensors, write_new_safetensors

FORMAT = "rece-erasure"
FORMAT_VERSION = 1
METADATA_KEY = "rece_erasure"
UP_KEY, DOWN_KEY = "erasure.up", "erasure.down"
REQUIRED_INFO = ("format", "format_version", "context_width", "rank", "matrices", "family", "fingerprint",
                 "pack_version", "erasures")


@dataclass(frozen=True)
class ErasureFile:
    """An erasure read from a file: the edit and its description."""

    erasure: Erasure
    info: dict[str, Any]

    @property
    def fingerprint(self) -> list[float]:
        return list(self.info["fingerprint"])


def describe(erasure: Erasure, method: str, strength: float) -> dict[str, Any]:
    """One erasure's entry in a file's ``erasures`` list."""
    s = erasure.settings
    entry = {
        "method": method, "concepts": list(erasure.concepts), "guide": erasure.guides[0] if erasure.guides else "",
        "preserve": list(erasure.preserves), "lamb": s.lamb, "erase_scale": s.erase_scale,
        "preserve_scale": s.preserve_scale, "reg_scale": s.reg_scale, "epochs": s.epochs, "strength": strength,
        "preserve_mode": "paper",
    }
    if erasure.null_space is not None:
        speed = erasure.null_space.settings
        entry.update({"preserve_mode": "SPEED", "threshold": speed.threshold, "retain_scale": speed.retain_scale,
                      "invariant_lamb": speed.lamb, "invariant_clusters": speed.clusters,
                      "retained_rows": speed.retained})
    return entry


def save_erasure_file(
    path: str | os.PathLike,
    erasure: Erasure,
    *,
    erasures: Sequence[Mapping[str, Any]],
    fingerprint: Sequence[float],
    family: str,
    matrices: int,
    pack_version: str,
) -> Path:
    """Write ``erasure`` (its exact low-rank factors) and its description to a
    new file at ``path``; never replaces an existing file."""
    up, down = erasure.low_rank()
    info = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "context_width": erasure.width, "rank": up.shape[1],
        "matrices": matrices, "family": family, "fingerprint": [float(f"{v:.9g}") for v in fingerprint],
        "pack_version": pack_version, "erasures": [dict(e) for e in erasures],
    }
    tensors = {UP_KEY: up.to(torch.float32), DOWN_KEY: down.to(torch.float32)}
    return write_new_safetensors(path, tensors, {METADATA_KEY: json.dumps(info)})


def load_erasure_file(path: str | os.PathLike) -> ErasureFile:
    """Read and check an erasure file; ``ValueError`` says what is wrong."""
    name = Path(path).name
    tensors, metadata = read_tensors(path)
    if METADATA_KEY not in metadata:
        hint = (" It holds K/V weights: load it as published UCE/RECE weights instead."
                if any(k.endswith(("to_k.weight", "to_v.weight")) for k in tensors) else "")
        raise ValueError(f"{name} is not an erasure file (no '{METADATA_KEY}' metadata).{hint}")
    try:
        info = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{name}: its '{METADATA_KEY}' metadata is not valid JSON ({error})") from error
    missing = [k for k in REQUIRED_INFO if k not in info] if isinstance(info, dict) else list(REQUIRED_INFO)
    if missing:
        raise ValueError(f"{name}: its erasure metadata lacks {', '.join(missing)}; the file is damaged or not ours")
    _check_info_types(name, info)
    if info["format"] != FORMAT or info["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{name} is format {info['format']!r} version {info['format_version']}; this version reads "
                         f"{FORMAT!r} up to version {FORMAT_VERSION}: update the pack")
    up, down = tensors.get(UP_KEY), tensors.get(DOWN_KEY)
    if up is None or down is None:
        raise ValueError(f"{name} lacks the tensors {UP_KEY!r} and {DOWN_KEY!r}")
    width, rank = info["context_width"], info["rank"]
    if up.ndim != 2 or down.ndim != 2 or tuple(up.shape) != (width, rank) or tuple(down.shape) != (rank, width):
        raise ValueError(f"{name}: factors of shapes {tuple(up.shape)} and {tuple(down.shape)} do not match its "
                         f"metadata (context width {width}, rank {rank}); the file is damaged")
    if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
        raise ValueError(f"{name} contains NaN or infinite values; it cannot be applied")
    fingerprint = info["fingerprint"]
    if not isinstance(fingerprint, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in fingerprint):
        raise ValueError(f"{name}: its weights fingerprint is not a list of numbers; the file is damaged")
    step = EditStep(up=up.to(torch.float64), down=down.to(torch.float64))
    entries = info["erasures"]
    first = entries[0] if entries else {}
    erasure = Erasure(steps=(step,), concepts=tuple(c for e in entries for c in e.get("concepts", ())),
                      guides=(first.get("guide", ""),), preserves=tuple(first.get("preserve", ())))
    return ErasureFile(erasure=erasure, info=info)


def _check_info_types(name: str, info: dict) -> None:
    """Refuse metadata whose values have the wrong JSON types (a hand-edited
    or damaged file), naming the field, before anything reads them."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_texts(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(t, str) for t in v)

    problems = [field for field, ok in (
        ("format", isinstance(info["format"], str)),
        ("format_version", is_int(info["format_version"])),
        ("context_width", is_int(info["context_width"]) and info["context_width"] > 0),
        ("rank", is_int(info["rank"]) and info["rank"] >= 0),
        ("matrices", is_int(info["matrices"])),
        ("family", isinstance(info["family"], str)),
        ("pack_version", isinstance(info["pack_version"], str)),
        ("erasures", isinstance(info["erasures"], list) and all(isinstance(e, dict) for e in info["erasures"])),
    ) if not ok]
    for entry in info["erasures"] if "erasures" not in problems else ():
        strength = entry.get("strength", 1.0)
        if not (is_texts(entry.get("concepts", [])) and isinstance(entry.get("guide", ""), str)
                and is_texts(entry.get("preserve", [])) and isinstance(strength, (int, float))
                and not isinstance(strength, bool) and math.isfinite(strength)):
            problems.append("erasures")
            break
    if problems:
        raise ValueError(f"{name}: its erasure metadata has invalid {', '.join(problems)}; the file is damaged")

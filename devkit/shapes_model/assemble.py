"""The shapes demo model as one SD1.5-format checkpoint that stock CheckpointLoaderSimple loads.

    .venv/bin/python -m devkit.shapes_model.assemble [OUT.safetensors] [--weights DIR] [--overwrite]

Joins the frozen CLIP-L (regenerated from its seed, checked against its
checksum) with the shipped fp16 UNet and VAE (``demo_model/``). The set-up
does this once; the result is the main job's default checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from devkit import checkpoint_builder, paths
from devkit.shapes_model import frozen_clip, train

METADATA_KEY = "rece.shapes_model"


def read_weights(weights_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The shipped UNet and VAE tensors and the training metadata."""
    from safetensors import safe_open

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict = {}
    for name in (train.UNET_FILE, train.VAE_FILE):
        path = weights_dir / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the demo model's weights are shipped in demo_model/ "
                                    "(or train them: python -m devkit.shapes_model.train)")
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors, metadata


def checkpoint_state_dict(weights_dir: Path = train.WEIGHTS_DIR) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the demo checkpoint (fp16), checked against the SD1.5 layout of ``sd15-mini``."""
    tensors, metadata = read_weights(weights_dir)
    trained = metadata.get("settings", {})
    token_scale = float(trained.get("clip_token_scale", 1.0))
    if trained.get("clip_sha256") != frozen_clip.CLIP_SHA256_BY_TOKEN_SCALE.get(token_scale):
        raise RuntimeError("the UNet was trained against another text encoder than frozen_clip's")
    clip = frozen_clip.checked_clip_state_dict(token_scale)
    tensors.update(clip)
    layout = checkpoint_builder.checkpoint_layout(frozen_clip.VARIANT)
    missing, extra = set(layout) - set(tensors), set(tensors) - set(layout)
    if missing or extra:
        raise RuntimeError(f"demo weights do not fit the sd15-mini layout: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(extra)[:5]}")
    for key, (shape, _) in layout.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise RuntimeError(f"{key}: shape {tuple(tensors[key].shape)}, the layout wants {tuple(shape)}")
        if not torch.isfinite(tensors[key].float()).all():
            raise RuntimeError(f"{key} holds NaN or inf")
    return {k: tensors[k].to(torch.float16).contiguous() for k in sorted(tensors)}, metadata


def assemble(target: Path, weights_dir: Path = train.WEIGHTS_DIR, overwrite: bool = False) -> Path:
    """Write the demo checkpoint to ``target`` atomically; never replaces a file unless ``overwrite``."""
    from safetensors.torch import save_file

    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (pass overwrite=True to replace it)")
    state_dict, metadata = checkpoint_state_dict(weights_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state_dict, tmp, metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
        os.chmod(tmp, 0o644)
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=paths.CHECKPOINT_DIR / paths.DEMO_NAME)
    parser.add_argument("--weights", type=Path, default=train.WEIGHTS_DIR, help="folder with the UNet and VAE files")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        assemble(args.out, args.weights, args.overwrite)
    except (FileExistsError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The main job: erase concepts from a checkpoint through ComfyUI and save it.

    .venv/bin/python scripts/erase_checkpoint.py [CHECKPOINT.safetensors]
        [--concepts "nudity"] [--preset nudity] [--guide ""] [--preserve "..."]

Loads the checkpoint with ComfyUI's own CheckpointLoaderSimple (default: the
slim random-weight SD1.5 demo checkpoint that scripts/setup.sh builds), reads
the effective cross-attention K/V weights, encodes the texts with the
checkpoint's CLIP, runs RECE, adds the edit as patches on a clone of the
MODEL, prints what changed and how long each part took, and saves the erased
checkpoint with ComfyUI's CheckpointSave into ComfyUI's output folder.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit import host, paths  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rece_ops import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path,
                        help=f"SD1.x .safetensors checkpoint (default: the demo checkpoint {paths.SLIM_SD15_NAME})")
    parser.add_argument("--concepts", default="nudity", help="concepts to erase, one per line or comma-separated")
    parser.add_argument("--preset", default="nudity", choices=sorted(PRESETS), help="published settings to use")
    parser.add_argument("--guide", default=None, help="what the concepts become (default: the preset's guide)")
    parser.add_argument("--preserve", default="", help="concepts to preserve, comma-separated")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's RECE epochs (0 = UCE)")
    parser.add_argument("--output-prefix", default=None, help="CheckpointSave prefix (default checkpoints/rece_<concept>)")
    parser.add_argument("--output-dir", type=Path, default=None, help="ComfyUI output folder (default: ComfyUI's own)")
    parser.add_argument("--no-save", action="store_true", help="erase and report, but do not write a checkpoint")
    return parser.parse_args(argv)


def resolve_checkpoint(path: Path | None) -> str:
    """Register the checkpoint's folder with ComfyUI and return its name there."""
    import folder_paths

    if path is None:
        path = paths.CHECKPOINT_DIR / paths.SLIM_SD15_NAME
        if not path.exists():
            raise SystemExit(f"the demo checkpoint {path} is missing: run scripts/setup.sh")
    path = path.resolve()
    if not path.is_file():
        raise SystemExit(f"no checkpoint file at {path}")
    # Read only the header: a clear message beats a deserialisation error deep in the loader.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise SystemExit(f"{path} is not a .safetensors checkpoint ({error}); give an SD1.x .safetensors file")
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path.name


def main(argv: list[str] | None = None) -> int:
    try:
        return erase_and_save(parse_args(argv))
    except ValueError as error:
        # rece_ops and the glue raise ValueError for bad input, with the reason.
        print(f"error: {error}", file=sys.stderr)
        return 2


def erase_and_save(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    nodes = host.load_in_process(output_dir=args.output_dir, quiet=True)
    import torch

    import rece_ops
    from rece_ops import metrics

    glue_weights = host.pack_module("nodes.model_weights")
    glue_text = host.pack_module("nodes.text_encoding")
    name = resolve_checkpoint(args.checkpoint)
    chosen = rece_ops.preset(args.preset)
    settings = chosen.settings if args.epochs is None else chosen.settings.with_changes(epochs=args.epochs)
    concepts = rece_ops.split_concepts(args.concepts)
    if not concepts:
        raise SystemExit("no concepts given: pass --concepts 'name'")
    guide = chosen.guide if args.guide is None else args.guide
    preserve_texts = rece_ops.preserve_prompts(rece_ops.split_concepts(args.preserve))

    with torch.inference_mode():
        t0 = time.perf_counter()
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
        t_load = time.perf_counter() - t0

        t0 = time.perf_counter()
        weights = glue_weights.effective_kv_weights(model)
        t_read = time.perf_counter() - t0

        t0 = time.perf_counter()
        encoded_concepts = glue_text.encode_texts(clip, concepts)
        encoded_guides = glue_text.encode_texts(clip, [guide] * len(concepts))
        encoded_preserves = glue_text.encode_texts(clip, preserve_texts)
        t_text = time.perf_counter() - t0

        t0 = time.perf_counter()
        gram_matrix = rece_ops.gram(weights)
        erasure = rece_ops.erase(encoded_concepts, encoded_guides, encoded_preserves, settings, gram_matrix=gram_matrix)
        t_algebra = time.perf_counter() - t0

        t0 = time.perf_counter()
        erased = glue_weights.patched_clone(model, erasure.deltas(weights))
        t_patch = time.perf_counter() - t0

        pairs = [rece_ops.uce_erase_rows(c, g) for c, g in zip(encoded_concepts, encoded_guides)]
        erase_rows = torch.cat([c for c, _ in pairs])
        target_rows = torch.cat([g for _, g in pairs])
        family = type(model.model.model_config).__name__
        print(f"checkpoint      {name} ({family}, {len(weights)} K/V matrices, context width {erasure.width})")
        print(f"erased          {', '.join(repr(c) for c in concepts)} -> guide {guide!r}; "
              f"preserved {', '.join(repr(p) for p in preserve_texts)}")
        print(f"settings        preset {args.preset}: lamb {settings.lamb}, erase_scale {settings.erase_scale}, "
              f"preserve_scale {settings.preserve_scale}, reg_scale {settings.reg_scale}, epochs {settings.epochs}")
        print(f"edit            {len(erasure.steps)} step{'s' if len(erasure.steps) != 1 else ''}, rank {erasure.rank()} of {erasure.width}; "
              f"K/V weights changed by {100 * metrics.weight_change(gram_matrix, erasure):.2f}% (Frobenius)")
        print(f"concept rows    remaining distance to the guide's outputs: "
              f"{metrics.remaining_distance(gram_matrix, erasure, erase_rows, target_rows):.4f} (1 = untouched)")
        print(f"preserved rows  output drift {metrics.preserve_drift(gram_matrix, erasure, torch.cat([p.rows for p in encoded_preserves])):.2e}")
        recovery = [metrics.adversarial_recovery(gram_matrix, erasure, c.rows, g.rows, settings.reg_scale)
                    for c, g in zip(encoded_concepts, encoded_guides)]
        print(f"red team        best adversarial embedding recovers {100 * max(recovery):.1f}% of the concept's outputs")
        print(f"time            load {t_load:.2f} s, read weights {t_read:.2f} s, text encoding {t_text:.2f} s, "
              f"algebra {t_algebra:.3f} s, patches {t_patch:.3f} s")

        if not args.no_save:
            t0 = time.perf_counter()
            prefix = args.output_prefix or "checkpoints/rece_" + "_".join(c.replace(" ", "-") for c in concepts)[:60]
            import folder_paths

            before = set(Path(folder_paths.get_output_directory()).rglob("*.safetensors"))
            nodes.NODE_CLASS_MAPPINGS["CheckpointSave"]().save(erased, clip, vae, filename_prefix=prefix)
            written = sorted(set(Path(folder_paths.get_output_directory()).rglob("*.safetensors")) - before)
            print(f"saved           {', '.join(str(p) for p in written)} ({time.perf_counter() - t0:.1f} s)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How long SPEED's null-space step takes in the erase nodes, against the
paper's RECE in the same run and against the straightforward per-layer SPEED.

    .venv/bin/python -m benchmarks.speed_step [--families sd15] [--repeats 5]

On the full-size random checkpoints of ``benchmarks.erase_speed`` (ComfyUI's
CheckpointLoaderSimple, in this process), times the erase node end to end
(texts to the patched MODEL, report included; median of ``--repeats`` runs)
for the paper's UCE and RECE (nudity preset, 3 epochs) and for SPEED alone
and SPEED + 3 RECE epochs, each preserving the empty prompt only and ten
words, with ``G`` computed and cached. Then the same SPEED edit computed the
way the authors' ``edit_model`` does it (``benchmarks.per_layer.per_layer_speed``:
per layer, texts encoded, an SVD and explicit float32 inverses) on the same
weights. Target: SPEED's step within 2x the RECE node's time on SD1.5.
Writes ``results/speed_step.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.erase_speed import RESULTS, concept_names, load_checkpoint, machine
from devkit import host

PRESERVE_WORDS = ["a portrait", "a landscape", "a dog", "a car", "a house", "a tree", "a city", "a flower",
                  "a mountain", "a bicycle"]
CASES = [  # (label, epochs, SPEED?)
    ("UCE (paper)", 0, False),
    ("RECE, 3 epochs (paper)", 3, False),
    ("SPEED", 0, True),
    ("SPEED + 3 RECE epochs", 3, True),
]
TARGET_RATIO = 2.0


def time_case(erase_module, model, clip, epochs: int, speed: bool, preserve: str, cached: bool, repeats: int) -> float:
    rece_ops = erase_module.rece_ops
    settings = rece_ops.preset("nudity").settings.with_changes(epochs=epochs)
    speed_settings = rece_ops.SpeedSettings() if speed else None
    times = []
    for _ in range(repeats):
        if not cached:
            erase_module.GRAM_CACHE.clear()
        with torch.inference_mode():
            started = time.perf_counter()
            erase_module.erase_concepts(model, clip, "RECE" if epochs else "UCE", "nudity", "", preserve, "nudity",
                                        settings, 1.0, speed_settings)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run_family(comfy_nodes, family: str, repeats: int) -> dict:
    erase_module = host.pack_module("nodes.erase_concept")
    weights_module = host.pack_module("nodes.model_weights")
    text_module = host.pack_module("nodes.text_encoding")
    model, clip, _ = load_checkpoint(comfy_nodes, family)
    time_case(erase_module, model, clip, 1, True, "", False, 1)  # warm-up
    rows = []
    for preserve_label, preserve in (("empty prompt", ""), ("10 words", "\n".join(PRESERVE_WORDS))):
        for cached in (False, True):
            for label, epochs, speed in CASES:
                seconds = time_case(erase_module, model, clip, epochs, speed, preserve, cached, repeats)
                rows.append({"case": label, "preserve": preserve_label, "gram_cached": cached, "seconds": seconds})
                print(f"  {family} {label:24s} preserve {preserve_label:12s} G {'cached' if cached else 'computed'}: "
                      f"{seconds:.3f} s")

    # The straightforward per-layer SPEED on the same weights and texts.
    from benchmarks.per_layer import per_layer_speed

    rece_ops = erase_module.rece_ops
    encode = lambda texts: [text_module.encode_text(clip, t) for t in texts]  # noqa: E731 (no batching, no cache)
    with torch.inference_mode():
        weights = weights_module.effective_kv_weights(model, torch.device("cpu"))
        empty = text_module.encode_text(clip, "")
        invariants = rece_ops.null_space.invariant_rows(empty.rows)
        started = time.perf_counter()
        theirs = per_layer_speed(weights, encode, ["nudity"], "", PRESERVE_WORDS, invariants)
        baseline = time.perf_counter() - started
        erased = erase_module.erase_concepts(model, clip, "UCE", "nudity", "", "\n".join(PRESERVE_WORDS), "nudity",
                                             rece_ops.preset("nudity").settings.with_changes(epochs=0), 1.0,
                                             rece_ops.SpeedSettings())[0]
        ours = weights_module.effective_kv_weights(erased, torch.device("cpu"))
    difference = max(float((theirs[k] - ours[k]).norm() / (theirs[k] - weights[k]).norm()) for k in weights)
    node = next(r["seconds"] for r in rows if r["case"] == "SPEED" and r["preserve"] == "10 words"
                and not r["gram_cached"])
    print(f"  per-layer SPEED (10 preserve words): {baseline:.2f} s; the node {node:.2f} s: {baseline / node:.1f}x; "
          f"edits differ by {difference:.1e} of the edit (float32 inverses vs float64 solves)")
    return {"family": family, "matrices": len(weights), "cases": rows,
            "baseline": {"seconds": baseline, "node_seconds": node, "ratio": baseline / node, "difference": difference}}


def targets(result: dict) -> list[str]:
    lines = []
    for preserve in ("empty prompt", "10 words"):
        for cached in (False, True):
            pick = {r["case"]: r["seconds"] for r in result["cases"]
                    if r["preserve"] == preserve and r["gram_cached"] == cached}
            rece = pick["RECE, 3 epochs (paper)"]
            for case in ("SPEED", "SPEED + 3 RECE epochs"):
                ratio = pick[case] / rece
                lines.append(f"- preserve {preserve}, G {'cached' if cached else 'computed'}: {case} "
                             f"{pick[case]:.2f} s = {ratio:.2f}x the RECE node's {rece:.2f} s: "
                             f"{'met' if ratio <= TARGET_RATIO else '**not met**'} (target <= {TARGET_RATIO:.0f}x)")
    return lines


def markdown(results: list[dict], repeats: int) -> str:
    lines = [f"# SPEED's step in the erase node ({time.strftime('%Y-%m-%d')})", "", f"Machine: {machine()}.", "",
             f"End to end (texts to the patched MODEL, report included), median of {repeats} runs, one concept "
             "('nudity', guide the empty prompt; SPEED threshold 0.1, retain_scale 1.0).", ""]
    for result in results:
        lines += [f"## {result['family']} (full size, {result['matrices']} K/V matrices)", "",
                  "| case | preserve | G computed | G cached |", "|---|---|---|---|"]
        for preserve in ("empty prompt", "10 words"):
            for label, _, _ in CASES:
                times = {r["gram_cached"]: r["seconds"] for r in result["cases"]
                         if r["case"] == label and r["preserve"] == preserve}
                lines.append(f"| {label} | {preserve} | {times[False]:.3f} s | {times[True]:.3f} s |")
        b = result["baseline"]
        lines += ["", f"Per-layer SPEED as the authors' `edit_model` computes it (10 preserve words, no augmentation): "
                      f"{b['seconds']:.2f} s; the node {b['node_seconds']:.2f} s: **{b['ratio']:.1f}x** faster. "
                      f"Their edits differ by {b['difference']:.1e} of the edit (float32 inverses against float64 "
                      "solves).", "", "Target (SPEED's step within 2x the RECE node's time):", "", *targets(result), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15", help="comma-separated: sd15, sdxl")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    comfy_nodes = host.load_in_process(quiet=True)
    results = [run_family(comfy_nodes, f.strip(), args.repeats) for f in args.families.split(",")]
    text = markdown(results, args.repeats)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed_step.md").write_text(text)
    (args.out / "speed_step.json").write_text(json.dumps({"repeats": args.repeats, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

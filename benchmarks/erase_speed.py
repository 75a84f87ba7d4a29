"""How fast the erase node is, part by part, against the per-layer method.

    .venv/bin/python -m benchmarks.erase_speed [--families sd15,sdxl] [--concepts 1,10,100,1000] [--sdxl-baseline 0]

Builds full-size random SD1.5 and SDXL checkpoints with the project's builder
(once, into ``benchmarks/.checkpoints/``), loads them with ComfyUI's own
CheckpointLoaderSimple in this process, and times RECE Erase Concept end to
end and per part (text encoding, reading the K/V weights, ``G``, the
algebra, building the patches, the report) for UCE only, RECE with 1 and 3
epochs and 1 to 1000 generated concepts; then the first sampling step after
the erase (when ComfyUI applies the patches) and the straightforward per-layer
implementation (``benchmarks.per_layer``, the structure of the authors' code)
on the same weights in the same run, with the ratio and the peak memory of
both (on SD1.5; on SDXL only with ``--sdxl-baseline``, as it takes ten minutes
a step). Writes ``results/latest.md``,
``results/latest.json`` and ``results/latest.png``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from devkit import checkpoint_builder, host, paths

RESULTS = paths.REPO_ROOT / "benchmarks" / "results"
CHECKPOINTS = paths.REPO_ROOT / "benchmarks" / ".checkpoints"
FULL_VARIANTS = {"sd15": "sd15-full", "sdxl": "sdxl-full"}
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
SYLLABLES = ["ka", "lo", "mi", "ren", "sa", "to", "vel", "du", "ne", "ri", "mar", "col", "bi", "an", "ze", "pho"]


def mmap_threshold(size: int) -> None:
    """glibc's M_MMAP_THRESHOLD: blocks above ``size`` are returned to the
    system when freed. 64 KiB makes resident memory measure what a run
    really holds (else memory freed by an earlier case is reused unseen and
    peaks read low), at a cost in speed: memory is measured in its own pass."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)  # give back what is free now
        libc.mallopt(-3, size)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms."""

    def __init__(self):
        self.process = psutil.Process()
        self.peak_extra = 0

    def __enter__(self) -> "PeakMemory":
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.peak_extra = self.peak - self.start


def concept_names(count: int) -> list[str]:
    """``count`` distinct made-up artist names, the same every run."""
    names = []
    for i in range(count):
        first = SYLLABLES[i % 16] + SYLLABLES[(i // 16) % 16]
        last = SYLLABLES[(i * 7 + 3) % 16] + SYLLABLES[(i // 256 + 5) % 16] + SYLLABLES[(i * 3) % 16]
        names.append(f"{first.capitalize()} {last.capitalize()}")
    return names


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {gpu}; torch {torch.__version__}")


def load_checkpoint(comfy_nodes, family: str):
    import folder_paths

    variant = FULL_VARIANTS[family]
    path = CHECKPOINTS / f"rece_bench_{variant}.safetensors"
    if not path.exists():
        print(f"building {path.name} (once)")
        checkpoint_builder.build_checkpoint(path, variant=variant, seed=0)
    folder_paths.add_model_folder_path("checkpoints", str(CHECKPOINTS))
    with torch.inference_mode():
        return comfy_nodes.CheckpointLoaderSimple().load_checkpoint(path.name)[:3]


def time_erase(erase_module, model, clip, concepts: list[str], epochs: int, clear_cache: bool) -> dict:
    settings = erase_module.rece_ops.preset("nudity").settings.with_changes(epochs=epochs)
    if clear_cache:
        erase_module.GRAM_CACHE.clear()
    with torch.inference_mode(), PeakMemory() as memory:
        started = time.perf_counter()
        erased, _, seconds = erase_module.erase_concepts(
            model, clip, "RECE" if epochs else "UCE", "\n".join(concepts), "", "", "nudity", settings, 1.0)
        total = time.perf_counter() - started
    return {"erased": erased, "total": total, "memory": memory.peak_extra,
            **{k: v for k, v in seconds.items() if k != "gram_cached"}, "gram_cached": seconds["gram_cached"]}


def first_sampling_step(comfy_nodes, original, erased, clip) -> dict:
    """Seconds of a 1-step 64x64 sample: the original model (loaded), the erased
    model the first time (ComfyUI applies the patches) and again."""
    with torch.inference_mode():
        (positive,) = comfy_nodes.CLIPTextEncode().encode(clip, "a photo")
        (negative,) = comfy_nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = comfy_nodes.EmptyLatentImage().generate(64, 64, 1)

        def sample(model) -> float:
            started = time.perf_counter()
            comfy_nodes.common_ksampler(model, 1, 1, 5.0, "euler", "normal", positive, negative, latent,
                                        disable_noise=False)
            return time.perf_counter() - started

        sample(original)
        plain = sample(original)
        first = sample(erased)
        again = sample(erased)
    return {"original": plain, "erased_first": first, "erased_again": again, "patch_cost": first - again}


def run_family(comfy_nodes, family: str, concept_counts: list[int], baseline_epochs: int | None) -> dict:
    """Every case of one family; ``baseline_epochs`` None skips the per-layer method."""
    erase_module = host.pack_module("nodes.erase_concept")
    weights_module = host.pack_module("nodes.model_weights")
    text_module = host.pack_module("nodes.text_encoding")
    started = time.perf_counter()
    model, clip, _ = load_checkpoint(comfy_nodes, family)
    load_seconds = time.perf_counter() - started
    keys = weights_module.kv_keys(model)
    stored = weights_module.stored_kv_weights(model, torch.device("cpu"))
    kv_bytes = sum(model.get_key_patches("diffusion_model.")[k][0][0].nbytes for k in keys)
    print(f"{family}: {len(keys)} K/V matrices, {sum(w.shape[0] for w in stored.values())} rows, "
          f"K/V weights {kv_bytes / 2**20:.0f} MiB; checkpoint loaded in {load_seconds:.1f} s")
    del stored

    time_erase(erase_module, model, clip, concept_names(1), 1, True)  # warm-up: first-call costs, allocator pools
    from benchmarks.per_layer import per_layer_rece

    settings = erase_module.rece_ops.preset("nudity").settings.with_changes(epochs=baseline_epochs or 0)
    encode = lambda texts: [text_module.encode_text(clip, t) for t in texts]  # noqa: E731 (no batching, no cache)
    with torch.inference_mode():
        weights = weights_module.effective_kv_weights(model, torch.device("cpu"))

    # Memory first, in a pass of its own (see mmap_threshold), before any
    # large case leaves freed memory behind: the node (UCE + 3 epochs, one
    # concept, G computed) and the per-layer method.
    mmap_threshold(64 * 1024)
    node_memory = time_erase(erase_module, model, clip, concept_names(1), 3, True)["memory"]
    baseline_memory = 0
    if family == "sd15" and baseline_epochs is not None:  # SDXL's per-layer run is too slow for a second pass
        with torch.inference_mode(), PeakMemory() as memory:
            per_layer_rece(weights, encode, concept_names(1), "", [""], settings)
        baseline_memory = memory.peak_extra
    mmap_threshold(32 * 2**20)
    print(f"  peak extra memory, measured alone: the node (RECE 3 epochs, 1 concept) {node_memory / 2**20:.0f} MiB, "
          f"the per-layer method {f'{baseline_memory / 2**20:.0f} MiB' if baseline_memory else 'not measured'}; "
          f"K/V weights {kv_bytes / 2**20:.0f} MiB")
    cases = [("UCE", 1, 0, True), ("RECE, 1 epoch", 1, 1, True), ("RECE, 3 epochs", 1, 3, True),
             ("RECE, 3 epochs, G cached", 1, 3, False)]
    cases += [(f"RECE, 3 epochs", n, 3, True) for n in concept_counts if n > 1]
    rows, erased_one = [], None
    for label, count, epochs, clear in cases:
        result = time_erase(erase_module, model, clip, concept_names(count), epochs, clear)
        if (count, epochs, clear) == (1, 3, True):
            erased_one = result["erased"]
        result.pop("erased")
        rows.append({"case": label, "concepts": count, "epochs": epochs, **result})
        print(f"  {label:28s} {count:5d} concepts: {result['total']:7.2f} s (text {result['text']:.2f}, "
              f"weights {result['weights']:.2f}, G {result['gram']:.2f}, algebra {result['algebra']:.2f}, "
              f"patches {result['patches']:.3f}, report {result['report']:.2f}); "
              f"peak +{result['memory'] / 2**20:.0f} MiB")

    sampling = first_sampling_step(comfy_nodes, model, erased_one, clip)
    print(f"  first sampling step after the erase: {sampling['erased_first']:.2f} s vs {sampling['erased_again']:.2f} s "
          f"once patched (patches applied in {sampling['patch_cost']:.2f} s)")

    result = {"family": family, "name": FAMILY_NAMES[family], "matrices": len(keys), "kv_bytes": kv_bytes,
              "load_seconds": load_seconds, "cases": rows, "sampling": sampling, "node_memory": node_memory,
              "baseline": None}
    if baseline_epochs is None:
        return result
    # The per-layer method on the same weights, texts and settings.
    ours = next(r for r in rows if r["concepts"] == 1 and r["epochs"] == baseline_epochs and r["case"] != "RECE, 3 epochs, G cached")
    with torch.inference_mode():
        ours_model = time_erase(erase_module, model, clip, concept_names(1), baseline_epochs, True)["erased"]
        expected = weights_module.effective_kv_weights(ours_model, torch.device("cpu"))
        started = time.perf_counter()
        theirs = per_layer_rece(weights, encode, concept_names(1), "", [""], settings)
        baseline_seconds = time.perf_counter() - started
    difference = max(float((theirs[k] - expected[k]).norm() / expected[k].norm()) for k in keys)
    del theirs, expected, ours_model

    baseline = {"epochs": baseline_epochs, "total": baseline_seconds, "memory": baseline_memory,
                "ratio": baseline_seconds / ours["total"], "difference": difference}
    print(f"  per-layer method, {'UCE' if not baseline_epochs else f'RECE {baseline_epochs} epochs'}: "
          f"{baseline_seconds:.1f} s; ours {ours['total']:.2f} s: {baseline['ratio']:.0f}x; results differ by "
          f"{difference:.1e} (float32 inverses vs float64 solves)")
    return {**result, "baseline": baseline}


def targets(results: list[dict]) -> list[tuple[str, str, bool]]:
    """(what, measured, met) for the project's targets."""
    out = []
    by_family = {r["family"]: r for r in results}
    if "sd15" in by_family:
        r = by_family["sd15"]
        one = next(c for c in r["cases"] if c["case"] == "RECE, 3 epochs" and c["concepts"] == 1)
        out.append(("SD1.5, UCE + 3 epochs, one concept, end to end <= 1 s", f"{one['total']:.2f} s", one["total"] <= 1))
        if r["baseline"] and r["baseline"]["epochs"] == 3:
            out.append(("SD1.5, >= 100x the per-layer method in the same run", f"{r['baseline']['ratio']:.0f}x",
                        r["baseline"]["ratio"] >= 100))
        many = [c for c in r["cases"] if c["concepts"] == 1000]
        if many:
            out.append(("SD1.5, 1000 concepts <= 60 s", f"{many[0]['total']:.1f} s "
                        f"(text encoding {many[0]['text']:.1f} s)", many[0]["total"] <= 60))
    if "sdxl" in by_family:
        r = by_family["sdxl"]
        one = next(c for c in r["cases"] if c["case"] == "RECE, 3 epochs" and c["concepts"] == 1)
        cached = next(c for c in r["cases"] if c["case"] == "RECE, 3 epochs, G cached")
        out.append(("SDXL, UCE + 3 epochs <= 5 s (first erase on the model, G computed)", f"{one['total']:.2f} s",
                    one["total"] <= 5))
        out.append(("SDXL, UCE + 3 epochs <= 5 s (G cached for the model)", f"{cached['total']:.2f} s",
                    cached["total"] <= 5))
    for r in results:
        used = r["node_memory"]
        out.append((f"{r['name']}, extra memory <= 2x the K/V weights ({r['kv_bytes'] / 2**20:.0f} MiB), "
                    "UCE + 3 epochs, one concept", f"{used / 2**20:.0f} MiB ({used / r['kv_bytes']:.2f}x)",
                    used <= 2 * r["kv_bytes"]))
    return out


def markdown(results: list[dict], where: str) -> str:
    lines = [f"# Erase speed ({time.strftime('%Y-%m-%d')})", "", f"Machine: {where}.", "",
             "Times in seconds; 'end to end' is the RECE Erase Concept node's work from texts to the patched MODEL "
             "(including its report). 'G' is 0 when the model's G was cached by an earlier erase. Memory in the "
             "tables: peak resident memory above the level before the call, during the timing pass (it can read "
             "low where memory freed by an earlier case is reused); the figures under each table come from a pass "
             "of their own in which freed memory goes back to the system.", ""]
    for r in results:
        lines += [f"## {r['name']} (full size, {r['matrices']} K/V matrices, {r['kv_bytes'] / 2**20:.0f} MiB of K/V "
                  "weights)", "",
                  "| case | concepts | end to end | text | K/V read | G | algebra | patches | report | extra memory |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r["cases"]:
            lines.append(f"| {c['case']} | {c['concepts']} | **{c['total']:.2f}** | {c['text']:.2f} | {c['weights']:.2f} | "
                         f"{0 if c['gram_cached'] else c['gram']:.2f} | {c['algebra']:.3f} | {c['patches']:.3f} | "
                         f"{c['report']:.2f} | {c['memory'] / 2**20:.0f} MiB ({c['memory'] / r['kv_bytes']:.2f}x) |")
        b, s = r["baseline"], r["sampling"]
        node_memory = (f"Peak extra memory, measured alone: the node (UCE + 3 epochs, one concept, G computed) "
                       f"{r['node_memory'] / 2**20:.0f} MiB ({r['node_memory'] / r['kv_bytes']:.2f}x the K/V weights)")
        if b is None:
            lines += ["", "Per-layer method: not run for this family (`--sdxl-baseline` runs it: it re-runs both "
                      "SDXL text encoders for every concept and preserve text of each of 140 matrices, about ten "
                      "minutes per step here).", "", node_memory + ".", ""]
        else:
            what = "UCE" if not b["epochs"] else f"UCE + {b['epochs']} epochs"
            lines += ["", f"Per-layer method ({what}, one concept; the structure of the authors' `edit_model`: per "
                      "matrix, the text encoder re-run for every concept and preserve text, every layer's projections "
                      "computed, per-token outer products summed, explicit float32 inverses): "
                      f"**{b['total']:.1f} s**; the node is **{b['ratio']:.0f}x** faster. Their results "
                      f"differ by {b['difference']:.1e} (relative, worst matrix): float32 inverses against float64 "
                      "solves.", "",
                      node_memory + "; " + (f"the per-layer method {b['memory'] / 2**20:.0f} MiB." if b["memory"] else
                                            "the per-layer method: not measured."), ""]
        lines += [f"First 1-step sample after the erase: {s['erased_first']:.2f} s, then {s['erased_again']:.2f} s "
                  f"(the original model: {s['original']:.2f} s): ComfyUI applies the patches (`W @ (T - I)` for "
                  f"every K/V matrix) in about {max(s['patch_cost'], 0):.2f} s.", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in targets(results)]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Horizontal bars, log scale: every case's end-to-end time and the per-layer method."""
    import math

    from PIL import Image, ImageDraw

    bars = []
    for r in results:
        for c in r["cases"]:
            bars.append((f"{r['name']}: {c['case']}, {c['concepts']} concept{'s' if c['concepts'] > 1 else ''}",
                         c["total"], (60, 110, 200)))
        b = r["baseline"]
        if b is not None:
            what = "UCE" if not b["epochs"] else f"{b['epochs']} epochs"
            bars.append((f"{r['name']}: per-layer method, {what}", b["total"], (200, 80, 60)))
    width, left, row = 1100, 430, 26
    height = 60 + row * len(bars) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    low, high = -2, math.ceil(math.log10(max(v for _, v, _ in bars)))
    scale = (width - left - 40) / (high - low)
    draw.text((10, 10), "Erase time, seconds (log scale); blue: RECE Erase Concept node, red: per-layer method",
              fill="black")
    for k in range(low, high + 1):
        x = left + (k - low) * scale
        draw.line([(x, 40), (x, height - 30)], fill=(220, 220, 220))
        draw.text((x - 10, height - 25), f"1e{k}" if k < 0 else f"{10 ** k}", fill="black")
    for i, (label, value, color) in enumerate(bars):
        y = 45 + i * row
        x = left + (math.log10(max(value, 10 ** low)) - low) * scale
        draw.rectangle([left, y, x, y + row - 8], fill=color)
        draw.text((10, y + 3), label[:62], fill="black")
        draw.text((x + 5, y + 3), f"{value:.2f} s", fill="black")
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--concepts", default="1,10,100,1000", help="concept counts for SD1.5 (RECE, 3 epochs)")
    parser.add_argument("--sdxl-concepts", default="1,10", help="concept counts for SDXL")
    parser.add_argument("--sdxl-baseline", type=int, default=None, metavar="EPOCHS",
                        help="also run the per-layer method on SDXL with this many epochs (0 = UCE only); it re-runs "
                             "both text encoders for every text of each of 140 matrices: about ten minutes per step here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as output:
        comfy_nodes = host.load_in_process(output_dir=Path(output), quiet=True)
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False  # the sampling steps' bars would break up the table
        results = []
        for family in args.families.split(","):
            counts = [int(n) for n in (args.concepts if family == "sd15" else args.sdxl_concepts).split(",")]
            results.append(run_family(comfy_nodes, family, counts, 3 if family == "sd15" else args.sdxl_baseline))
    where = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(markdown(results, where))
    (args.out / "latest.json").write_text(json.dumps({"machine": where, "results": results}, indent=2) + "\n")
    plot(results, args.out / "latest.png")
    print(f"\nwrote {args.out / 'latest.md'}, latest.json and latest.png\n")
    for what, measured, met in targets(results):
        print(f"{'met    ' if met else 'NOT MET'}  {what}: {measured}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

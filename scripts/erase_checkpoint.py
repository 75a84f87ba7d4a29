"""The main job: erase concepts from a checkpoint by running the pack's example workflow on a ComfyUI server.

    .venv/bin/python scripts/erase_checkpoint.py [CHECKPOINT.safetensors]
        [--concepts "circle"] [--preset nudity] [--guide ""] [--preserve "..."] [--epochs N]
        [--prompt "..."] [--seed N] [--size PX] [--steps N]
        [--output-prefix checkpoints/rece_nudity] [--output-dir DIR] [--no-save]

Starts ComfyUI's own server (main.py, 127.0.0.1, a free port) with this pack,
loads ``example_workflows/rece_erase_compare_same_seed.json`` (the file the
web page opens), converts it to the API format, and runs it through
``POST /prompt``: the checkpoint is loaded with CheckpointLoaderSimple, the
concepts are erased by the "RECE Erase Concept" node, two KSamplers draw the
same prompt with the same seed from the original and the erased model, and
the two images are saved side by side (left original, right erased). A
CheckpointSave node added to the graph saves the erased checkpoint into a
hidden per-run folder; it gets its name only once completely written.

Prints the node's report, where the image and the checkpoint are, and timings.
Output goes to ``<repo>/output/`` (or --output-dir), counter-numbered as
ComfyUI numbers its saves: running again never overwrites anything.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit import host, paths, workflows  # noqa: E402

WORKFLOW = paths.REPO_ROOT / "example_workflows" / "rece_erase_compare_same_seed.json"
DEFAULT_OUTPUT_DIR = paths.REPO_ROOT / "output"
PROMPT_TITLE = "Prompt (both samplers)"
# A user's checkpoint is linked under this subfolder of a per-run model folder,
# so its name can never collide with a file in ComfyUI's own folders.
LINK_SUBFOLDER = "rece-main-job"
# The demo checkpoint draws "a {red|green|blue} {circle|square|triangle}" at 64x64.
DEMO_CONCEPT = "circle"
DEMO_PROMPT = "a blue circle"
DEMO_SAMPLER = {"cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}


class UsageError(Exception):
    """Bad input from the command line: printed as one 'error: ...' line, exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: the same one-line form as ours
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from rece_ops import PRESETS

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", type=Path,
                        help=f"SD1.x, SD2.x or SDXL .safetensors checkpoint (default: the trained shapes demo "
                             f"checkpoint {paths.DEMO_NAME})")
    parser.add_argument("--concepts", default=None,
                        help=f"concepts to erase, one per line or comma-separated (default: {DEMO_CONCEPT!r} on the "
                             "demo checkpoint, 'nudity' on others)")
    parser.add_argument("--preset", default="nudity", choices=sorted(PRESETS), help="the authors' published settings (default: nudity)")
    parser.add_argument("--guide", default=None, help="what the concepts become (default: the preset's guide)")
    parser.add_argument("--preserve", default="", help="concepts to preserve, comma-separated (default: none; the empty prompt always is)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="RECE epochs instead of the preset's (0 = plain UCE); the preset's other numbers are kept")
    parser.add_argument("--prompt", default=None,
                        help=f"prompt of both samplers (default: {DEMO_PROMPT!r} on the demo checkpoint, the concepts "
                             "themselves on others)")
    parser.add_argument("--seed", type=int, default=None, help="seed of both samplers (default: the workflow's)")
    parser.add_argument("--size", type=int, default=None,
                        help="image width and height (default: 64 for the demo checkpoint, 256 for others on CPU, "
                             "the workflow's 512 on a GPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: 20 for the demo checkpoint, 12 for others on CPU, the workflow's on a GPU)")
    parser.add_argument("--output-prefix", default=None,
                        help="CheckpointSave prefix (default checkpoints/rece_<concept>)")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help=f"ComfyUI output folder (default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--no-save", action="store_true", help="run the comparison but do not save a checkpoint")
    return parser.parse_args(argv)


def check_checkpoint(path: Path | None) -> Path:
    """The checkpoint file to use, after reading its header (a clear message beats a loader error)."""
    if path is None:
        path = paths.CHECKPOINT_DIR / paths.DEMO_NAME
        if not path.exists():
            raise UsageError(f"the demo checkpoint {path} is missing: run scripts/setup.sh")
    path = path.expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"no checkpoint file at {path}")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as error:
        raise UsageError(f"{path} is not a .safetensors checkpoint ({error}); give an SD1.x, SD2.x or SDXL .safetensors file")
    return path


def node_settings(args: argparse.Namespace, concepts: list[str]) -> dict:
    """The RECE Erase Concept inputs the flags ask for."""
    import rece_ops

    chosen = rece_ops.preset(args.preset)
    values = {"concepts": "\n".join(concepts), "guide": chosen.guide if args.guide is None else args.guide,
              "preserve": "\n".join(rece_ops.split_concepts(args.preserve)), "preset": args.preset}
    settings = chosen.settings
    if args.epochs is not None:
        # A preset's numbers override the node's number inputs: other epochs need "custom".
        settings = settings.with_changes(epochs=args.epochs)
        values["preset"] = "custom"
    values.update(epochs=settings.epochs, lamb=settings.lamb, erase_scale=settings.erase_scale,
                  preserve_scale=settings.preserve_scale, reg_scale=settings.reg_scale, strength=1.0)
    return values


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def default_prefix(concepts: list[str]) -> str:
    name = "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", c).strip("-.") for c in concepts)[:60] or "concept"
    return f"checkpoints/rece_{name}"


def validate(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Everything that can be checked before the server starts."""
    import rece_ops

    if args.concepts is None:
        args.concepts = DEMO_CONCEPT if args.checkpoint is None else "nudity"
    if args.prompt is None and args.checkpoint is None:
        args.prompt = DEMO_PROMPT
    concepts = rece_ops.split_concepts(args.concepts)
    if not concepts:
        raise UsageError("no concepts given: pass --concepts 'name'")
    if args.epochs is not None and args.epochs < 0:
        raise UsageError(f"--epochs must be 0 or more, got {args.epochs}")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be between 0 and 2^64 - 1, got {args.seed}")
    if args.size is not None and (args.size < 16 or args.size % 8):
        raise UsageError(f"--size must be a multiple of 8, at least 16, got {args.size}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.output_prefix is not None and (args.output_prefix.startswith("/") or ".." in Path(args.output_prefix).parts):
        raise UsageError(f"--output-prefix must stay inside the output folder, got {args.output_prefix!r}")
    return check_checkpoint(args.checkpoint), concepts


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    try:
        checkpoint, concepts = validate(args)
        return run(args, checkpoint, concepts, started)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def graph_for(args: argparse.Namespace, object_info: dict, ckpt_name: str, concepts: list[str],
              demo: bool, on_cpu: bool) -> tuple[dict, dict]:
    """The example workflow in API format with the flags applied, and what was chosen."""
    graph = workflows.to_api(workflows.load_workflow(WORKFLOW), object_info)
    graph = workflows.with_checkpoint(graph, ckpt_name)
    graph = workflows.with_inputs(graph, class_type="RECEEraseConcept", **node_settings(args, concepts))
    for node_id in workflows.api_nodes(graph, "RECEEraseConcept"):
        graph[node_id]["_meta"]["title"] = f"RECE Erase Concept: {shorten(', '.join(concepts))}"
    prompt = args.prompt if args.prompt is not None else ", ".join(concepts)
    graph = workflows.with_inputs(graph, title=PROMPT_TITLE, text=prompt)
    sampler = workflows.api_nodes(graph, "KSampler")[0]
    seed = args.seed if args.seed is not None else graph[sampler]["inputs"]["seed"]
    (latent,) = workflows.api_nodes(graph, "EmptyLatentImage")
    size = args.size or (64 if demo else 256 if on_cpu else graph[latent]["inputs"]["width"])
    steps = args.steps or (20 if demo else 12 if on_cpu else graph[sampler]["inputs"]["steps"])
    graph = workflows.with_inputs(graph, class_type="KSampler", seed=seed, steps=steps)
    if demo:  # the settings the demo model was measured with
        graph = workflows.with_inputs(graph, class_type="KSampler", **DEMO_SAMPLER)
    graph = workflows.with_inputs(graph, class_type="EmptyLatentImage", width=size, height=size)
    chosen = {"prompt": prompt, "seed": seed, "size": size, "steps": steps}
    if not args.no_save:
        (loader,) = workflows.api_nodes(graph, "CheckpointLoaderSimple")
        (eraser,) = workflows.api_nodes(graph, "RECEEraseConcept")
        prefix = args.output_prefix or default_prefix(concepts)
        graph[str(max(int(i) for i in graph) + 1)] = {
            "class_type": "CheckpointSave",
            "inputs": {"model": [eraser, 0], "clip": [loader, 1], "vae": [loader, 2], "filename_prefix": prefix},
            "_meta": {"title": "Save erased checkpoint"},
        }
        chosen["prefix"] = prefix
    return graph, chosen


def model_paths_yaml(workdir: Path, checkpoint: Path) -> tuple[Path, str]:
    """A per-run extra_model_paths file that also shows ``checkpoint`` to the server (through a
    symbolic link, never a copy); returns it and the checkpoint's name for CheckpointLoaderSimple."""
    folder = workdir / "models" / "checkpoints"
    (folder / LINK_SUBFOLDER).mkdir(parents=True)
    (folder / LINK_SUBFOLDER / checkpoint.name).symlink_to(checkpoint)
    config = paths.EXTRA_PATHS_FILE.read_text() if paths.EXTRA_PATHS_FILE.exists() else ""
    config += f"\nrece_main_job_run:\n    checkpoints: {json.dumps(str(folder))}\n"
    yaml_path = workdir / "extra_model_paths.yaml"
    yaml_path.write_text(config)
    return yaml_path, f"{LINK_SUBFOLDER}/{checkpoint.name}"


def stage_checkpoint_save(graph: dict, prefix: str) -> str:
    """Point the graph's CheckpointSave at a per-run hidden folder of the
    output folder; returns that folder's name. ComfyUI's CheckpointSave writes
    in place, so an interrupted save would leave a truncated checkpoint under
    its final name: the file is published only once complete (``publish``)."""
    staging = f".rece-partial-{os.getpid()}-{time.time_ns()}"
    (save,) = workflows.api_nodes(graph, "CheckpointSave")
    graph[save]["inputs"]["filename_prefix"] = f"{staging}/{prefix}"
    return staging


def publish(staged: Path, output_dir: Path, prefix: str) -> Path:
    """Give a complete staged file the next free name ComfyUI's own save would
    (``<prefix>_NNNNN_.safetensors``, through its ``get_save_image_path``);
    never replaces a file."""
    host.prepare_comfy_imports()
    import folder_paths

    from rece_ops.tensor_files import publish_new

    for _ in range(100):
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(output_dir))
        target = Path(folder) / f"{name}_{counter:05}_{staged.suffix}"
        try:
            publish_new(staged, target)
        except FileExistsError:
            continue  # another writer took the name since it was counted
        return target
    raise RuntimeError(f"could not find a free file name for {prefix!r} in {output_dir}")


def execution_error(entry: dict, graph: dict) -> tuple[str, str] | None:
    """(exception type, 'node title: message') of a failed prompt, from its history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            title = graph.get(str(data.get("node_id")), {}).get("_meta", {}).get("title") or data.get("node_type", "a node")
            message = " ".join(str(data.get("exception_message", "")).split())
            return data.get("exception_type", ""), f"{title}: {message}"
    return None


def refused(error: urllib.error.HTTPError, graph: dict) -> str:
    """POST /prompt's validation errors as one line."""
    try:
        body = json.loads(error.read())
    except ValueError:
        return f"HTTP {error.code}"
    parts = [body.get("error", {}).get("message", "")]
    for node_id, node_error in (body.get("node_errors") or {}).items():
        title = graph.get(node_id, {}).get("_meta", {}).get("title", node_id)
        for item in node_error.get("errors", []):
            parts.append(f"{title}: {item.get('message', '')} ({item.get('details', '')})")
    return "; ".join(p for p in parts if p)


def run(args: argparse.Namespace, checkpoint: Path, concepts: list[str], started: float) -> int:
    import torch

    on_cpu = not torch.cuda.is_available()
    demo = args.checkpoint is None
    output_dir = (args.output_dir or DEFAULT_OUTPUT_DIR).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="rece-main-job-"))
    staging: Path | None = None
    try:
        ckpt_name, extra_model_paths = paths.DEMO_NAME, None
        if not demo:
            extra_model_paths, ckpt_name = model_paths_yaml(workdir, checkpoint)
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(
                    host.server(workdir, output_dir=output_dir, extra_model_paths=extra_model_paths))
            except (RuntimeError, TimeoutError) as error:
                print(error, file=sys.stderr)  # it ends with the server log's last lines
                print("error: the ComfyUI server did not start (its log is above)", file=sys.stderr)
                return 1
            t_start = time.perf_counter() - t0
            object_info = server.get("/object_info", timeout=120)
            missing = workflows.missing_node_types(workflows.load_workflow(WORKFLOW), object_info)
            if missing:
                # The log goes with the per-run folder: show its end.
                print("\n".join(server.log().splitlines()[-40:]), file=sys.stderr)
                print(f"error: ComfyUI has no {', '.join(missing)} node: the pack did not load "
                      "(the server log's end is above)", file=sys.stderr)
                return 1
            graph, chosen = graph_for(args, object_info, ckpt_name, concepts, demo, on_cpu)
            print(f"checkpoint      {checkpoint}" + (" (the trained shapes demo model)" if demo else ""))
            print(f"workflow        {WORKFLOW.relative_to(paths.REPO_ROOT)}: {chosen['size']}x{chosen['size']}, "
                  f"{chosen['steps']} steps, seed {chosen['seed']}, prompt {shorten(chosen['prompt'])!r}"
                  f"{' (CPU)' if on_cpu else ''}")
            if "prefix" in chosen:
                staging = output_dir / stage_checkpoint_save(graph, chosen["prefix"])
            t0 = time.perf_counter()
            try:
                entry = server.run_prompt(graph, timeout=6 * 3600)
            except urllib.error.HTTPError as error:
                print(f"error: ComfyUI refused the workflow: {refused(error, graph)}", file=sys.stderr)
                return 2
            t_run = time.perf_counter() - t0
            failure = execution_error(entry, graph)
            if failure or entry.get("status", {}).get("status_str") != "success":
                kind, message = failure or ("", f"status {entry.get('status')}")
                print(f"error: {message}", file=sys.stderr)
                # The nodes raise ValueError for bad input (e.g. a concept longer than 75 tokens).
                return 2 if kind == "ValueError" else 1
            saved = [publish(staged, output_dir, chosen["prefix"])
                     for staged in sorted(staging.rglob("*.safetensors"))] if staging is not None else []
            return report(entry, graph, chosen, output_dir, saved, t_start, t_run, started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def report(entry: dict, graph: dict, chosen: dict, output_dir: Path, saved: list[Path],
           t_start: float, t_run: float, started: float) -> int:
    outputs = entry.get("outputs", {})
    (eraser,) = workflows.api_nodes(graph, "RECEEraseConcept")
    previews = [i for i in workflows.api_nodes(graph, "PreviewAny") if graph[i]["inputs"].get("source") == [eraser, 1]]
    texts = [t for i in previews for t in outputs.get(i, {}).get("text", [])]
    print(f"--- {graph[eraser]['_meta']['title']} ---")
    print("\n".join(texts) if texts else "(no report came back)")
    print("---")
    for node_id in workflows.api_nodes(graph, "SaveImage"):
        for image in outputs.get(node_id, {}).get("images", []):
            path = output_dir / image.get("subfolder", "") / image["filename"]
            print(f"comparison      {path} (left: original model, right: erased; same seed {chosen['seed']})")
    if "prefix" in chosen:
        for path in saved:
            print(f"saved           {path} ({path.stat().st_size / 2**20:.0f} MiB)")
        if not saved:
            print(f"error: CheckpointSave reported success but no {chosen['prefix']}_*.safetensors appeared in {output_dir}",
                  file=sys.stderr)
            return 1
    print(f"time            ComfyUI start {t_start:.1f} s, workflow {t_run:.1f} s "
          f"(load, erase, sample twice, decode{', save checkpoint' if 'prefix' in chosen else ''}), "
          f"total {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

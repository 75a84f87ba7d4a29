"""Run the provisioned ComfyUI: imported in-process, or as a server on 127.0.0.1.

In-process use follows ComfyUI's own start-up order: ComfyUI's folder first on
``sys.path`` (it has a top-level ``nodes`` module, and so does this pack), CPU
mode set before ``comfy.model_management`` is imported, then the built-in and
custom nodes loaded the way ``main.py`` loads them.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Iterator

from devkit import paths

_loaded_nodes: ModuleType | None = None


def require_host() -> Path:
    comfy = paths.comfyui_dir()
    if not (comfy / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {comfy}: run scripts/setup.sh first")
    return comfy


def prepare_comfy_imports() -> None:
    """Make ``comfy`` importable as ComfyUI's ``main.py`` would, without loading nodes.

    ComfyUI's folder goes first on ``sys.path`` (it has a top-level ``nodes``
    module, and so does this pack), its argument parsing is off, and CPU mode
    is set before ``comfy.model_management`` is imported when there is no GPU.
    """
    comfy_dir = str(require_host())
    if comfy_dir not in sys.path[:1]:
        sys.path.insert(0, comfy_dir)
    # Another top-level 'nodes' (this pack's folder) must not shadow ComfyUI's.
    stale = sys.modules.get("nodes")
    if stale is not None and not str(getattr(stale, "__file__", "")).startswith(comfy_dir):
        del sys.modules["nodes"]
    if "comfy.cli_args" in sys.modules:
        return
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    import torch

    if not torch.cuda.is_available():
        args.cpu = True


def load_in_process(output_dir: Path | None = None, quiet: bool = False) -> ModuleType:
    """Import ComfyUI into this process once and return its ``nodes`` module.

    Custom nodes (this pack among them) are loaded, and the project's
    checkpoint folder is registered, exactly as the server would do it.
    ``quiet`` hides ComfyUI's start-up warnings (its optional audio, kornia
    and spandrel nodes are not installed here) but keeps errors.
    """
    global _loaded_nodes
    if _loaded_nodes is not None:
        return _loaded_nodes
    prepare_comfy_imports()
    import folder_paths
    import utils.extra_config

    if paths.EXTRA_PATHS_FILE.exists():
        utils.extra_config.load_extra_path_config(str(paths.EXTRA_PATHS_FILE))
    if output_dir is not None:
        folder_paths.set_output_directory(str(output_dir))
    root_logger = logging.getLogger()
    level = root_logger.level
    if quiet:
        root_logger.setLevel(logging.ERROR)
    try:
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    finally:
        root_logger.setLevel(level)
    _loaded_nodes = nodes
    return nodes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A ComfyUI server process on 127.0.0.1 with a small JSON client."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path, output_dir: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.output_dir = output_dir
        self.base = f"http://127.0.0.1:{port}"

    def get(self, route: str, timeout: float = 30) -> object:
        with urllib.request.urlopen(self.base + route, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, route: str, body: object, timeout: float = 30) -> object:
        request = urllib.request.Request(
            self.base + route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run_prompt(self, graph: dict, timeout: float = 300) -> dict:
        """POST an API-format graph and wait for its history entry."""
        prompt_id = self.post("/prompt", {"prompt": graph})["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                entry = history[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({self.process.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log()[-4000:]}")


@contextlib.contextmanager
def server(
    workdir: Path,
    startup_timeout: float = 120,
    output_dir: Path | None = None,
    extra_model_paths: Path | None = None,
) -> Iterator[Server]:
    """Start ComfyUI's ``main.py`` on a free 127.0.0.1 port; stop it on exit.

    Temp and user folders live under ``workdir`` (and the output folder,
    unless ``output_dir`` is given) so parallel test workers never share
    state. ``extra_model_paths`` replaces the project's model-paths file.
    """
    comfy = require_host()
    output_dir = output_dir or workdir / "output"
    for folder in (output_dir, workdir / "temp", workdir / "user"):
        folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "comfyui.log"
    command = [
        sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(port),
        "--output-directory", str(output_dir), "--temp-directory", str(workdir / "temp"),
        "--user-directory", str(workdir / "user"), "--disable-auto-launch",
    ]
    import torch

    if not torch.cuda.is_available():
        command.append("--cpu")
    extra_model_paths = extra_model_paths or paths.EXTRA_PATHS_FILE
    if extra_model_paths.exists():
        command += ["--extra-model-paths-config", str(extra_model_paths)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    handle = Server(process, port, log_path, output_dir)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited ({process.returncode}):\n{handle.log()[-4000:]}")
            try:
                handle.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI not ready in {startup_timeout} s:\n{handle.log()[-4000:]}")
                time.sleep(0.25)
        yield handle
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def pack_module(submodule: str = "") -> ModuleType:
    """This pack as ComfyUI loaded it (or one of its submodules, e.g.
    ``"nodes.model_weights"``), after ``load_in_process``.

    ComfyUI names a custom-node package after its path, so it is found by file.
    """
    import importlib

    load_in_process()
    init_file = (paths.REPO_ROOT / "__init__.py").resolve()
    # pytest may import the repo root as a package too; ComfyUI's copy is the
    # one named after its custom_nodes path.
    candidates = sorted(
        (name for name, module in list(sys.modules.items())
         if Path(getattr(module, "__file__", None) or "/nonexistent").resolve() == init_file),
        key=lambda name: "custom_nodes" not in name,
    )
    if candidates:
        return importlib.import_module(f"{candidates[0]}.{submodule}") if submodule else sys.modules[candidates[0]]
    raise RuntimeError("ComfyUI did not load this pack: is it linked into custom_nodes/? Run scripts/setup.sh")

"""The test host: provisioning is idempotent and COMFYUI_PATH selects another ComfyUI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from devkit import host, paths, provision as provisioning

# The host set-up makes when COMFYUI_PATH is not set (the tests may run with it
# set), for the host the suite runs on (RECE_HOST: 0.3.75 or 0.33).
HOST = paths.host_spec()
DEFAULT_HOST = HOST.comfy_dir


def provision(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "devkit.provision", "--skip-checkpoints"],
        cwd=paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def copy_of_host(tmp_path):
    """A ComfyUI checkout elsewhere: the provisioned one, without this pack linked."""
    source, target = host.require_host(), tmp_path / "OtherComfyUI"
    anywhere = shutil.ignore_patterns(paths.PACK_LINK_NAME, "__pycache__", ".git")

    def ignore(folder, names):
        # Top-level data folders: a user's own checkout (COMFYUI_PATH) can hold gigabytes of models.
        top = {"output", "temp", "user", "models"} if Path(folder) == source else set()
        return anywhere(folder, names) | (top & set(names))

    shutil.copytree(source, target, symlinks=True, ignore=ignore)
    return target


def test_provisioning_twice_changes_nothing_the_second_time():
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    first = provision(env)
    assert first.returncode == 0, first.stderr
    link = DEFAULT_HOST / "custom_nodes" / paths.PACK_LINK_NAME
    stamp = link.lstat().st_mtime_ns
    second = provision(env)
    assert second.returncode == 0, second.stderr
    # A second run reports the host and does nothing else.
    assert [line for line in second.stdout.splitlines() if line.startswith("[setup]")] == [
        f"[setup] ComfyUI {HOST.version} at {DEFAULT_HOST}"
    ]
    assert link.lstat().st_mtime_ns == stamp and link.resolve() == paths.REPO_ROOT


def test_comfyui_path_points_the_harness_at_another_checkout(tmp_path, monkeypatch):
    other = copy_of_host(tmp_path)
    env = dict(os.environ, COMFYUI_PATH=str(other))
    result = provision(env)
    assert result.returncode == 0, result.stderr
    assert f"at {other}" in result.stdout
    assert (other / "custom_nodes" / paths.PACK_LINK_NAME).resolve() == paths.REPO_ROOT

    monkeypatch.setenv("COMFYUI_PATH", str(other))
    with host.server(tmp_path / "work") as running:
        stats = running.get("/system_stats")
        assert stats["system"]["comfyui_version"] == provisioning.comfyui_version(other)
        # The server runs from the other checkout and loads the pack from there.
        assert str(other / "custom_nodes" / paths.PACK_LINK_NAME) in running.log()


def test_comfyui_path_that_is_not_comfyui_is_refused(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path))
    result = provision(env)
    assert result.returncode != 0
    assert "is not a ComfyUI checkout" in result.stderr


def test_each_host_has_its_own_environment_and_stand_ins():
    """The two hosts' pins clash (their web-page packages), so each has a venv;
    this suite runs in its host's one, with the stand-ins that host needs."""
    assert Path(sys.prefix).resolve() == HOST.venv.resolve()
    assert provisioning.comfyui_version(DEFAULT_HOST) == HOST.version
    for package in HOST.stand_ins:
        module = __import__(package)
        real = "stub" not in getattr(module, "__version__", "stub")
        assert real or Path(module.__file__).parent.parent == provisioning.stand_ins_dir(), module.__file__
    assert len({spec.venv for spec in paths.HOSTS.values()}) == len(paths.HOSTS)


def test_version_is_read_without_running_the_file(tmp_path):
    (tmp_path / "comfyui_version.py").write_text('raise SystemExit("ran")\n__version__ = "9.8.7"\n')
    assert provisioning.comfyui_version(tmp_path) == "9.8.7"
    assert provisioning.comfyui_version(tmp_path / "nowhere") == "unknown"

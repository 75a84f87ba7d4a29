#!/usr/bin/env bash
# Comfy Registry readiness of the pack, as `comfy node publish` would see it:
#   1. `comfy node validate` in the repository root (pyproject.toml parsed by
#      comfy-cli, and its ruff security rules: exec, eval, one-line `a; b`);
#      comfy-cli only warns and exits 0, so any warning fails here
#   2. the fields the registry's pyproject.toml specification requires or
#      recommends (https://docs.comfy.org/registry/specifications)
#   3. the archive comfy-cli would upload (git-tracked files minus .comfyignore,
#      built with comfy-cli's own packer into a temporary folder): ComfyUI's
#      files and the main job's (scripts/run_main.sh and what it imports) in,
#      tests, benchmarks, CI and the registry check out
# comfy-cli lives in its own venv, .host/venv-comfy-cli (pinned, created on the
# first run, reused after; it pulls no torch). Needs PyPI on the first run
# only; no prompts, no telemetry, no update check (stdin may be closed).
# Exits non-zero on any problem. Safe to run again, and alongside another run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# comfy-cli, and what decides the outcome: ruff (the security rules), tomlkit
# (pyproject parsing), pathspec (.comfyignore matching).
pins=(comfy-cli==1.23.0 ruff==0.17.6 tomlkit==0.15.2 pathspec==1.1.1)
venv=.host/venv-comfy-cli
python="${PYTHON:-python3}"
export DO_NOT_TRACK=1 COMFY_NO_TELEMETRY=1 COMFY_NO_UPDATE_CHECK=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# comfy node validate runs `ruff check .` here; its cache goes with the venv, not into the tree.
export RUFF_CACHE_DIR="$root/.host/ruff-cache"

mkdir -p .host
# One set-up at a time (two runs at once would install into the same venv).
exec 9>.host/.venv-comfy-cli.lock
command -v flock >/dev/null 2>&1 && flock 9

stamp="$venv/.pins"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "${pins[*]}" ] || ! "$venv/bin/python" -c 'import comfy_cli' 2>/dev/null; then
    if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "[registry] creating $venv"
        "$python" -m venv --clear "$venv"
    fi
    echo "[registry] installing ${pins[*]} into $venv"
    "$venv/bin/python" -m pip install -qq "${pins[@]}"
    # comfy-cli needs no torch; a venv holding one means something pulled it in.
    if "$venv/bin/python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'; then
        echo "[registry] torch was installed into $venv by: $("$venv/bin/python" -m pip show torch 2>/dev/null | sed -n 's/^Required-by: //p')" >&2
        exit 1
    fi
    echo "${pins[*]}" > "$stamp"
fi
exec 9>&-

failed=0

echo "--- comfy node validate ---"
set +e
validate_out="$("$venv/bin/comfy" --skip-prompt --no-json node validate </dev/null 2>&1)"
validate_rc=$?
set -e
printf '%s\n' "$validate_out"
if [ "$validate_rc" -ne 0 ]; then
    echo "[registry] comfy node validate exited $validate_rc" >&2
    failed=1
elif grep -qiE '^(warning|error)|security warnings' <<<"$validate_out" \
        || ! grep -q 'All validation checks passed successfully' <<<"$validate_out"; then
    echo "[registry] comfy node validate reported problems (above)" >&2
    failed=1
fi

echo "--- registry fields and the archive ---"
"$venv/bin/python" - <<'PY' || failed=1
import contextlib
import io
import modulefinder
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from comfy_cli.file_utils import zip_files
from comfy_cli.registry.config_parser import extract_node_configuration

root = Path.cwd()
problems: list[str] = []


def problem(message: str) -> None:
    problems.append(message)
    print("PROBLEM: " + message)


# --- the fields (https://docs.comfy.org/registry/specifications) -----------------
import tomlkit

raw = tomlkit.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
project, comfy = raw.get("project", {}), raw.get("tool", {}).get("comfy", {})
urls = project.get("urls", {})
with contextlib.redirect_stdout(io.StringIO()) as parser_messages:
    config = extract_node_configuration(str(root / "pyproject.toml"))
for line in parser_messages.getvalue().splitlines():
    if line.strip():
        problem(f"comfy-cli's parser: {line.strip()}")
if config is None:
    sys.exit("pyproject.toml could not be parsed")
p, c = config.project, config.tool_comfy

name = p.name
if not (0 < len(name) < 100 and re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", name)
        and not re.search(r"[._-]{2}", name) and name[-1].isalnum()):
    problem(f"[project] name {name!r}: under 100 characters, letters, digits, '-', '_', '.', "
            "starting with a letter, no two special characters in a row")
if "comfy" in name.lower():
    problem(f"[project] name {name!r} includes 'comfy' (the registry asks for names without 'ComfyUI')")
if not re.fullmatch(r"\d+\.\d+\.\d+", p.version or ""):
    problem(f"[project] version {p.version!r} is not X.Y.Z")
if not p.description.strip():
    problem("[project] description is empty")
license_field = project.get("license")
if not isinstance(license_field, dict) or not (license_field.get("file") or license_field.get("text")):
    problem('[project] license must be { file = "LICENSE" } or { text = "..." }')
elif license_field.get("file") and not (root / license_field["file"]).is_file():
    problem(f"[project] license file {license_field['file']} does not exist")
if not project.get("requires-python"):
    problem("[project] requires-python is not set")
if not p.supported_os:
    problem("[project] classifiers name no operating system")
if not p.supported_comfyui_version:
    problem("[tool.comfy] requires-comfyui is not set (or not valid)")
repository = p.urls.repository
if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository or ""):
    problem(f"[project.urls] Repository {repository!r} is not a https://github.com/OWNER/REPO URL")
for key in ("Documentation", "Bug Tracker"):
    if not str(urls.get(key, "")).startswith("https://"):
        problem(f"[project.urls] {key!r} is not set")
if not c.publisher_id:
    problem("[tool.comfy] PublisherId is not set")
if not c.display_name:
    problem("[tool.comfy] DisplayName is not set")

listing = subprocess.run(["git", "ls-files"], capture_output=True, text=True)
if listing.returncode != 0:
    sys.exit("not a git checkout (or git refused it): comfy-cli publishes the git-tracked files, so run this in one\n"
             + listing.stderr.strip())
tracked = set(listing.stdout.splitlines())
icon = c.icon
if not icon.startswith("https://"):
    problem(f"[tool.comfy] Icon {icon!r} is not a https URL")
elif not re.search(r"\.(png|svg|jpe?g|gif)$", icon, re.IGNORECASE):
    problem(f"[tool.comfy] Icon {icon!r}: the registry takes SVG, PNG, JPG or GIF")
else:
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/"
    if icon.startswith(prefix):
        # .../OWNER/REPO/BRANCH/PATH: the file must be in the repository, square, at most 400 px.
        icon_path = icon[len(prefix):].split("/", 1)[-1]
        if icon_path not in tracked:
            problem(f"[tool.comfy] Icon names {icon_path}, which is not a tracked file of this repository")
        elif icon_path.lower().endswith(".png"):
            head = (root / icon_path).read_bytes()[:24]
            width, height = struct.unpack(">II", head[16:24]) if head[:8] == b"\x89PNG\r\n\x1a\n" else (0, 0)
            if not (width == height and 0 < width <= 400):
                problem(f"{icon_path} is {width}x{height}: the registry wants a square icon of at most 400x400")
for include in c.includes:
    if not (root / include).exists():
        problem(f"[tool.comfy] includes names {include}, which does not exist")

print(f"name {name} {p.version}, publisher {c.publisher_id}, ComfyUI {p.supported_comfyui_version}, "
      f"OS {', '.join(p.supported_os)}, accelerators {', '.join(p.supported_accelerators) or 'none'}")

# --- the archive ------------------------------------------------------------------
with tempfile.TemporaryDirectory(prefix="rece-registry-") as tmp:
    archive = Path(tmp) / "node.zip"
    with contextlib.redirect_stdout(io.StringIO()) as packer_messages:
        zip_files(str(archive), includes=c.includes)
    for line in packer_messages.getvalue().splitlines():
        if line.strip():
            problem(f"comfy-cli's packer: {line.strip()}")
    with zipfile.ZipFile(archive) as handle:
        infos = handle.infolist()
    packed = {info.filename for info in infos}
    archive_size = archive.stat().st_size
unpacked_size = sum(info.file_size for info in infos)


def under(folder: str) -> set[str]:
    return {f for f in tracked if f.startswith(folder + "/")}


# What ComfyUI loads, and the pack's own files.
required = {"__init__.py", "LICENSE", "README.md", "pyproject.toml", "requirements.txt"} & (tracked | {"__init__.py"})
for folder in ("nodes", "rece_ops", "red_team_ops", "web", "locales", "example_workflows"):
    required |= under(folder)
required |= {f for f in under("demo_model") if f.endswith(".safetensors")}

# The main job: its shell scripts, the scripts and requirement files they name,
# and every repository module its Python entry points import.
scripts, entry_modules, seen = ["scripts/run_main.sh"], set(), set()
while scripts:
    script = scripts.pop()
    if script in seen or not (root / script).is_file():
        continue
    if script not in tracked:
        problem(f"{script} is used by the main job but not tracked by git, so it would not be published")
    seen.add(script)
    required.add(script)
    text = (root / script).read_text(encoding="utf-8")
    if script.endswith(".txt"):
        scripts += [str(Path(script).parent / m) for m in re.findall(r"^-r\s+(\S+)", text, re.MULTILINE)]
        continue
    scripts += re.findall(r"scripts/[\w.-]+", text)
    entry_modules |= set(re.findall(r"\b(devkit(?:\.\w+)+)", text))
for requirements in sorted(tracked):
    if re.fullmatch(r"scripts/requirements[\w.-]*\.txt", requirements):
        required.add(requirements)
finder = modulefinder.ModuleFinder(path=[str(root)])
entry_points = [root / f for f in seen if f.endswith(".py")]
for module in sorted(entry_modules):
    candidate = root / (module.replace(".", "/") + ".py")
    if candidate.exists():
        entry_points.append(candidate)
    elif not (root / module.replace(".", "/") / "__init__.py").exists():
        problem(f"the main job's scripts name {module}, which is not in the repository")
for entry in entry_points:
    finder.run_script(str(entry))
for module in finder.modules.values():
    if module.__file__ and Path(module.__file__).resolve().is_relative_to(root):
        relative = Path(module.__file__).resolve().relative_to(root).as_posix()
        if relative in tracked:
            required.add(relative)

missing = sorted((required & tracked) - packed)  # untracked ones are reported above
for f in missing:
    problem(f"{f} is needed by the nodes or the main job but is left out of the archive (.comfyignore)")

forbidden = set()
for folder in ("tests", "benchmarks", ".ci", ".github"):
    forbidden |= under(folder)
forbidden |= {"scripts/run_tests.sh", "scripts/validate_registry.sh"} & tracked
for f in sorted(forbidden & packed):
    problem(f"{f} is development-only but is in the archive (.comfyignore)")

# What is in, by top-level folder.
groups: dict[str, list[str]] = {}
for f in sorted(packed):
    groups.setdefault(f.split("/", 1)[0] if "/" in f else ".", []).append(f)
print(f"archive: {len(packed)} files, {unpacked_size / 2**20:.1f} MiB ({archive_size / 2**20:.1f} MiB zipped)")
for group, files in groups.items():
    label = "(top level)" if group == "." else group + "/"
    shown = ", ".join(Path(f).name for f in files) if len(files) <= 6 else f"{len(files)} files"
    print(f"  {label:<20} {shown}")
left_out = set()
for f in tracked - packed:  # each left-out file as its largest folder left out whole
    parts, shown = f.split("/"), f
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        if not under(folder) & packed:
            shown = folder + "/"
            break
    left_out.add(shown)
print(f"left out: {', '.join(sorted(left_out))}")
untracked = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--directory"],
                           capture_output=True, text=True, check=True).stdout.split()
if untracked:
    print(f"note: not tracked by git, so not published until committed: {', '.join(untracked[:8])}"
          + (" ..." if len(untracked) > 8 else ""))

sys.exit(1 if problems else 0)
PY

if [ "$failed" -ne 0 ]; then
    echo "[registry] NOT ready for the Comfy Registry (see above)" >&2
    exit 1
fi
echo "[registry] ready for the Comfy Registry: comfy node validate clean, fields and archive as expected"

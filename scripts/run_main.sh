#!/usr/bin/env bash
# The main job, set-up included (safe to run again): erase a concept from a
# checkpoint through ComfyUI and save the erased checkpoint.
#   scripts/run_main.sh [CHECKPOINT.safetensors] [--concepts "..."] [--preset nudity] ...
# Without a checkpoint it uses the built-in demo checkpoint.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
exec .venv/bin/python scripts/erase_checkpoint.py "$@"

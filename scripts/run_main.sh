#!/usr/bin/env bash
# The main job, set-up included (safe to run again): run the example workflow
# example_workflows/rece_erase_compare_same_seed.json on a ComfyUI server to
# erase a concept from a checkpoint, compare original and erased with the same
# seed, and save the erased checkpoint (to output/, counter-numbered: never
# overwrites).
#   scripts/run_main.sh [CHECKPOINT.safetensors] [--concepts "..."] [--preset nudity] [--prompt "..."] [--seed N] ...
# Without a checkpoint it uses the built-in demo checkpoint. --help lists the options.
# A leading --host 0.33 runs it on ComfyUI 0.33.0 instead (see scripts/setup.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/host_env.sh
set -- "${host_args[@]}"
# --help needs no set-up once the environment exists (set-up builds gigabytes of test checkpoints).
for arg in "$@"; do
    if { [ "$arg" = --help ] || [ "$arg" = -h ]; } && [ -x "$venv/bin/python" ]; then
        exec "$venv/bin/python" scripts/erase_checkpoint.py --help
    fi
done
bash scripts/setup.sh
exec "$venv/bin/python" scripts/erase_checkpoint.py "$@"

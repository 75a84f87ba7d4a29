#!/usr/bin/env bash
# The whole test suite, set-up included (safe to run again). Extra arguments go to pytest.
#   scripts/run_tests.sh [--host 0.3.75|0.33] [pytest arguments]
# --host 0.33 runs it on ComfyUI 0.33.0 in .venv-0.33 (see scripts/setup.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source scripts/host_env.sh
bash scripts/setup.sh
# Two workers: this machine and CI have 2 cores. One thread each, also in the
# ComfyUI servers the tests start: OpenMP threads spinning for a core the other
# worker holds made sampling ten times slower.
export OMP_NUM_THREADS=1
exec "$venv/bin/python" -m pytest -n 2 --dist loadgroup "${host_args[@]}"

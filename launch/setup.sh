#!/usr/bin/env bash
# Set up everything spatialscore needs on a fresh machine: Debian tesseract-ocr and chromium, a .venv with the
# exact pins of launch/constraints.txt, and the package installed editable. Idempotent: when nothing changed it returns in ~1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

apt_install() {  # apt_install PACKAGE: install a Debian package, refreshing the index once if needed
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q --no-install-recommends "$1" >/dev/null 2>&1 || {
        $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "$1" >/dev/null
    }
}

if ! command -v tesseract >/dev/null 2>&1; then
    echo "[setup] installing Debian tesseract-ocr (the shapes-world oracle reads signs with it)" >&2
    apt_install tesseract-ocr
fi

if ! command -v chromium >/dev/null 2>&1; then
    echo "[setup] installing Debian chromium (the leaderboard report's test opens the page headless)" >&2
    # only that test needs it (and says so when it skips): a failed install must not stop the set-up
    apt_install chromium || echo "[setup] warning: chromium could not be installed; the report's browser test will skip" >&2
fi

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $PYTHON" >&2
    "$PYTHON" -m venv .venv
fi

# Reinstall only when the pins or the package metadata changed.
stamp=".venv/.spatialscore-setup"
want="$(cat launch/constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing pinned packages into .venv (about a minute on a fresh machine)" >&2
    # torch is pinned in the same pip command: alone, a dependency's plain `torch` would pull a multi-GB CUDA build.
    .venv/bin/pip install -q --disable-pip-version-check \
        -c launch/constraints.txt "torch==2.13.0" -e ".[dev]"
    echo "$want" > "$stamp"
fi

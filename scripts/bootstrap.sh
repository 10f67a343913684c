#!/usr/bin/env bash
# Create ./.venv (once) and install tgate-fx with its test and ONNX extras.
# Sourced by the other scripts; safe to run again: it reinstalls only when
# pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TGATE_FX_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating $venv"
    "$python" -m venv "$venv"
fi
stamp="$venv/.tgate_fx_installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[bootstrap] installing (torch 2.13.0 CPU build first, so nothing pulls a CUDA wheel)"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # On a GPU machine, install the CUDA torch build you want before running this.
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
        "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    fi
    "$venv/bin/python" -m pip install --quiet -e "$root[test]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"

#!/usr/bin/env bash
# Create (or reuse) the venv in ~/.cache/relzoo/venv and install RelZoo with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RELZOO_VENV:-$HOME/.cache/relzoo/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
"$VENV/bin/python" -m pip install --quiet -e ".[test]"

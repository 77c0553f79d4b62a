#!/usr/bin/env bash
# Set up ./.venv with dfj and everything it needs. Idempotent: a second run with an unchanged
# pyproject.toml returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.dfj-install-stamp
want=$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import dfj, torch, transformers" 2>/dev/null; then
    echo "dfj: .venv is up to date"
    exit 0
fi
# torch 2.14.1 + torchvision 0.29.1: transformers 5 needs a working torchvision for the Qwen2.5-VL
# processor, and this pair is the one that installs together here (see README, "Versions").
if ! .venv/bin/python -m pip install --disable-pip-version-check -e '.[all]' > .venv/install.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/install.log | tail -40
    echo "dfj: install failed (full log: .venv/install.log)" >&2
    exit 1
fi
.venv/bin/python -c "import dfj, torch, torchvision, transformers, peft" 
echo "$want" > "$stamp"
echo "dfj: .venv ready"

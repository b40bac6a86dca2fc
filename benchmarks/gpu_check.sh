#!/usr/bin/env bash
# One command for the first machine with a GPU: install, prove the fused decode kernels on CUDA, time decoding.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--tiny]
#
# Writes under OUT_DIR (default: $OUT, else benchmarks/results/gpu_check): triton_tests.log (the `triton` tests run
# on CUDA) and gpu_check.json (benchmarks/gpu_check.py: decode step of a Llama-3-8B-shaped model vs DynamicCache +
# SDPA at 8k and 32k tokens, batch 1 and 8, bf16; attention alone; peak GPU memory).
# How it installs, first match wins:
#   KVHUB_SKIP_INSTALL=1  use ${PYTHON:-python3} as it is (tests/test_gpu_check.py does, with --tiny)
#   a .whl/ folder        a machine without a package index: those wheels (kvhub's missing dependencies) go into a
#                         scratch folder beside the machine's own CUDA torch and triton
#   otherwise             scripts/setup.sh: .venv with torch 2.13 from the default index (CUDA on Linux) and kvhub[dev]
# --tiny runs every part on CPU with a tiny shape (the kernels in Triton's interpreter): a test of this script.
# Exit status: the tests' (the timings run even when a test failed, and the JSON records the tests' result).
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=""
DEST="${OUT:-benchmarks/results/gpu_check}"
for arg in "$@"; do
  case "$arg" in
    --tiny) TINY=--tiny ;;
    *) DEST=$arg ;;
  esac
done
mkdir -p "$DEST"
PY=${PYTHON:-python3}
if [ "${KVHUB_SKIP_INSTALL:-0}" = 1 ]; then
  :
elif [ -d .whl ]; then
  site=${TMPDIR:-/tmp}/kvhub-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'triton', triton.__version__)"

# 1. The kernels against the PyTorch reference on CUDA (with --tiny: on CPU, one case, through the interpreter).
select=(-m triton)
[ -n "$TINY" ] && select+=(-k "llama-shaped or backend")
set +e
"$PY" -m pytest -q -p no:cacheprovider "${select[@]}" tests/test_kernels.py 2>&1 | tee "$DEST/triton_tests.log"
tests=${PIPESTATUS[0]}
set -e

# 2. Timings and memory.
"$PY" benchmarks/gpu_check.py --out "$DEST" --tests-log "$DEST/triton_tests.log" --tests-status "$tests" $TINY
exit "$tests"

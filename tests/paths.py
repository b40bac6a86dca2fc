"""Where the repo's corpora and presets are, for tests (the same folders kvhub's defaults resolve to)."""

from pathlib import Path

from kvhub.corpora import CORPORA

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = CORPORA / "calibration"
EVALUATION = CORPORA / "evaluation"
PRESETS = ROOT / "presets"
# the one-percent preset tuned on the books, bundled until 2026-12-07: scalar codes with keys after RoPE, which the fused
# kernels and LMCache's attention form read, and what the results measured before then were measured on
BOOKS_TUNED = ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"

"""Where the repo's corpora and presets are, for tests (the same folders kvhub's defaults resolve to)."""

from pathlib import Path

from kvhub.corpora import CORPORA

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = CORPORA / "calibration"
EVALUATION = CORPORA / "evaluation"
PRESETS = ROOT / "presets"

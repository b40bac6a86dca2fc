"""Where the shared corpora and the repo's presets are, for tests."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIBRATION = SHARED / "corpora" / "calibration"
EVALUATION = SHARED / "corpora" / "evaluation"
PRESETS = ROOT / "presets"

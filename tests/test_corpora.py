"""Calibration and evaluation text in the repository are disjoint: no evaluation paragraph was seen in calibration."""

from __future__ import annotations

import re

from tests.paths import ROOT

CORPORA = ROOT / "corpora"
MIN_CHARS = 120  # shorter blocks (a ``.. versionadded::`` line, ``return None``) recur legitimately


def paragraphs(folder: str) -> dict[str, str]:
    """Whitespace-normalized blank-line-separated blocks of at least MIN_CHARS characters -> the file they are in."""
    out = {}
    for path in sorted((CORPORA / folder).glob("*.txt")):
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
            norm = " ".join(block.split())
            if len(norm) >= MIN_CHARS:
                out.setdefault(norm, path.name)
    return out


def test_no_evaluation_paragraph_is_in_calibration():
    calibration, evaluation = paragraphs("calibration"), paragraphs("evaluation")
    assert len(evaluation) > 500 and len(calibration) > 500  # the check has something to compare
    shared = sorted(set(calibration) & set(evaluation))
    assert not shared, f"{len(shared)} shared paragraphs, e.g. {shared[0][:200]!r}"

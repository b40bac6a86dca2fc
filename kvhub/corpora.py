"""Where the calibration and evaluation corpora are: ``corpora/`` of the source checkout kvhub runs from.

Resolved relative to the package, never to the current directory, so a default works from any folder. The texts
are not in the wheel (see corpora/README.md): there the caller must name the files, and :func:`default_corpus`
says so in one line.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CorpusNotFoundError

CORPORA = Path(__file__).resolve().parents[1] / "corpora"
KINDS = {"calibration": "--calib", "evaluation": "--ppl"}


def default_corpus(kind: str) -> Path:
    """The checkout's ``corpora/<kind>`` folder; ``CorpusNotFoundError`` naming the option to pass when absent."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}: one of {', '.join(KINDS)}")
    path = CORPORA / kind
    if not path.is_dir():
        raise CorpusNotFoundError(
            f"no default {kind} corpus ({path} does not exist: the corpora ship with the source checkout, not the "
            f"wheel); fix: pass {KINDS[kind]} with your {kind} text files or folders"
        )
    return path

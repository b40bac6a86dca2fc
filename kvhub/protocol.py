"""The evaluation protocol's domains: the kinds of text a validated number covers, one evaluation corpus each.

A preset promises its perplexity target on *every* domain, not on their mean: a user who runs code, logs or German
through a preset validated on novels gets that domain's loss, not the average. The registry refuses metrics that
lack a domain (``kvhub registry check``, ``registry verify``), and the tuner holds its target to the worst
calibration domain. The texts are in ``corpora/evaluation`` (sources and licences in corpora/README.md); the
calibration text of each domain is in ``corpora/calibration``, from different documents.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# evaluation corpus (file stem) -> the domain it stands for
DOMAINS: dict[str, str] = {
    "austen_emma": "novel",
    "austen_persuasion": "novel",
    "kjv_new_testament": "scripture",
    "python_docs_library": "technical documentation",
    "python_stdlib_modules_b": "source code",
    "debian_reference_de_b": "German",
    "debian_changelogs_b": "logs",
}

# calibration corpus (file stem) -> its domain, for the calibration files in corpora/calibration that share one (the
# four novels; the Python guides and the library reference files evaluation does not hold); any other calibration
# file is a domain of its own
CALIBRATION_DOMAINS: dict[str, str] = {
    "austen_mansfield_park": "novel",
    "austen_northanger_abbey": "novel",
    "austen_pride_and_prejudice": "novel",
    "austen_sense_and_sensibility": "novel",
    "python_docs_guides": "technical documentation",
    "python_docs_reference": "technical documentation",
}


def calibration_domain(corpus: str) -> str:
    """The domain a calibration file (by stem) stands for: the protocol's name for it, else the file itself."""
    return CALIBRATION_DOMAINS.get(corpus, corpus)


# calibration.tuning.target_on of a preset whose target binds its worst domain (older presets bound the mean)
WORST_DOMAIN = "worst domain"


def worst_of(deltas: Mapping[str, float]) -> tuple[str, float]:
    """The domain (corpus) with the largest perplexity delta, and that delta: what a target is held to."""
    name = max(deltas, key=deltas.__getitem__)
    return name, deltas[name]


def missing_domains(corpora: Mapping[str, Any]) -> list[str]:
    """The protocol's corpora that a metrics block's per-corpus results (names -> anything) do not cover."""
    return [name for name in DOMAINS if name not in corpora]

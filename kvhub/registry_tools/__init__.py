"""Registry maintenance: verify a contributed preset, publish it, and generate the model zoo from the index.

- :mod:`.verify` re-measures a preset folder with the protocol its metrics record and compares within tolerances;
- :mod:`.publish` pushes a verified preset to the Hub and records it (commit, sha256s, metrics, provenance) in the
  index; it also uploads the index to the registry Hub repo;
- :mod:`.domains` refuses validated numbers that do not cover every domain of the evaluation protocol;
- :mod:`.zoo` renders ``MODEL_ZOO.md`` and the compression-vs-quality plot from the index, nothing typed by hand.

The index model itself (load, validate, resolve names) is :mod:`kvhub.registry`. Nothing here imports torch at
module level: the evaluation is imported when a verification runs.
"""

from __future__ import annotations

from .domains import check_domains
from .layout import RepoLayout, write_atomic
from .verify import Check, Tolerances, VerificationError, VerifyReport, compare_metrics, verify_preset
from .zoo import build_zoo, check_zoo, render_zoo

__all__ = [
    "Check", "RepoLayout", "Tolerances", "VerificationError", "VerifyReport", "build_zoo", "check_domains", "check_zoo",
    "compare_metrics", "render_zoo", "verify_preset", "write_atomic",
]

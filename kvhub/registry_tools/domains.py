"""The registry holds every validated number to the whole evaluation protocol (:mod:`kvhub.protocol`): an entry,
or the preset in the repository behind it, whose metrics lack a domain is refused, because its mean and its worst
would be silent about text it never saw."""

from __future__ import annotations

from ..errors import RegistryError
from ..preset_files import CONFIG_NAME, read_config
from ..protocol import missing_domains
from .layout import RepoLayout

FIX = ("fix: measure it on every domain (kvhub eval PRESET --ppl corpora/evaluation --needle --write-metrics), then "
       "`kvhub registry build`")


def _covers(where: str, corpora: dict, has_worst: bool) -> None:
    lacking = missing_domains(corpora)
    if lacking or not has_worst:
        what = f"lacks the domain(s) {', '.join(lacking)}" if lacking else "has no worst-domain figure"
        raise RegistryError(f"{where} {what}; {FIX}")


def check_domains(layout: RepoLayout) -> None:
    """Raise :class:`RegistryError` naming the first validated entry (index metrics or the repository's preset
    config) that lacks a protocol domain or its worst-domain figure."""
    document, index = layout.read_index()
    for raw, entry in zip(document["entries"], index.entries):
        if entry.status != "validated":
            continue
        metrics = raw["metrics"]
        _covers(f"{layout.index}: the entry for {entry.model}", metrics.get("ppl_delta_pct_by_corpus") or {},
                "ppl_delta_pct_worst" in metrics)
        config = layout.root / entry.recipe / CONFIG_NAME
        if config.is_file():
            ppl = read_config(config.parent)["metrics"]["perplexity"]
            _covers(f"{config}: the preset's measurement", ppl["corpora"], "worst_delta_pct" in ppl)

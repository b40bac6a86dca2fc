"""The registry index: which preset serves which base model.

The index is one JSON file (``index.json``, validated by ``schemas/registry.schema.json``) in a Hub repo, so it is
versioned, cached and mirrored exactly like the presets it points to, and can be pinned to a commit. A copy ships
inside the package so a machine that has never been online still knows the model names; falling back to it is
always announced (``RegistryIndex.fallback`` and a log warning), because it may be older than the Hub's.

This module is the index model only: load, validate, resolve a name, suggest close names. It reads the index
through the transport (:mod:`kvhub.hub`); downloading presets lives in :mod:`kvhub.hub_presets`.

Two facts per entry, never mixed: ``status`` says whether kvhub measured the preset (``validated``), and
``preset.revision`` says whether it is published (the commit on the Hub holding those files, with the ``endpoint``
it was made on); a validated preset may be unpublished, and then only the copy packaged with kvhub serves it.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import __version__
from .errors import (
    HubAuthError,
    HubError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    NoPresetError,
    RegistryFormatError,
    UnknownModelError,
)
from .hub import PUBLIC_ENDPOINT, FileRecord, fetch_file, say_once
from .schema import validate_config

DEFAULT_REGISTRY_REPO = "kvhub/registry"
REGISTRY_REPO_ENV = "KVHUB_REGISTRY_REPO"
REGISTRY_REVISION_ENV = "KVHUB_REGISTRY_REVISION"
INDEX_NAME = "index.json"
PACKAGED_SOURCE = f"packaged copy of kvhub {__version__}"
MAX_INDEX_ITEMS = 10_000  # entries, files or aliases in one array: far above any real index
MAX_INDEX_BYTES = 4 << 20  # ~100x today's index; bounded before parsing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StorageBudget:
    """One budget of a preset's storage codec, as the index records it."""

    name: str
    ratio: float
    ppl_delta_pct: float
    ppl_delta_pct_worst: float
    worst_corpus: str


@dataclass(frozen=True)
class Metrics:
    """The numbers presets are compared by; the same view of a registry entry and of a preset config."""

    context_length: int
    compression_total: float
    compression_keys: float
    compression_values: float
    ppl_delta_pct: float
    needle_accuracy: float | None = None
    needle_baseline_accuracy: float | None = None
    ppl_delta_pct_worst: float | None = None  # None: measured before the protocol recorded each corpus
    worst_corpus: str | None = None
    storage: tuple["StorageBudget", ...] = ()  # the storage codec's measured budgets (KV at rest), if any

    @classmethod
    def from_registry(cls, data: dict[str, Any]) -> "Metrics":
        needle = data.get("needle") or {}
        c = data["compression"]
        storage = tuple(StorageBudget(name, b["ratio_vs_fp16_chunk"], b["ppl_delta_pct"], b["ppl_delta_pct_worst"],
                                      b["worst_corpus"]) for name, b in (data.get("storage") or {}).items())
        return cls(data["context_length"], c["total"], c["keys"], c["values"], data["ppl_delta_pct"],
                   needle.get("accuracy"), needle.get("baseline_accuracy"), data.get("ppl_delta_pct_worst"),
                   data.get("worst_corpus"), storage)

    @classmethod
    def from_preset(cls, metrics: dict[str, Any]) -> "Metrics":
        """From ``kvhub_preset.json``'s ``metrics`` (schemas/preset.schema.json)."""
        needle = metrics.get("needle") or {}
        c = metrics["compression"]
        ppl = metrics["perplexity"]
        return cls(metrics["context_length"], c["total"], c["keys"], c["values"], ppl["mean_delta_pct"],
                   needle.get("accuracy"), needle.get("baseline_accuracy"), ppl.get("worst_delta_pct"),
                   ppl.get("worst_corpus"))


@dataclass(frozen=True)
class RegistryEntry:
    """One base model and the preset that serves it (see the schema for what each field means)."""

    model: str
    aliases: tuple[str, ...]
    status: str
    repo_id: str | None
    revision: str | None
    files: tuple[FileRecord, ...]
    recipe: str
    model_revision: str | None = None
    metrics: Metrics | None = None
    provenance: dict[str, str] | None = None
    notes: str | None = None
    claimed: dict[str, Any] | None = None
    endpoint: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RegistryEntry":
        preset = data["preset"]
        return cls(
            model=data["model"],
            aliases=tuple(data["aliases"]),
            status=data["status"],
            repo_id=preset["repo_id"],
            revision=preset["revision"],
            files=tuple(FileRecord.from_json(f) for f in preset["files"]),
            recipe=data["recipe"],
            model_revision=data.get("model_revision"),
            metrics=Metrics.from_registry(data["metrics"]) if data.get("metrics") else None,
            provenance=data.get("provenance"),
            notes=data.get("notes"),
            claimed=data.get("claimed"),
            endpoint=preset.get("endpoint"),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return (self.model, *self.aliases)

    @property
    def published(self) -> bool:
        """A commit holding the validated files exists on a Hub (:attr:`endpoint`, when recorded)."""
        return self.status == "validated" and self.revision is not None

    @property
    def on_public_hub(self) -> bool:
        """Published on huggingface.co itself (so a link to the commit there works)."""
        return self.published and self.endpoint == PUBLIC_ENDPOINT

    def pinned(self) -> tuple[str, str]:
        """The preset repo and commit to download; :class:`NoPresetError` while none is validated and published."""
        if self.published:
            assert self.repo_id and self.revision  # the schema requires a repo id for validated entries
            return self.repo_id, self.revision
        if self.status == "validated":
            raise NoPresetError(
                f"{self.model}: validated but not published on the Hub yet; fix: use the preset packaged with kvhub "
                "(kvhub falls back to it when it ships one), or pass a preset folder"
            )
        why = f"; {self.notes[:300]}" if self.notes else ""
        raise NoPresetError(
            f"{self.model}: no validated preset is published yet (registry status '{self.status}'{why}); "
            "fix: make one with `kvhub tune`, or pass a preset repo id or folder instead"
        )


@dataclass(frozen=True)
class RegistryIndex:
    """The parsed index, and where it came from (``fallback`` says why the packaged copy is used, else None)."""

    entries: tuple[RegistryEntry, ...]
    source: str
    fallback: str | None = None
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, document: Any, source: str, fallback: str | None = None) -> "RegistryIndex":
        """Validate ``document`` against the schema and the one-name-one-model rule, then build the index."""
        validate_config(document, f"registry index ({source})", error=RegistryFormatError, name="registry")
        entries = tuple(RegistryEntry.from_json(e) for e in document["entries"])
        _check_unique_names(entries, source)
        return cls(entries, source, fallback, document)

    def find(self, name: str) -> RegistryEntry | None:
        """The entry whose model id or alias equals ``name`` (case-insensitive), or None."""
        key = name.strip().lower()
        return next((e for e in self.entries if key in (n.lower() for n in e.names)), None)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """Known names close to ``name`` (difflib), best first, at most one per model."""
        owner = {known.lower(): (known, e.model) for e in self.entries for known in e.names}
        close = difflib.get_close_matches(name.strip().lower(), list(owner), n=len(owner), cutoff=0.6)
        best = {}
        for match in close:
            known, model = owner[match]
            best.setdefault(model, known)
        return list(best.values())[:n]

    def unknown(self, name: str) -> UnknownModelError:
        """The error for a name that is neither a registry name nor a repo id, with close names to try."""
        close = self.suggest(name)
        hint = ("did you mean " + " or ".join(f"'{c}'" for c in close) + "?") if close else "`kvhub list` shows the known models"
        return UnknownModelError(
            f"'{name}': not a model in the registry ({self.source}) nor a Hub repo id (org/name); fix: {hint}"
        )


def _check_unique_names(entries: tuple[RegistryEntry, ...], source: str) -> None:
    owner: dict[str, str] = {}
    for entry in entries:
        for name in entry.names:
            key = name.lower()
            if key in owner:
                raise RegistryFormatError(
                    f"registry index ({source}): '{name}' names both {owner[key]} and {entry.model}; "
                    "fix: every model id and alias must be unique"
                )
            owner[key] = entry.model


def registry_repo() -> str:
    """The registry Hub repo: ``$KVHUB_REGISTRY_REPO`` or ``kvhub/registry``."""
    return os.environ.get(REGISTRY_REPO_ENV) or DEFAULT_REGISTRY_REPO


def packaged_index(fallback: str | None = None) -> RegistryIndex:
    """The copy shipped inside the package (kvhub/data/index.json)."""
    path = Path(str(resources.files("kvhub").joinpath("data", INDEX_NAME)))
    return RegistryIndex.parse(read_index_json(path, PACKAGED_SOURCE), PACKAGED_SOURCE, fallback)


def load_index(
    revision: str | None = None,
    *,
    repo_id: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    announce: bool = True,
) -> RegistryIndex:
    """The index from the registry Hub repo at ``revision`` (default ``$KVHUB_REGISTRY_REVISION`` or main).

    The file goes through the Hub cache like any other, so offline a cached copy is used. When neither the Hub
    nor the cache has it, the packaged copy is returned with ``fallback`` saying why, unless a revision was asked
    for: the packaged copy is not that revision, so the error is raised instead. ``announce=False`` leaves the
    one-line warning to the caller (which may add what it used instead).
    """
    repo_id = repo_id or registry_repo()
    revision = revision or os.environ.get(REGISTRY_REVISION_ENV) or None
    try:
        path = fetch_file(repo_id, INDEX_NAME, revision, max_bytes=MAX_INDEX_BYTES, endpoint=endpoint, token=token,
                          cache_dir=cache_dir, local_files_only=local_files_only)
    except HubError as exc:
        if revision is not None:
            raise
        fallback = f"registry {repo_id} {_unavailable(exc)}; using the {PACKAGED_SOURCE}, which may be out of date"
        if announce:
            say_once(logger, fallback)
        return packaged_index(fallback)
    source = f"{repo_id}@{path.parent.name[:12]}"  # the file sits in snapshots/<commit>/
    return RegistryIndex.parse(read_index_json(path, source), source)


def _unavailable(exc: HubError) -> str:
    """Why the registry repo could not be read, in a few words."""
    if isinstance(exc, HubOfflineError):
        return "is not cached and the client is offline"
    if isinstance(exc, HubNetworkError):
        return "is unreachable"
    if isinstance(exc, (HubNotFoundError, HubAuthError)):
        return "was not found on the Hub"
    return f"could not be read ({exc})"


def read_index_json(path: Path, source: str) -> Any:
    """The parsed JSON of an index file: size, depth, numbers and duplicate keys bounded by :mod:`kvhub.safe_json`
    before the schema sees it. The one place an index is read from disk."""
    from .safe_json import JsonLimits, read_json_file

    limits = JsonLimits(max_bytes=MAX_INDEX_BYTES, max_items=MAX_INDEX_ITEMS)
    return read_json_file(path, f"registry index ({source})", RegistryFormatError, limits)

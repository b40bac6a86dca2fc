"""Presets on the Hub: resolve a name through the registry, download and verify a preset, publish one.

A preset is a Hub model repo (config, bases, model card), as a PEFT adapter is. The transport (download, sha256
checks, upload) is :mod:`kvhub.hub`; this module adds what a preset is: which files, which registry entry pins
them, which model they are for.

When the registry has no published copy of a validated preset, or the Hub cannot be reached (or is offline and
the cache is empty), the preset packaged with kvhub (``kvhub/data/presets/<org>--<name>/``) is used instead,
checked against the packaged registry index, and one log line says so.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, constants
from huggingface_hub.errors import RemoteEntryNotFoundError

from . import __version__
from .errors import (
    HubModelMismatchError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    NoPresetError,
    PresetFileError,
)
from .hub import FileRecord, fetch_file, records, say_once, upload_files, verify_files
from .preset_files import CARD_NAME, CONFIG_LIMITS, CONFIG_NAME, read_config, read_preset
from .registry import PACKAGED_SOURCE, Metrics, RegistryEntry, load_index, packaged_index

MAX_CARD_BYTES = 1 << 20  # a model card no registry entry pins (extract-pr's cap on a README.md)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PresetDownload:
    """A preset folder that passed verification, and where it came from.

    ``registry_verified`` is True when every file matched the registry's sha256s (not only the config's): the
    pinned commit, or the packaged copy checked against the packaged index. ``registry`` says which index resolved
    the name; ``packaged`` that the folder ships inside kvhub (``repo_id`` and ``commit`` are then None).
    """

    folder: Path
    repo_id: str | None
    commit: str | None
    files: tuple[FileRecord, ...]
    entry: RegistryEntry | None
    config: dict[str, Any]
    registry: str | None = None
    registry_verified: bool = False
    packaged: bool = False

    @property
    def metrics(self) -> Metrics | None:
        """The registry's validated numbers for the pinned files, else the config's own (None if unmeasured)."""
        if self.registry_verified and self.entry is not None and self.entry.metrics is not None:
            return self.entry.metrics
        measured = self.config.get("metrics")
        return Metrics.from_preset(measured) if measured else None


def packaged_preset_folder(model_id: str) -> Path | None:
    """The preset for ``model_id`` shipped inside the package, if there is one."""
    folder = Path(str(resources.files("kvhub").joinpath("data", "presets", model_id.replace("/", "--"))))
    return folder if (folder / CONFIG_NAME).is_file() else None


def download_preset(
    name_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> PresetDownload:
    """Resolve ``name_or_repo_id`` to a verified preset folder in the Hub cache (or a local folder, as is).

    Resolution order: an existing folder (``revision`` does not apply); a registry model id or alias (so
    ``Qwen/Qwen2.5-7B`` finds its preset, not a repo of that name), at the commit the registry pins unless
    ``revision`` names another, falling back to the packaged preset (see the module docstring); else a Hub repo id
    at ``revision``. ``force_download`` fetches every file again: the fix for a corrupted cache.
    """
    name = str(name_or_repo_id)
    folder = Path(name).expanduser()
    if folder.is_dir():
        files, config = _verify(folder, None, "re-save or re-download the preset")
        return PresetDownload(folder, None, None, files, None, config)
    if _looks_like_path(name):
        raise PresetFileError(f"{name}: no such preset folder; fix: check the path, or pass a model name or repo id")
    if force_download and (local_files_only or constants.is_offline_mode()):
        raise HubOfflineError(f"{name}: cannot download again while offline; fix: unset HF_HUB_OFFLINE and retry")
    index = load_index(endpoint=endpoint, token=token, cache_dir=cache_dir, local_files_only=local_files_only,
                       announce=False)
    entry = index.find(name)
    options = dict(cache_dir=cache_dir, token=token, endpoint=endpoint, local_files_only=local_files_only,
                   force_download=force_download)
    try:
        if entry is None:
            if not _REPO_ID.fullmatch(name):
                raise index.unknown(name)
            download = _download(name, revision, None, name, **options)
        else:
            repo_id, pinned = entry.pinned()
            download = _download(repo_id, revision or pinned, entry, name, **options)
    except (NoPresetError, HubNetworkError, HubOfflineError) as exc:
        packaged = None if force_download else _packaged_fallback(entry, revision, exc, index.fallback)
        if packaged is None:
            if index.fallback:
                say_once(logger, index.fallback)
            raise
        return packaged
    if index.fallback:
        say_once(logger, index.fallback)
    return replace(download, registry=index.source)


def _packaged_fallback(entry: RegistryEntry | None, revision: str | None, exc: Exception,
                       index_fallback: str | None) -> PresetDownload | None:
    """The packaged preset for a validated ``entry`` (one log line saying why), or None when there is none."""
    if entry is None or entry.status != "validated" or revision is not None:
        return None
    folder = packaged_preset_folder(entry.model)
    if folder is None:
        return None
    if index_fallback:
        why = index_fallback.split(";")[0]
    elif isinstance(exc, NoPresetError):
        why = "the registry has no published copy on the Hub"
    else:
        why = str(exc).split("; fix:")[0]
    say_once(logger, f"{entry.model}: {why}; using the preset packaged with kvhub {__version__} ({folder})")
    shipped = packaged_index().find(entry.model)
    pins = shipped if shipped is not None and shipped.status == "validated" and shipped.files else None
    files, config = _verify(folder, pins, f"the packaged preset was changed: restore it (in a checkout, `git checkout -- "
                                         f"presets/{folder.name}`; else reinstall kvhub)")
    return PresetDownload(folder, None, None, files, pins or entry, config, PACKAGED_SOURCE, pins is not None,
                          packaged=True)


def _download(repo_id: str, revision: str | None, entry: RegistryEntry | None, name: str, *,
              force_download: bool, **options: Any) -> PresetDownload:
    """Download ``repo_id@revision`` and verify it (against ``entry`` when the commit is the one it pins).

    Exactly the preset's files are fetched, each within a byte limit: the config (the config reader's cap, or its
    pinned size), then the model card and the tensor files the config lists, at the commit the config came from,
    each limited to the size the registry pins (when the commit is the pinned one) or the config lists. Nothing
    else a repo holds is downloaded."""
    def fetch(filename: str, rev: str | None, max_bytes: int) -> Path:
        return fetch_file(repo_id, filename, rev, max_bytes=max_bytes, force_download=force_download, **options)

    pins = {f.name: f.size for f in entry.files} if entry is not None and revision == entry.revision else {}
    try:
        snapshot = fetch(CONFIG_NAME, revision, pins.get(CONFIG_NAME, CONFIG_LIMITS.max_bytes)).parent
    except HubNotFoundError as exc:
        if not isinstance(exc.__cause__, RemoteEntryNotFoundError):
            raise
        raise HubNotFoundError(f"{repo_id}: has no {CONFIG_NAME}, so it is not a kvhub preset; fix: check the repo "
                               "id") from exc
    commit = snapshot.name  # the cache names snapshot folders by commit
    pinned_entry = entry if entry is not None and commit == entry.revision else None
    rev = f" --revision {revision}" if revision and pinned_entry is None else ""
    fix = f"download it again with `kvhub pull {name}{rev} --force`; if that does not help, the repo differs from what was published"
    root = snapshot.parents[1]  # links point into ../../blobs
    if pinned_entry is not None:  # the config first: the sizes it lists become limits
        verify_files(snapshot, [f for f in pinned_entry.files if f.name == CONFIG_NAME], against=f"the registry "
                     f"entry for {pinned_entry.model}", fix=fix, root=root)
    sizes = {f["name"]: f["size"] for f in read_config(snapshot)["files"]}
    if pinned_entry is not None:
        sizes |= {f.name: f.size for f in pinned_entry.files if f.name != CONFIG_NAME}
    for filename, size in sizes.items():
        fetch(filename, commit, size)
    if CARD_NAME not in sizes:  # optional unless pinned
        try:
            fetch(CARD_NAME, commit, MAX_CARD_BYTES)
        except HubNotFoundError as exc:
            if not isinstance(exc.__cause__, RemoteEntryNotFoundError):
                raise
    files, config = _verify(snapshot, pinned_entry, fix, root=root)
    if entry is not None:
        _check_base_model(entry, config, f"{repo_id}@{commit[:12]}")
    return PresetDownload(snapshot, repo_id, commit, files, entry, config, None, pinned_entry is not None)


def _verify(folder: Path, entry: RegistryEntry | None, fix: str,
            root: Path | None = None) -> tuple[tuple[FileRecord, ...], dict[str, Any]]:
    """Check the files against the registry pin (when given), then the config's list; return them and the config.

    The registry is checked first because it also covers the config file itself."""
    if entry is not None:
        verify_files(folder, entry.files, against=f"the registry entry for {entry.model}", fix=fix, root=root)
    config = read_config(folder)
    listed = [FileRecord.from_json(f) for f in config["files"]]
    verify_files(folder, listed, against=CONFIG_NAME, fix=fix, root=root)
    pinned = entry.files if entry is not None else ()
    names = [CONFIG_NAME, CARD_NAME, *(f.name for f in listed), *(f.name for f in pinned)]
    return records(folder, names, CONFIG_NAME, root), config


def _check_base_model(entry: RegistryEntry, config: dict[str, Any], where: str) -> None:
    """Refuse a preset whose config disagrees with the registry about the model (or model revision) it is for."""
    base = config["base_model"]
    if base["id"].lower() != entry.model.lower():
        raise HubModelMismatchError(
            f"{where}: {CONFIG_NAME} is for {base['id']} but the registry serves it for {entry.model}; "
            "fix: pass the preset repo id instead of the model name to load it anyway"
        )
    made_for, expected = base.get("revision"), entry.model_revision
    if made_for and expected and made_for != expected:
        raise HubModelMismatchError(
            f"{where}: made for {entry.model} at revision {made_for[:12]}, but the registry serves revision "
            f"{expected[:12]}; fix: omit --revision to get the preset the registry pins, or pass the preset repo id"
        )


def _looks_like_path(name: str) -> bool:
    """Folder-like names (``./x``, ``~/x``, ``/x``, ``a/b/c``) are never registry names or repo ids."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def push_preset(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> CommitInfo:
    """Validate the preset in ``folder`` and publish it as one commit of ``repo_id`` (created if missing).

    Validation is a full load (schema, checksums, tensors, codec), so a broken preset never reaches the Hub. The
    commit holds the config, the tensor files it lists and a model card regenerated from the config, so the card
    cannot disagree with it. ``revision`` is the branch to commit to (created from main if missing);
    ``create_pr`` opens a pull request against it instead.
    """
    from .card import model_card

    folder = Path(folder)
    config = read_preset(folder).config
    files: dict[str, Path | bytes] = {CONFIG_NAME: folder / CONFIG_NAME}
    files.update({f["name"]: folder / f["name"] for f in config["files"]})
    files[CARD_NAME] = model_card(config).encode("utf-8")
    message = commit_message or f"kvhub {__version__}: preset for {config['base_model']['id']}"
    return upload_files(repo_id, files, message=message, revision=revision, create_pr=create_pr, token=token,
                        endpoint=endpoint, private=private)

"""Presets on the Hugging Face Hub: resolve a name, download into the Hub's own cache, verify, publish.

A preset is a Hub model repo (config, bases, model card), as a PEFT adapter is. Everything goes through
``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` work
as they do for models and the files live in the Hub cache, shared with every other tool: kvhub keeps no cache
of its own. Verification only reads that cache; on a mismatch nothing is deleted, the error says what to do.
Every failure of the client becomes one :class:`~kvhub.errors.HubError` subclass with a one-line fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import httpx

from . import __version__
from .card import model_card
from .errors import (
    HubAuthError,
    HubChecksumError,
    HubError,
    HubModelMismatchError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    HubRevisionNotFoundError,
    PresetFileError,
)
from .preset import CONFIG_NAME, _read_config, sha256_file
from .registry import FileRecord, Metrics, RegistryEntry, RegistryIndex, load_index

CARD_NAME = "README.md"
PRESET_PATTERNS = [CONFIG_NAME, CARD_NAME, "*.safetensors"]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_CLIENT_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError)


@dataclass(frozen=True)
class PresetDownload:
    """A preset folder that passed verification, and where it came from.

    ``registry_verified`` is True when the folder is the commit the registry pins and every file matched the
    registry's sha256s (not only the config's). ``registry`` says which index resolved the name.
    """

    folder: Path
    repo_id: str | None
    commit: str | None
    files: tuple[FileRecord, ...]
    entry: RegistryEntry | None
    config: dict[str, Any]
    registry: str | None = None
    registry_verified: bool = False

    @property
    def metrics(self) -> Metrics | None:
        """The registry's validated numbers for the pinned commit, else the config's own (None if unmeasured)."""
        if self.registry_verified and self.entry is not None and self.entry.metrics is not None:
            return self.entry.metrics
        measured = self.config.get("metrics")
        return Metrics.from_preset(measured) if measured else None


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
    ``revision`` names another; else a Hub repo id at ``revision``. ``force_download`` fetches every file again:
    the fix for a corrupted cache.
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
    index = load_index(endpoint=endpoint, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    repo_id, revision, entry = _resolve(index, name, revision)
    call = _Call(repo_id, revision, _endpoint(endpoint), token, cache_dir, local_files_only)
    with _hub_errors(call):
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, token=token, endpoint=call.endpoint,
            local_files_only=local_files_only, force_download=force_download, allow_patterns=PRESET_PATTERNS,
        ))
    commit = snapshot.name  # the cache names snapshot folders by commit
    if not (snapshot / CONFIG_NAME).is_file():
        raise HubNotFoundError(f"{repo_id}@{commit[:12]}: has no {CONFIG_NAME}, so it is not a kvhub preset; fix: check the repo id")
    pinned_entry = entry if entry is not None and commit == entry.revision else None
    rev = f" --revision {revision}" if revision and pinned_entry is None else ""
    fix = f"download it again with `kvhub pull {name}{rev} --force`; if that does not help, the repo differs from what was published"
    files, config = _verify(snapshot, pinned_entry, fix)
    if entry is not None:
        _check_base_model(entry, config, f"{repo_id}@{commit[:12]}")
    return PresetDownload(snapshot, repo_id, commit, files, entry, config, index.source, pinned_entry is not None)


def _resolve(index: RegistryIndex, name: str, revision: str | None) -> tuple[str, str | None, RegistryEntry | None]:
    """Repo id, revision and registry entry for ``name``: the registry first, then a repo id, else close names."""
    entry = index.find(name)
    if entry is not None:
        repo_id, pinned = entry.pinned()
        return repo_id, revision or pinned, entry
    if _REPO_ID.fullmatch(name):
        return name, revision, None
    raise index.unknown(name)


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
    from .preset import KVPreset

    folder = Path(folder)
    config = KVPreset.load_folder(folder).config
    operations = [
        CommitOperationAdd(CONFIG_NAME, str(folder / CONFIG_NAME)),
        *(CommitOperationAdd(f["name"], str(folder / f["name"])) for f in config["files"]),
        CommitOperationAdd(CARD_NAME, model_card(config).encode("utf-8")),
    ]
    call = _Call(repo_id, revision, _endpoint(endpoint), token, write=True)
    api = HfApi(endpoint=call.endpoint, token=token)
    message = commit_message or f"kvhub {__version__}: preset for {config['base_model']['id']}"
    with _hub_errors(call):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)


def fetch_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """One file of a Hub repo through the Hub cache (cached copies serve offline), client errors translated."""
    call = _Call(repo_id, revision, _endpoint(endpoint), token, cache_dir, local_files_only)
    with _hub_errors(call):
        return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=call.endpoint, token=token,
                                    cache_dir=cache_dir, local_files_only=local_files_only))


# --- verification -------------------------------------------------------------------------------------------

def _verify(folder: Path, entry: RegistryEntry | None, fix: str) -> tuple[tuple[FileRecord, ...], dict[str, Any]]:
    """Check the files against the registry pin (when given), then the config's list; return them and the config.

    The registry is checked first because it also covers the config file itself.
    """
    record = cache(lambda name: _record(folder / name, name))
    if entry is not None:
        _compare(folder, entry.files, record, f"the registry entry for {entry.model}", fix)
    config = _read_config(folder)
    listed = [FileRecord.from_json(f) for f in config["files"]]
    _compare(folder, listed, record, CONFIG_NAME, fix)
    pinned = entry.files if entry is not None else ()
    names = dict.fromkeys([CONFIG_NAME, CARD_NAME, *(f.name for f in listed), *(f.name for f in pinned)])
    return tuple(r for r in map(record, names) if r is not None), config


def _record(path: Path, name: str) -> FileRecord | None:
    return FileRecord(name, path.stat().st_size, sha256_file(path)) if path.is_file() else None


def _compare(folder: Path, expected: Iterable[FileRecord], record: Callable[[str], FileRecord | None],
             against: str, fix: str) -> None:
    for want in expected:
        got = record(want.name)
        if got is None:
            raise HubChecksumError(f"{folder / want.name}: missing, but {against} lists it; fix: {fix}")
        if (got.sha256, got.size) != (want.sha256, want.size):
            raise HubChecksumError(
                f"{folder / want.name}: sha256 {got.sha256[:12]}... ({got.size} bytes) does not match {against} "
                f"({want.sha256[:12]}..., {want.size} bytes); fix: {fix}"
            )


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


# --- names and client errors --------------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    """Folder-like names (``./x``, ``~/x``, ``/x``, ``a/b/c``) are never registry names or repo ids."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _endpoint(endpoint: str | None) -> str:
    """The explicit endpoint, else ``HF_ENDPOINT`` as ``huggingface_hub`` read it (passed on explicitly)."""
    return (endpoint or constants.ENDPOINT).rstrip("/")


@dataclass(frozen=True)
class _Call:
    """What a Hub call was about: enough to word its failure."""

    repo_id: str
    revision: str | None
    endpoint: str
    token: str | bool | None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    write: bool = False

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def offline_reason(self) -> str | None:
        if constants.is_offline_mode():
            return "HF_HUB_OFFLINE is set"
        return "local_files_only=True" if self.local_files_only else None


@contextmanager
def _hub_errors(call: _Call) -> Iterator[None]:
    try:
        yield
    except _CLIENT_ERRORS as exc:
        raise _translate(exc, call) from exc


def _translate(exc: Exception, call: _Call) -> HubError:
    """The HubError for a client exception: what failed, and the one thing to do about it."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return HubRevisionNotFoundError(
            f"{call.repo_id}: no branch, tag or commit '{call.revision}' on {call.endpoint}; "
            "fix: pass an existing revision, or none for the default"
        )
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401 and not _has_token(call.token):
            return HubAuthError(
                f"{call.repo_id}: not found, or private and no token was sent; "
                "fix: check the repo id, or log in (`hf auth login` or HF_TOKEN) if it is private"
            )
        return HubNotFoundError(f"{call.repo_id}: no such repo on {call.endpoint}; fix: check the repo id (`kvhub list` shows the presets)")
    if isinstance(exc, RemoteEntryNotFoundError):
        return HubNotFoundError(f"{call.where}: {exc.server_message or 'file not found'}; fix: check the repo id")
    if status in (401, 403):
        access = "write to" if call.write else "read"
        return HubAuthError(
            f"{call.where}: the Hub refused the request (HTTP {status}); "
            f"fix: set HF_TOKEN or run `hf auth login` with a token that may {access} {call.repo_id}"
        )
    reason = call.offline_reason
    if reason and call.write:
        return HubOfflineError(f"{call.where}: cannot publish while {reason}; fix: unset HF_HUB_OFFLINE")
    if reason and isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        cache_dir = call.cache_dir or constants.HF_HUB_CACHE
        return HubOfflineError(
            f"{call.where}: not in the Hub cache ({cache_dir}) and {reason}; fix: pull it once while online"
        )
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    return HubNetworkError(
        f"{call.where}: the request to {call.endpoint} failed ({_describe(cause)}); "
        "fix: check your connection (and HF_ENDPOINT), then retry"
    )


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _has_token(token: str | bool | None) -> bool:
    return token is not False and bool(token or get_token())

"""The Hub transport: download a snapshot or a file, verify files against sha256s, upload files as one commit.

This module knows nothing about presets or the registry (they call it: :mod:`kvhub.hub_presets`,
:mod:`kvhub.registry`). Everything goes through ``huggingface_hub``, so ``HF_ENDPOINT``, ``HF_HOME`` /
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` work as they do for models, and files live in the Hub cache
shared with every other tool. Verification only reads that cache; on a mismatch nothing is deleted.

Two things the client does not do for us:

- it retries an unreachable endpoint for ~25 s per file (printing a line per retry) before falling back to the
  cache. kvhub asks once, with a short timeout (:data:`PROBE_TIMEOUT_S`), whether the endpoint answers at all; when
  it does not, the cache is used at once (one log line says so) or the call fails with :class:`HubNetworkError`;
- it raises ``HFValidationError``, ``ValueError`` and ``OSError`` for bad repo ids, unsafe file names and short
  bodies. Every client failure becomes one :class:`~kvhub.errors.HubError` subclass with a one-line fix;
- it bounds neither the bytes nor the time of a download: a server that sends without end, or one byte at a time,
  fills the disk or hangs the call. Every kvhub download has a byte limit (the size pinned by the registry or the
  preset's config, else a stated cap) and a deadline (:func:`download_limits`), enforced on every read of the
  response; past either, the download stops with a :class:`~kvhub.errors.HubError` and the client deletes its
  partial file, so nothing partial stays in the cache.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session, httpx, validate_repo_id

from .errors import (
    HubAuthError,
    HubChecksumError,
    HubError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    HubRepoIdError,
    HubRevisionNotFoundError,
    HubTooLargeError,
    HubUnsafePathError,
)
from .preset_files import sha256_file

PUBLIC_ENDPOINT = "https://huggingface.co"
PROBE_TIMEOUT_S = 3.0
MAX_DOWNLOAD_BYTES = 1 << 30  # a file no registry or config gives a size for: extract-pr's cap on a tensor file
DEADLINE_S = 30.0  # every download may take this long, plus a second per MB it may weigh (1 MB/s at the least)
_CLIENT_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx.TransportError)
# A file of a repo as kvhub stores and verifies it: a plain name in the repo's top folder, never hidden, no separator.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_CONSISTENCY = "Consistency check failed"

logger = logging.getLogger(__name__)


# --- file records and verification ------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileRecord:
    """One file: its name in the repo (a plain file name), its size and its sha256."""

    name: str
    size: int
    sha256: str

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "FileRecord":
        return cls(data["name"], data["size"], data["sha256"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


# Hashes already taken in this process, keyed by what changes when a file does (so a download verified against the
# registry and then loaded is hashed once, not twice).
_HASHED: dict[tuple[str, int, int, int], str] = {}


def _hash(path: Path) -> FileRecord | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return FileRecord(path.name, st.st_size, _HASHED[key])


def check_file_name(name: str, where: str) -> str:
    """``name`` if it is a plain file name (no folder, no ``..``, not hidden), else :class:`HubUnsafePathError`."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise HubUnsafePathError(
            f"{where}: lists the file {name!r}, which is not a plain file name of the repo's top folder; "
            "fix: use a trusted registry or repo (names must match [A-Za-z0-9_][A-Za-z0-9._-]*)"
        )
    return name


def file_path(folder: Path, name: str, where: str, root: Path | None = None) -> Path:
    """``folder/name`` after checking the name, and that the path (links followed) stays inside ``root``.

    ``root`` defaults to ``folder``; a Hub cache snapshot links into its repo's ``blobs/``, so its root is the repo's
    cache folder (two levels up)."""
    path = folder / check_file_name(name, where)
    inside = (root or folder).resolve()
    if path.exists() and not path.resolve().is_relative_to(inside):
        raise HubUnsafePathError(f"{path}: links outside {inside}; fix: remove the link and download again")
    return path


def verify_files(folder: Path, expected: Iterable[FileRecord], *, against: str, fix: str,
                 root: Path | None = None) -> tuple[FileRecord, ...]:
    """Check every expected file of ``folder`` (size and sha256); return what was found. Raises
    :class:`HubChecksumError` naming the file, what ``against`` says and ``fix``. Each file is hashed once per
    process and version of the file."""
    found = []
    for want in expected:
        got = _hash(file_path(folder, want.name, against, root))
        if got is None:
            raise HubChecksumError(f"{folder / want.name}: missing, but {against} lists it; fix: {fix}")
        if (got.sha256, got.size) != (want.sha256, want.size):
            raise HubChecksumError(
                f"{folder / want.name}: sha256 {got.sha256[:12]}... ({got.size} bytes) does not match {against} "
                f"({want.sha256[:12]}..., {want.size} bytes); fix: {fix}"
            )
        found.append(got)
    return tuple(found)


def records(folder: Path, names: Iterable[str], where: str, root: Path | None = None) -> tuple[FileRecord, ...]:
    """The records of the named files that exist in ``folder`` (names checked as in :func:`file_path`)."""
    paths = (file_path(folder, name, where, root) for name in dict.fromkeys(names))
    return tuple(r for r in map(_hash, paths) if r is not None)


# --- calls ------------------------------------------------------------------------------------------------------

def endpoint_url(endpoint: str | None = None) -> str:
    """The explicit endpoint, else ``HF_ENDPOINT`` as ``huggingface_hub`` read it (passed on explicitly)."""
    return (endpoint or constants.ENDPOINT).rstrip("/")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if the Hub would accept it (``org/name``), else :class:`HubRepoIdError` with the rule broken."""
    try:
        if repo_id.count("/") != 1:
            raise HFValidationError("a repo id is exactly one 'org/name'")
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise HubRepoIdError(
            f"{repo_id[:120]!r}: not a valid Hub repo id ({reason}); fix: use org/name with letters, digits, '-', "
            "'_' and '.', no '--' or '..', not starting or ending with '-' or '.', at most 96 characters"
        ) from exc
    return repo_id


@dataclass(frozen=True)
class Call:
    """What a Hub call is about: enough to word its failure."""

    repo_id: str
    revision: str | None = None
    endpoint: str | None = None
    token: str | bool | None = None
    cache_dir: str | os.PathLike | None = None
    local_files_only: bool = False
    write: bool = False

    @property
    def url(self) -> str:
        return endpoint_url(self.endpoint)

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    @property
    def offline_reason(self) -> str | None:
        if constants.is_offline_mode():
            return "HF_HUB_OFFLINE is set"
        return "local_files_only=True" if self.local_files_only else None


_REACHABLE: set[str] = set()
_SAID: set[str] = set()


def say_once(log: logging.Logger, message: str) -> None:
    """Warn ``message`` on ``log`` the first time this process says it: a fallback that holds for every call (an
    unreachable Hub, the packaged index) is one line, not one per call."""
    if message not in _SAID:
        _SAID.add(message)
        log.warning(message)


def unreachable(endpoint: str) -> str | None:
    """None when ``endpoint`` answers an HTTP request within :data:`PROBE_TIMEOUT_S`, else why not (a few words).

    Any HTTP answer counts (even an error status): only the connection matters. Successes are remembered for the
    process; failures are not, so a Hub that comes back is used again."""
    if endpoint in _REACHABLE:
        return None
    try:
        get_session().head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.TransportError as exc:
        return f"{endpoint} is unreachable ({type(exc).__name__})"
    _REACHABLE.add(endpoint)
    return None


@contextmanager
def hub_errors(call: Call) -> Iterator[None]:
    """Translate every client failure inside the block into a :class:`HubError`."""
    try:
        yield
    except HFValidationError as exc:
        check_repo_id(call.repo_id)  # raises the typed error when the repo id is the problem
        raise HubUnsafePathError(f"{call.where}: the Hub client refused a name ({str(exc).splitlines()[0][:200]}); "
                                 "fix: check the repo id and revision") from exc
    except _CLIENT_ERRORS as exc:
        raise translate(exc, call) from exc
    except ValueError as exc:  # the client's own check of a file name the repo lists (e.g. '../x')
        raise HubUnsafePathError(
            f"{call.where}: the repo lists a file the client refuses to store ({str(exc).splitlines()[0][:200]}); "
            "fix: this repo is not a usable kvhub repo: check the repo id"
        ) from exc
    except OSError as exc:
        if not str(exc).startswith(_CONSISTENCY):
            raise
        raise HubNetworkError(
            f"{call.where}: a download from {call.url} was cut short (fewer bytes than announced); fix: retry, and "
            "if it persists check your connection or proxy"
        ) from exc


def _fast_fail(call: Call) -> str | None:
    """Why the network must not be tried for ``call`` (unreachable endpoint), or None."""
    if call.offline_reason:
        return None
    return unreachable(call.url)


# --- download limits --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Limits:
    what: str
    max_bytes: int
    deadline: float  # time.monotonic()


_LIMITS: ContextVar[_Limits | None] = ContextVar("kvhub_download_limits", default=None)


class _OverLimit(Exception):
    """Raised inside the client's download. Not an httpx error, so the client neither retries nor resumes it."""


def _check_response(response: httpx.Response) -> None:
    """The client's response hook: inside :func:`download_limits`, refuse a response that announces more than the
    limit (``X-Linked-Size`` or ``Content-Length``: the client trusts them to size its download) and bound its body
    as it is read. Outside (any other use of the shared client), nothing."""
    limits = _LIMITS.get()
    if limits is None:
        return
    _check_time(limits)
    for header in ("X-Linked-Size", "Content-Length"):
        announced = response.headers.get(header, "")
        if announced.isdigit() and int(announced) > limits.max_bytes:
            raise _OverLimit(f"announces {int(announced)} bytes ({header}), more than the {limits.max_bytes} allowed")
    response.stream = _BoundedStream(response.stream, limits)


def _check_time(limits: _Limits) -> None:
    if time.monotonic() > limits.deadline:
        raise _OverLimit("did not finish within its deadline")


class _BoundedStream(httpx.SyncByteStream):
    """A response body that stops past the byte limit or the deadline, checked on every read from the socket (so a
    server that sends one byte at a time is stopped within a read timeout of the deadline)."""

    def __init__(self, inner: httpx.SyncByteStream, limits: _Limits):
        self.inner, self.limits = inner, limits

    def __iter__(self) -> Iterator[bytes]:
        received = 0
        for block in self.inner:
            received += len(block)
            if received > self.limits.max_bytes:
                raise _OverLimit(f"sent more than the {self.limits.max_bytes} bytes allowed")
            _check_time(self.limits)
            yield block

    def close(self) -> None:
        self.inner.close()


@contextmanager
def download_limits(what: str, max_bytes: int) -> Iterator[None]:
    """Bound every response the Hub client reads inside the block to ``max_bytes`` and the whole block to
    :data:`DEADLINE_S` plus a second per MB of ``max_bytes``. Past either, :class:`HubTooLargeError` or
    :class:`HubNetworkError` naming ``what``."""
    client = get_session()
    if _check_response not in client.event_hooks["response"]:
        client.event_hooks = {**client.event_hooks, "response": [*client.event_hooks["response"], _check_response]}
    seconds = DEADLINE_S + max_bytes / 1e6
    token = _LIMITS.set(_Limits(what, max_bytes, time.monotonic() + seconds))
    try:
        yield
    except _OverLimit as exc:
        if "deadline" in str(exc):
            raise HubNetworkError(f"{what}: the download took more than {seconds:.0f} s and was stopped; fix: retry, "
                                  "and if it persists check your connection (and HF_ENDPOINT)") from None
        raise HubTooLargeError(f"{what}: the server {exc}; nothing was kept; fix: the repo or the server is not the "
                               "one kvhub expects: check the repo id and HF_ENDPOINT") from None
    finally:
        _LIMITS.reset(token)


def fetch_file(
    repo_id: str,
    filename: str,
    revision: str | None = None,
    *,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """One file of a Hub repo through the Hub cache, downloaded within ``max_bytes`` and a deadline
    (:func:`download_limits`); cached copies serve offline or when the Hub is unreachable, except with
    ``force_download``, which then fails (:class:`HubNetworkError`) as it does offline."""
    check_repo_id(repo_id)
    call = Call(repo_id, revision, endpoint, token, cache_dir, local_files_only)
    kwargs = dict(revision=revision, endpoint=call.url, token=token, cache_dir=cache_dir)
    why = _fast_fail(call)
    with hub_errors(call):
        if why is None:
            with download_limits(f"{call.where}: {filename}", max_bytes):
                return Path(hf_hub_download(repo_id, filename, local_files_only=local_files_only,
                                            force_download=force_download, **kwargs))
        if force_download:
            raise HubNetworkError(f"{call.where}: cannot download again: {why}; fix: check your connection (and "
                                  "HF_ENDPOINT), then retry")
        return Path(_cached(call, why, lambda: hf_hub_download(repo_id, filename, local_files_only=True, **kwargs)))


def _cached(call: Call, why: str, read):
    """``read()`` from the cache only; HubNetworkError saying ``why`` when the cache does not have it."""
    try:
        found = read()
    except LocalEntryNotFoundError as exc:
        raise HubNetworkError(f"{call.where}: {why} and not in the Hub cache; fix: check your connection (and "
                              "HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to work from the cache") from exc
    say_once(logger, f"{why}; using the cached copy of {call.where}")
    return found


def upload_files(
    repo_id: str,
    files: Mapping[str, Path | bytes],
    *,
    message: str,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    private: bool = False,
) -> CommitInfo:
    """``files`` (repo name -> local path or bytes) as one commit of ``repo_id`` (created if missing). ``revision``
    is the branch (created from main if missing); ``create_pr`` opens a pull request against it instead."""
    check_repo_id(repo_id)
    operations = [CommitOperationAdd(check_file_name(name, repo_id), data if isinstance(data, bytes) else str(data))
                  for name, data in files.items()]
    call = Call(repo_id, revision, endpoint, token, write=True)
    if not call.offline_reason and (why := unreachable(call.url)):
        raise HubNetworkError(f"{repo_id}: cannot publish: {why}; fix: check your connection (and HF_ENDPOINT)")
    api = HfApi(endpoint=call.url, token=token)
    with hub_errors(call):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)


def check_commit(repo_id: str, commit: str, *, endpoint: str | None = None, token: str | bool | None = None) -> None:
    """Raise a HubError unless the endpoint serves ``repo_id`` at ``commit``."""
    call = Call(check_repo_id(repo_id), commit, endpoint, token)
    with hub_errors(call):
        HfApi(endpoint=call.url, token=token).model_info(repo_id, revision=commit)


# --- client errors ----------------------------------------------------------------------------------------------

def translate(exc: Exception, call: Call) -> HubError:
    """The HubError for a client exception: what failed, and the one thing to do about it."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return HubRevisionNotFoundError(
            f"{call.repo_id}: no branch, tag or commit '{call.revision}' on {call.url}; "
            "fix: pass an existing revision, or none for the default"
        )
    if isinstance(exc, RepositoryNotFoundError):
        if status == 401 and not _has_token(call.token):
            return HubAuthError(
                f"{call.repo_id}: not found, or private and no token was sent; "
                "fix: check the repo id, or log in (`hf auth login` or HF_TOKEN) if it is private"
            )
        return HubNotFoundError(f"{call.repo_id}: no such repo on {call.url}; fix: check the repo id (`kvhub list` shows the presets)")
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
        f"{call.where}: the request to {call.url} failed ({_describe(cause)}); "
        "fix: check your connection (and HF_ENDPOINT), then retry"
    )


def _describe(exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return f"HTTP {status}" if status else type(exc).__name__


def _has_token(token: str | bool | None) -> bool:
    return token is not False and bool(token or get_token())

"""``kvhub registry extract-pr``: the preset folders a pull request changes, read from git objects as data.

The fork pull-request workflow runs the *base* branch's code on the *pull request's* data. It checks out the base
branch, fetches the pull request's head as a ref (never a working tree: nothing of the pull request is ever
executed, imported or installed), and calls this to copy the changed ``presets/<org>--<name>/`` folders out of git
into a scratch folder, where ``kvhub registry verify`` measures them.

Everything is read with git plumbing (``diff --name-status``, ``ls-tree``, ``cat-file``), so modes come from git
itself: a symlink (mode 120000) or a submodule (160000) is refused, not followed. A pull request is refused as a
whole when it changes anything outside ``presets/<org>--<name>/<file>``, names a file a preset does not have, holds
a file over the size limits, or has too many files: code, workflows and schemas go through ordinary review, not
this path. Nothing is written unless everything passes (the folders are assembled in a temporary folder and
renamed into place).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PullRequestError

PRESETS = "presets"
FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}--[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
TENSOR_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\.safetensors")
SMALL_FILES = ("kvhub_preset.json", "README.md", "recipe.json")
_REGULAR = ("100644", "100755")
_WHY_MODE = {"120000": "a symbolic link", "160000": "a submodule", "040000": "a folder"}


@dataclass(frozen=True)
class Limits:
    """What one pull request may bring: bytes per small file (config, card, recipe), per tensor file, in all, and
    the number of files."""

    small_file_bytes: int = 1 << 20
    tensor_file_bytes: int = 1 << 30
    total_bytes: int = 4 << 30
    files: int = 64


@dataclass
class Extracted:
    """The folders written under ``out/presets/`` and those the pull request removes (nothing to verify)."""

    out: Path
    folders: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0


def _git(repo: Path, *args: str) -> bytes:
    try:
        done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True, timeout=300)
    except FileNotFoundError as exc:
        raise PullRequestError("git is not installed; fix: install git") from exc
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise PullRequestError(
            f"git {args[0]} failed in {repo} ({message[-1][:200] if message else f'exit {exc.returncode}'}); "
            "fix: fetch both commits first (git fetch origin <base> pull/<n>/head)"
        ) from exc
    return done.stdout


def _commit(repo: Path, rev: str) -> str:
    if rev.startswith("-"):
        raise PullRequestError(f"{rev[:60]!r}: not a revision; fix: pass a commit sha or ref")
    return _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}").decode().strip()


def _shown(path: str) -> str:
    """A path from git, safe to print on one line."""
    return repr(path[:200])


def changed_folders(repo: Path, base: str, head: str) -> list[str]:
    """The ``<org>--<name>`` folders that ``base...head`` changes; :class:`PullRequestError` when it changes
    anything else (see the module docstring)."""
    raw = _git(repo, "diff", "--name-status", "-z", "--no-renames", f"{base}...{head}", "--")
    fields = raw.decode("utf-8", "surrogateescape").split("\0")
    folders: dict[str, None] = {}
    for status, path in zip(fields[::2], fields[1::2]):
        parts = path.split("/")
        if len(parts) != 3 or parts[0] != PRESETS:
            raise PullRequestError(
                f"the pull request changes {_shown(path)}, outside presets/<org>--<name>/<file>; fix: send code, "
                "workflow and schema changes in a separate pull request (they go through ordinary review)"
            )
        if not FOLDER.fullmatch(parts[1]):
            raise PullRequestError(f"{_shown(path)}: the folder is not named <org>--<name>; fix: rename it")
        folders.setdefault(parts[1])
    existing = _git(repo, "ls-tree", "--name-only", "-z", f"{base}:{PRESETS}").decode("utf-8", "surrogateescape")
    by_case: dict[str, str] = {}
    for name in [*folders, *existing.split("\0")]:  # a case-insensitive file system would merge these folders
        other = by_case.setdefault(name.lower(), name)
        if other != name and name:
            raise PullRequestError(f"{_shown(other)} and {_shown(name)}: folder names that differ only by case; fix: "
                                   "use the spelling of the existing folder (or of the model's Hub id) for both")
    return list(folders)


def extract_pr(repo: str | os.PathLike, base: str, head: str, out: str | os.PathLike,
               limits: Limits = Limits()) -> Extracted:
    """Copy every file of each preset folder that ``base...head`` changes, as of ``head``, to ``out/presets/``.

    ``out`` must not exist yet (it is created whole, or not at all)."""
    repo, out = Path(repo), Path(out)
    if out.exists():
        raise PullRequestError(f"{out}: already exists; fix: pass a new folder to --out")
    base, head = _commit(repo, base), _commit(repo, head)
    result = Extracted(out)
    planned: list[tuple[str, str, str]] = []  # (folder, file name, blob id)
    for folder in changed_folders(repo, base, head):
        entries = _git(repo, "ls-tree", "-z", "-l", "--full-tree", head, "--", f"{PRESETS}/{folder}/")
        rows = [row for row in entries.decode("utf-8", "surrogateescape").split("\0") if row]
        if not rows:
            result.removed.append(folder)
            continue
        for row in rows:
            meta, path = row.split("\t", 1)
            mode, kind, oid, size = meta.split()
            name = path.rsplit("/", 1)[-1]
            if mode not in _REGULAR or kind != "blob":
                raise PullRequestError(f"{_shown(path)}: is {_WHY_MODE.get(mode, f'mode {mode}')}, not a plain file; "
                                       "fix: commit the file itself")
            if name not in SMALL_FILES and not TENSOR_FILE.fullmatch(name):
                raise PullRequestError(
                    f"{_shown(path)}: not a preset file; fix: a preset folder holds only "
                    f"{', '.join(SMALL_FILES)} and *.safetensors"
                )
            cap = limits.tensor_file_bytes if name.endswith(".safetensors") else limits.small_file_bytes
            if int(size) > cap:
                raise PullRequestError(f"{_shown(path)}: {int(size)} bytes, over the limit of {cap}; fix: a preset "
                                       "file this large is not what kvhub writes: check the file")
            result.files += 1
            result.bytes += int(size)
            if result.files > limits.files:
                raise PullRequestError(f"the pull request brings more than {limits.files} preset files; fix: split it")
            if result.bytes > limits.total_bytes:
                raise PullRequestError(f"the pull request brings more than {limits.total_bytes} bytes of presets; "
                                       "fix: split it")
            planned.append((folder, name, oid))
        result.folders.append(folder)
    _write(repo, out, planned)
    return result


def _write(repo: Path, out: Path, planned: list[tuple[str, str, str]]) -> None:
    """Write the blobs into a temporary folder beside ``out`` (mode 0644), then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for folder, name, oid in planned:
            target = staging / PRESETS / folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(_git(repo, "cat-file", "blob", oid))
        (staging / PRESETS).mkdir(exist_ok=True)
        os.chmod(staging, 0o755)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

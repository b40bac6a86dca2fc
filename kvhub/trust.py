"""Where kvhub may load code or model weights from its own cache folder: only where no other user can write.

The cache may sit on a shared, world-writable disk (``HF_HOME`` on a cluster) under names anyone can compute, so a
file there is used only if it is a regular file (not a link) owned by this user and writable by no one else, in a
folder with the same properties: another user can then neither plant it nor change it. Folders are opened without
following a link and checked through their descriptor, so the folder checked is the folder read. Used by the C
kernels' build cache (:mod:`kvhub.kernels.native_build`) and the exported benchmark checkpoint
(:mod:`kvhub.models`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UntrustedPathError

_FIX = "fix: remove it, or set KVHUB_CACHE to a folder only you can write"


def check_stat(st: os.stat_result, what: str, kind: int) -> None:
    """Raise :class:`UntrustedPathError` unless ``st`` is a ``kind`` (``stat.S_IFDIR``/``S_IFREG``) owned by this
    user that no one else may write."""
    if stat.S_IFMT(st.st_mode) != kind or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UntrustedPathError(f"{what} is not a {'folder' if kind == stat.S_IFDIR else 'file'} that only you can "
                                 f"write (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); kvhub loads "
                                 f"nothing from it; {_FIX}")


@contextmanager
def private_dir(path: Path, create: bool = True) -> Iterator[int]:
    """A descriptor of the folder ``path`` (created 0700 if missing and ``create``, as is each missing parent:
    ``mkdir -p`` would give parents the umask's mode), opened without following a link and checked by
    :func:`check_stat`; closed on exit."""
    if create:
        for folder in reversed([p for p in (path, *path.parents) if not p.exists()]):
            folder.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise UntrustedPathError(f"{path} cannot be opened as a folder ({exc.strerror}; a link is refused); "
                                 f"{_FIX}") from None
    try:
        check_stat(os.fstat(fd), str(path), stat.S_IFDIR)
        yield fd
    finally:
        os.close(fd)


def check_private_folder(path: Path) -> None:
    """Raise :class:`UntrustedPathError` unless ``path``, its parent (whoever can write it can swap ``path`` for
    another folder between this check and a read) and every entry of ``path`` (plain files only) pass
    :func:`check_stat`."""
    with private_dir(path.parent, create=False):
        pass
    with private_dir(path, create=False) as fd:
        for name in os.listdir(fd):
            check_stat(os.stat(name, dir_fd=fd, follow_symlinks=False), str(path / name), stat.S_IFREG)

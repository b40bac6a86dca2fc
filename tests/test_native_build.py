"""Building and loading the C kernels (kvhub/kernels/native_build.py) against a second local user and bad compilers.

The attacker's library has a constructor that writes a marker file: if it is ever loaded, it ran code as the test's
user. The second user is uid 65534 (``nobody``), which needs the tests to run as root to act as it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from kvhub.kernels import backend, cpu, native_build

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler here: nothing is built, nothing to attack")
OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user (uid 65534) needs root")

PAYLOAD = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("KVHUB_TEST_MARKER"), "w");
    if (f) fclose(f);
}
void kvhub_scores(void) {}
void kvhub_values(void) {}
"""


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kvhub cache and no library loaded yet in this process (and none left behind for other tests)."""
    monkeypatch.setenv("KVHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("KVHUB_TEST_MARKER", str(tmp_path / "planted-library-ran"))
    native_build.library.cache_clear()
    yield tmp_path
    native_build.library.cache_clear()


def _nothing_left(fresh: Path) -> bool:
    """No library cached and no temporary build folder left behind."""
    native = fresh / "cache" / "native"
    return not native.exists() or not any(native.iterdir())


def _planted(fresh: Path) -> bool:
    return (fresh / "planted-library-ran").exists()


def _payload(folder: Path) -> Path:
    src, lib = folder / "planted.c", folder / "planted.so"
    src.write_text(PAYLOAD)
    subprocess.run([CC, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    return lib


def _library_name(fresh: Path, monkeypatch) -> str:
    """The file name kvhub builds the library under: what anyone can compute from public inputs."""
    monkeypatch.setenv("KVHUB_CACHE", str(fresh / "scratch"))
    assert native_build.library() is not None
    native_build.library.cache_clear()
    (name,) = [p.name for p in (fresh / "scratch" / "native").glob("*.so")]
    return name


def _as_other_user(script: str) -> None:
    subprocess.run(["sh", "-c", script], check=True, user=OTHER_UID, group=OTHER_UID, umask=0)


def _quiet_library():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        return native_build.library(), [str(w.message) for w in caught]


@needs_root
@pytest.mark.parametrize("attack", ["planted-native-folder", "pre-created-kvhub-folder"])
def test_a_library_another_user_planted_in_a_shared_cache_is_never_loaded(fresh, monkeypatch, attack):
    """HF_HOME on a shared, world-writable disk (sticky, as /tmp): the second user plants a library under the name
    kvhub computes, either in a ``kvhub/native`` folder they created, or by pre-creating ``kvhub/`` and swapping
    ``native/`` after the victim's first build. It must never be loaded (its constructor would run as us)."""
    name = _library_name(fresh, monkeypatch)
    shared = Path(tempfile.mkdtemp(prefix="kvhub-shared-hf-home-"))
    try:
        shared.chmod(0o1777)
        payload = _payload(shared)
        payload.chmod(0o755)
        monkeypatch.delenv("KVHUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(shared))
        plant = f"mkdir -p {shared}/kvhub/native && cp {payload} {shared}/kvhub/native/{name}"
        if attack == "pre-created-kvhub-folder":
            _as_other_user(f"mkdir -m 777 {shared}/kvhub")
            assert native_build.library() is not None  # the victim's first build, into a native/ of its own
            native_build.library.cache_clear()
            plant = f"mv {shared}/kvhub/native {shared}/kvhub/old && " + plant
        _as_other_user(plant)
        lib, said = _quiet_library()
        assert not _planted(fresh)
        assert lib is None and len(said) == 1 and "only you can write" in said[0]
    finally:
        shutil.rmtree(shared)


@needs_root
@pytest.mark.parametrize("how", ["owned-by-another-user", "writable-by-others", "symlink"])
def test_a_suspect_library_in_our_own_cache_is_rebuilt_not_loaded(fresh, monkeypatch, how):
    name = _library_name(fresh, monkeypatch)
    monkeypatch.setenv("KVHUB_CACHE", str(fresh / "cache"))
    native = fresh / "cache" / "native"
    native.mkdir(parents=True, mode=0o700)
    payload = _payload(fresh)
    target = native / name
    if how == "symlink":
        target.symlink_to(payload)
    else:
        shutil.copy(payload, target)
        if how == "owned-by-another-user":
            os.chown(target, OTHER_UID, OTHER_UID)
        else:
            target.chmod(0o777)
    lib, said = _quiet_library()
    assert not _planted(fresh)
    assert lib is not None and any("rebuilding" in s for s in said)
    assert not target.is_symlink() and target.stat().st_uid == os.geteuid()  # replaced by our own build


@pytest.mark.parametrize("cc", ["{cc} -O2", "env {cc}", "'{cc}'"])
def test_a_compiler_command_is_split_like_a_shell_would(fresh, monkeypatch, cc):
    monkeypatch.setenv("CC", cc.format(cc=CC))
    assert native_build.library() is not None


def _fake_compiler(folder: Path, body: str) -> Path:
    """A compiler script: ``--version`` answers, anything else runs ``body`` (``$out`` is the -o argument); every
    call is logged, so a retried build shows."""
    script = folder / "fake-cc"
    script.write_text("#!/bin/sh\n"
                      f'echo "$*" >> {folder}/calls\n'
                      'case "$*" in *--version*) echo "fake-cc 1.0"; exit 0;; esac\n'
                      'out=; prev=; for a; do [ "$prev" = -o ] && out=$a; prev=$a; done\n'
                      f"{body}\n")
    script.chmod(0o755)
    return script


BAD_COMPILERS = {
    "a folder": None,
    "exits 0 without output": "exit 0",
    "writes a non-library": 'echo "not a library" > "$out"',
    "a library without the kernels": f'echo "int x;" | {CC} -shared -fPIC -x c - -o "$out"',
    "fails": 'echo "error: something" >&2; exit 1',
}


@pytest.mark.parametrize("kind", sorted(BAD_COMPILERS))
def test_a_bad_compiler_gives_one_warning_and_the_torch_path_and_caches_nothing(fresh, monkeypatch, kind):
    body = BAD_COMPILERS[kind]
    monkeypatch.setenv("CC", "/bin" if body is None else str(_fake_compiler(fresh, body)))
    monkeypatch.delenv("KVHUB_KERNELS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):  # decode steps: the failure is remembered, never retried
            assert native_build.library() is None
            assert backend(torch.device("cpu")) == "torch"
    assert len(caught) == 1 and "PyTorch path" in str(caught[0].message)
    if body is not None:
        calls = (fresh / "calls").read_text().splitlines()
        assert len(calls) == 1 + len(native_build._FLAGS)  # --version, then each flag set once, in one process
    assert _nothing_left(fresh)


def test_a_hanging_compiler_is_killed_with_its_children_at_the_deadline(fresh, monkeypatch):
    """A compiler that floods its output and never exits (nor does the child it started): killed at the deadline,
    its whole process group with it, its temporary folder removed, and the call returns."""
    pidfile = fresh / "child.pid"
    monkeypatch.setenv("CC", str(_fake_compiler(fresh, f"sleep 300 & echo $! > {pidfile}; yes; wait")))
    monkeypatch.setattr(native_build, "BUILD_TIMEOUT_S", 1.0)
    start = time.monotonic()
    lib, said = _quiet_library()
    assert time.monotonic() - start < 10
    assert lib is None and "was killed" in said[0]
    assert _nothing_left(fresh)
    child = Path(f"/proc/{pidfile.read_text().strip()}/status")
    for _ in range(50):  # reaped by init, or a zombie: either way not running
        if not child.exists() or "State:\tZ" in child.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the compiler's child survived the build")


def test_without_a_compiler_the_torch_path_stays(fresh, monkeypatch):
    """No C compiler: one warning, and decoding keeps the PyTorch path (not an error)."""
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert cpu.library() is None
    monkeypatch.delenv("KVHUB_KERNELS", raising=False)
    assert backend(torch.device("cpu")) == "torch"


def test_the_cached_library_is_private(fresh):
    assert native_build.library() is not None
    native = fresh / "cache" / "native"
    (lib,) = native.glob("*.so")
    assert stat.S_IMODE(native.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE(lib.stat().st_mode) & 0o022 == 0

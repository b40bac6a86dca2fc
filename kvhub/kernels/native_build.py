"""Building and loading the C decode kernels of ``cpu_decode.c``, from a place no other user can write.

The C file is compiled at first use with the system's C compiler (``$CC``, split as a shell would, so ``ccache gcc``
works; else ``cc``/``gcc``/``clang``), for this machine (``-march=native``) and with OpenMP where the compiler has it,
into ``<kvhub cache>/native/`` under a name keyed by the source, flags, compiler and CPU, and loaded with
:mod:`ctypes`. Without a working compiler kvhub keeps the PyTorch path (``KVHUB_KERNELS=native`` makes that an error).

A shared library is code run as the user who loads it, and the cache may sit on a shared, world-writable disk
(``HF_HOME`` on a cluster), with a name anyone can compute. So a library is loaded only through a file descriptor
whose file is a regular file (not a link) owned by this user and writable by no one else, in a ``native/`` folder
with the same properties (:mod:`kvhub.trust`): another user can neither plant the file nor swap it between the check
and the load. A build runs with a deadline (:data:`BUILD_TIMEOUT_S`, its whole process group killed past it), in a
private temporary folder removed afterwards, and its output is published only once it loads and exports the
kernels' symbols. Any failure is remembered for the process: one warning, then the PyTorch path, never a retry per
decode step.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

from ..errors import UntrustedPathError
from ..models import cache_root
from ..trust import check_stat, private_dir

SOURCE = Path(__file__).with_name("cpu_decode.c")
SYMBOLS = ("kvhub_scores", "kvhub_values")  # the entry points; they return an int status (ctypes' default)
BUILD_TIMEOUT_S = 60.0  # the whole build (compiler version and every attempt); one attempt takes ~1 s on 2 cores
_OUTPUT_CAP = 16 << 10  # bytes of a compiler's output kept (for the key and the warning); the rest is drained
# Reassociation lets the dot products vectorize (cpu_decode.c); no -ffast-math: NaN and inf keep their meaning.
_MATH = ["-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])


class BuildFailed(Exception):
    """Why the kernels could not be built or loaded (the text of the one warning)."""


def compiler() -> list[str] | None:
    """The compiler command: ``$CC`` split like a shell would, its program found on ``PATH``; else the first of
    ``cc``, ``gcc``, ``clang``; None when there is none."""
    cc = os.environ.get("CC", "").strip()
    if not cc:
        found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        return [found] if found else None
    try:
        argv = shlex.split(cc)
    except ValueError as exc:
        raise BuildFailed(f"CC={cc!r} cannot be split into a command ({exc}); fix: set CC to a compiler command") from None
    program = shutil.which(argv[0]) if argv else None
    if program is None:
        raise BuildFailed(f"CC={cc!r} names no program found on PATH; fix: set CC to an installed C compiler")
    return [program, *argv[1:]]


def _cpu_id() -> str:
    """What ``-march=native`` compiles for: a shared cache folder must not hand one CPU's build to another."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("flags", "Features", "model name"))]
    return "\n".join(sorted(set(lines)))


def _run(argv: list[str], deadline: float, cwd: Path | None = None) -> tuple[int, str]:
    """Exit status and the first :data:`_OUTPUT_CAP` bytes of stdout+stderr of ``argv``, killed with its whole
    process group (``ccache`` and the compiler's own children) when ``deadline`` passes. A compiler writing without
    end neither fills memory nor blocks: the pipe is drained by a thread that keeps only the head."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise BuildFailed(f"the build took more than {BUILD_TIMEOUT_S:.0f} s; fix: check the compiler ({argv[0]})")
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:  # not executable, a folder, vanished
        raise BuildFailed(f"{argv[0]} cannot be run ({exc.strerror or exc}); fix: set CC to a C compiler") from None
    head = bytearray()

    def drain() -> None:
        for block in iter(lambda: proc.stdout.read(1 << 16), b""):
            head.extend(block[: _OUTPUT_CAP - len(head)])

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        raise BuildFailed(f"{shlex.join(argv[:1])} did not finish within {BUILD_TIMEOUT_S:.0f} s and was killed; "
                          "fix: check the compiler, or set CC to another one") from None
    finally:
        reader.join(timeout=5)  # a child that escaped the group may hold the pipe: never wait on it for long
        proc.stdout.close()
    return code, head.decode(errors="replace")


def _load(dir_fd: int, name: str, where: Path) -> ctypes.CDLL:
    """Open ``name`` in the checked folder ``dir_fd`` without following a link, check the file, and load it by a
    path through that folder's descriptor (``/proc/self/fd/<folder>/<name>``): the folder is the one checked, and
    only this user can change what it holds. (Not ``/proc/self/fd/<file>``: the loader caches libraries by path,
    and descriptor numbers are reused.) The library must export :data:`SYMBOLS`."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        check_stat(os.fstat(fd), str(where / name), stat.S_IFREG)
    finally:
        os.close(fd)
    through_fd = f"/proc/self/fd/{dir_fd}"
    try:
        lib = ctypes.CDLL(f"{through_fd}/{name}" if os.path.isdir(through_fd) else str(where / name))
    except OSError as exc:
        raise BuildFailed(f"{where / name} is not a loadable library ({str(exc)[:160]})") from None
    missing = [s for s in SYMBOLS if not hasattr(lib, s)]
    if missing:
        raise BuildFailed(f"{where / name} does not export {', '.join(missing)}")
    for symbol in SYMBOLS:
        getattr(lib, symbol).restype = ctypes.c_int  # 0, or -1: shapes the fixed buffers cannot hold (nothing written)
    return lib


def _compile(cc: list[str], folder: Path, name: str, deadline: float) -> ctypes.CDLL:
    """Build into a private temporary folder of ``folder``, trying the flag sets in order; the first output that
    loads and exports the symbols is published under ``name`` (atomically) and returned."""
    errors = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as tmp:
        built = Path(tmp) / name
        for flags in _FLAGS:
            cmd = [*cc, "-O3", "-std=c99", "-shared", "-fPIC", *_MATH, *flags, str(SOURCE), "-o", str(built), "-lm"]
            code, output = _run(cmd, deadline, cwd=Path(tmp))
            try:
                if code != 0:
                    raise BuildFailed(f"exit status {code}: {output.strip().splitlines()[-1:] or ['no output']}")
                if not built.is_file() or built.is_symlink():
                    raise BuildFailed(f"{shlex.join(cc)} exited 0 but wrote no library")
                os.chmod(built, 0o755, follow_symlinks=False)  # whatever the umask: nobody else may write it
                with private_dir(Path(tmp)) as tmp_fd:
                    lib = _load(tmp_fd, name, Path(tmp))
            except (BuildFailed, UntrustedPathError) as exc:
                errors.append(f"{' '.join(flags) or 'no extra flags'}: {exc}")
                built.unlink(missing_ok=True)
                continue
            os.replace(built, folder / name)  # atomic; the loaded library stays valid under its new name
            return lib
    raise BuildFailed(f"{shlex.join(cc)} did not build them ({'; '.join(errors)[:400]})")


def build() -> ctypes.CDLL:
    """The kernels for this source, compiler and CPU: loaded from the cache if a trusted build is there, else built.
    Raises :class:`BuildFailed` saying why not."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    cc = compiler()
    if cc is None:
        raise BuildFailed("no C compiler found (cc, gcc, clang); fix: install gcc or clang, or set CC")
    code, version = _run([*cc, "--version"], deadline)
    if code != 0:
        raise BuildFailed(f"`{shlex.join(cc)} --version` failed (exit status {code}); fix: set CC to a C compiler")
    parts = [SOURCE.read_bytes(), shlex.join([*_MATH, *sum(_FLAGS, [])]).encode(), shlex.join(cc).encode(),
             version.encode(), platform.machine().encode(), _cpu_id().encode()]
    name = f"cpu_decode-{hashlib.sha256(bytes(1).join(parts)).hexdigest()[:16]}.so"
    folder = cache_root() / "native"
    try:
        with private_dir(folder) as fd:
            try:
                return _load(fd, name, folder)
            except FileNotFoundError:
                pass
            except (BuildFailed, UntrustedPathError, OSError) as exc:  # in our own folder but unusable: build it again
                warnings.warn(f"kvhub: rebuilding the CPU decode kernels: {exc}", RuntimeWarning, stacklevel=3)
            return _compile(cc, folder, name, deadline)
    except OSError as exc:
        raise BuildFailed(f"{folder}: {exc.strerror or exc}; fix: check its permissions and free space") from None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning, once per process) where they cannot be built or trusted."""
    try:
        return build()
    except (BuildFailed, UntrustedPathError) as exc:
        warnings.warn(f"kvhub: the CPU decode kernels are not available: {exc}; decoding uses the slower PyTorch "
                      "path", RuntimeWarning, stacklevel=2)
        return None

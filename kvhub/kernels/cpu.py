"""The CPU decode kernels of ``cpu_decode.c``: unpacking fused into the score and value products.

A decode step on a short context is made of small ops, each costing ~5-10 us of dispatch on CPU whatever its size;
the PyTorch path needs several per code plane. These two C functions walk a stream's stored rows once per call. The
C file is compiled at first use with the system's C compiler (``$CC``, else ``cc``/``gcc``/``clang``), for this
machine (``-march=native``) and with OpenMP where the compiler has it, into ``<kvhub cache>/native/`` under a name
keyed by the source, compiler and CPU; loaded with :mod:`ctypes`. Without a compiler kvhub keeps the PyTorch path
(``KVHUB_KERNELS=native`` makes that an error instead).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from ..models import cache_root

SOURCE = Path(__file__).with_name("cpu_decode.c")
MAX_RANK, MAX_SEGMENTS = 256, 16  # stored components and segments per stream: the C buffers' sizes (cpu_decode.c)
# Reassociation lets the dot products vectorize (cpu_decode.c); no -ffast-math: NaN and inf keep their meaning.
_MATH = ["-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]
_FLAGS = (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], [])
_HALF = {torch.float16: 1, torch.bfloat16: 2}


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_id() -> str:
    """What ``-march=native`` compiles for: a shared cache folder must not hand one CPU's build to another."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    lines = [line for line in text.splitlines() if line.startswith(("flags", "Features", "model name"))]
    return "\n".join(sorted(set(lines)))


def _build(cc: str) -> Path | None:
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), platform.machine().encode(), _cpu_id().encode()]))
    target = cache_root() / "native" / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for flags in _FLAGS:
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [cc, "-O3", "-std=c99", "-shared", "-fPIC", *_MATH, *flags, str(SOURCE), "-o", str(built), "-lm"]
            if subprocess.run(cmd, capture_output=True, check=False).returncode == 0:
                os.replace(built, target)  # atomic: a concurrent first use sees the whole file or none
                return target
    return None


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning) where no C compiler builds them."""
    cc = _compiler()
    path = _build(cc) if cc else None
    if path is None:
        warnings.warn("kvhub: no C compiler built the CPU decode kernels; decoding uses the slower PyTorch path "
                      "(fix: install gcc or clang, or set CC)", RuntimeWarning, stacklevel=2)
        return None
    lib = ctypes.CDLL(str(path))
    for name in ("kvhub_scores", "kvhub_values"):
        getattr(lib, name).restype = None
    return lib


def supports(stream) -> bool:
    """Whether the kernels' fixed buffers hold the stream's rows and the kernels are built."""
    return stream.codec.rank <= MAX_RANK and len(stream.segments) <= MAX_SEGMENTS and library() is not None


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _i64(*values: int):
    return (ctypes.c_int64 * len(values))(*values)


_LAYOUTS: dict = {}


def _layout(stream) -> tuple:
    """Per kept segment the C ``Segment``'s fields that follow from the codec alone (bits, column, scale, offset,
    level-table address), made once per (codec, device); the tables are held with them."""
    device = stream.codes[0].buf.device
    key = (stream.codec, device)
    if key not in _LAYOUTS:
        tables = [stream.level_table(seg.bits) for seg in stream.segments]
        fields = tuple((seg.bits, g.start, -1 if g.scale is None else g.scale, -1 if g.offset is None else g.offset,
                        t.data_ptr() if t is not None else 0)
                       for seg, g, t in zip(stream.segments, stream.decoder().groups, tables))
        _LAYOUTS[key] = (fields, tables)
    return _LAYOUTS[key][0]


def _segments(stream, history: int) -> tuple:
    """The stream's stored segments as the C ``Segment`` array (one flat int64 array; buffer addresses move when
    a buffer grows, so it is built per call), their count, and the per-token scales and their strides."""
    fields = []
    static = _layout(stream)
    for known, store in zip(static, stream.codes):
        buf = store.buf  # the stored rows start at the buffer's start: no view needed
        fields += [*known, buf.shape[-1], _HALF.get(buf.dtype, 0), *buf.stride()[:3], buf.data_ptr()]
    scales = stream.token_scales(0, history)
    strides = _i64(*(scales.stride()[:3] if scales is not None else (0, 0, 0)))
    return _i64(*fields), len(static), scales, strides


def history_scores(g: torch.Tensor, stream, history: int, out: torch.Tensor) -> None:
    """``out[bh, m, t]`` for ``t < history`` (:func:`kvhub.attention._history_scores`): ``g`` [B*H, M, cols]
    contiguous float32 (``q @ decoder.matrix``), ``out`` [B*H, M, >= history] float32 with tokens contiguous."""
    batch, heads = stream.codes[0].buf.shape[:2]
    segs, nseg, scales, strides = _segments(stream, history)
    assert g.is_contiguous() and out.stride(-1) == 1
    shape = _i64(batch, heads, g.shape[1], history, g.shape[-1], stream.codec.rank)
    library().kvhub_scores(shape, _ptr(g), ctypes.c_int64(nseg), segs, _ptr(scales), strides, _ptr(out),
                           ctypes.c_int64(out.stride(0)), ctypes.c_int64(out.stride(1)))


def history_values(p: torch.Tensor, stream, history: int) -> torch.Tensor:
    """The coordinates [B*H, M, cols] of ``sum_t p_t x_t`` (:func:`kvhub.attention._history_values`) for weights
    ``p`` [B*H, M, >= history] (the first ``history`` columns; tokens contiguous). The token splits' partial sums
    take ``B*H * splits * M * cols`` floats: a few KB at decode."""
    batch, heads = stream.codes[0].buf.shape[:2]
    cols = stream.decoder().matrix.shape[-1]
    segs, nseg, scales, strides = _segments(stream, history)
    assert p.stride(-1) == 1
    splits = value_splits(batch * heads, history)
    partial = torch.empty(batch * heads * splits * p.shape[1] * cols)
    coords = torch.empty(p.shape[0], p.shape[1], cols)
    shape = _i64(batch, heads, p.shape[1], history, cols, stream.codec.rank)
    library().kvhub_values(shape, _ptr(p), ctypes.c_int64(p.stride(0)), ctypes.c_int64(p.stride(1)),
                           ctypes.c_int64(nseg), segs, _ptr(scales), strides, _ptr(partial), ctypes.c_int64(splits),
                           _ptr(coords))
    return coords


def value_splits(programs: int, history: int) -> int:
    """Token splits per (batch, head) for the value pass: enough for every thread, at least 64 tokens each."""
    threads = torch.get_num_threads()
    return max(1, min(-(-2 * threads // programs), history // 64))

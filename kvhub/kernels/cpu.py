"""The CPU decode kernels of ``cpu_decode.c``: unpacking fused into the score and value products.

A decode step on a short context is made of small ops, each costing ~5-10 us of dispatch on CPU whatever its size;
the PyTorch path needs several per code plane. These two C functions walk a stream's stored rows once per call. How
the C file is compiled, cached and loaded (only from a place no other user can write) is
:mod:`kvhub.kernels.native_build`; without a compiler kvhub keeps the PyTorch path (``KVHUB_KERNELS=native`` makes
that an error instead).
"""

from __future__ import annotations

import ctypes

import torch

from .native_build import library

MAX_RANK, MAX_SEGMENTS = 256, 16  # stored components and segments per stream: the C buffers' sizes (cpu_decode.c)
DTYPES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}  # 16-bit segments as stored (cpu_decode.c)
SCALE_KINDS = {torch.float16: 1, torch.uint8: 2}  # per-token scales: fp16 values, or byte codes and a table


class KernelError(RuntimeError):
    """The C kernels refused the shapes they were given (they check them against their fixed buffers)."""


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _i64(*values: int):
    return (ctypes.c_int64 * len(values))(*values)


def _segments(stream) -> tuple:
    """The stream's stored segments as the C ``Segment`` array (one flat int64 array: buffer addresses move when a
    buffer grows, so it is built per call) and the ``Scales`` record."""
    plan = stream.plan()
    fields = []
    for seg, store in zip(plan.segments, stream.codes):
        buf = store.buf  # the stored rows start at the buffer's start: no view needed
        fields += [seg.bits, seg.start, -1 if seg.scale is None else seg.scale, round(2 * seg.centre),
                   _ptr(seg.table).value or 0, buf.shape[-1], DTYPES.get(buf.dtype, 0), *buf.stride()[:3],
                   buf.data_ptr()]
    scales = stream.scales.buf if stream.n_scaled else None
    kind = 0 if scales is None else SCALE_KINDS[scales.dtype]
    lut = plan.scale_table if kind == 2 else None
    record = _i64(kind, _ptr(scales).value or 0, *(scales.stride()[:3] if scales is not None else (0, 0, 0)),
                  _ptr(lut).value or 0, 0 if lut is None else lut.shape[1])
    return _i64(*fields), len(plan.segments), record


def _check(status: int) -> None:
    if status != 0:
        raise KernelError("kvhub: the C decode kernels refused this stream's layout (more segments or components "
                          f"than they hold: {MAX_SEGMENTS} segments, {MAX_RANK} components); fix: KVHUB_KERNELS=torch")


def history_scores(g: torch.Tensor, stream, history: int, out: torch.Tensor) -> None:
    """``out[bh, m, t]`` for ``t < history``: the scores of query rows against stored tokens, from ``g`` [B*H, M,
    rank + 1] contiguous float32 (``q @ plan.matrix``); ``out`` [B*H, M, >= history] float32, tokens contiguous."""
    batch, heads = stream.codes[0].buf.shape[:2]
    segs, nseg, scales = _segments(stream)
    assert g.is_contiguous() and out.stride(-1) == 1
    shape = _i64(batch, heads, g.shape[1], history, g.shape[-1], stream.codec.rank)
    _check(library().kvhub_scores(shape, _ptr(g), ctypes.c_int64(nseg), segs, scales, _ptr(out),
                                  ctypes.c_int64(out.stride(0)), ctypes.c_int64(out.stride(1))))


def history_values(p: torch.Tensor, stream, history: int) -> torch.Tensor:
    """The coordinates [B*H, M, rank + 1] of ``sum_t p_t x_t`` against the plan's matrix for weights ``p`` [B*H,
    M, >= history] (the first ``history`` columns; tokens contiguous). The token splits' partial sums take ``B*H *
    splits * M * cols`` floats: a few KB at decode."""
    batch, heads = stream.codes[0].buf.shape[:2]
    cols = stream.codec.rank + 1
    segs, nseg, scales = _segments(stream)
    assert p.stride(-1) == 1
    splits = value_splits(batch * heads, history)
    partial = torch.empty(batch * heads * splits * p.shape[1] * cols)
    coords = torch.empty(p.shape[0], p.shape[1], cols)
    shape = _i64(batch, heads, p.shape[1], history, cols, stream.codec.rank)
    _check(library().kvhub_values(shape, _ptr(p), ctypes.c_int64(p.stride(0)), ctypes.c_int64(p.stride(1)),
                                  ctypes.c_int64(nseg), segs, scales, _ptr(partial), ctypes.c_int64(splits),
                                  _ptr(coords)))
    return coords


def value_splits(programs: int, history: int) -> int:
    """Token splits per (batch, head) for the value pass: enough for every thread, at least 64 tokens each."""
    threads = torch.get_num_threads()
    return max(1, min(-(-2 * threads // programs), history // 64))

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
_HALF = {torch.float16: 1, torch.bfloat16: 2}


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

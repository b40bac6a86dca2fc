"""Storage order: the order in which a compressed stream's components come out of its packed bytes.

A ``b``-bit segment packs ``8/b`` consecutive components per byte, low bits first, so shifting the stored bytes by
``j*b`` bits (and masking) gives *plane* ``j``: components ``a+j, a+j+8/b, ...`` of the segment. Every decode path
(the PyTorch one in :mod:`kvhub.attention`, the Triton kernels) reads planes whole and works in this order; the small
per-head matrices are reordered to match once, never the codes of every token.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .codec import StreamCodec
from .quant import CODES_PER_BYTE
from .quantizers.uniform import GAUSSIAN_STEP, half_levels


def pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= n and >= floor (tl.arange and tl.dot need powers of two, tl.dot at least 16)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@dataclass(frozen=True)
class StreamLayout:
    """``segments``: per kept segment ``(bits, width, width_pad, scale_index, step_factor)`` where ``width`` is the
    stored row length (bytes, or 16-bit coefficients), ``scale_index`` the column of its per-token scale (-1: none)
    and ``step_factor`` what turns that scale into the uniform quantization step.
    ``planes``: per code plane ``(segment, bits, shift, n, n_pad, column)``, ``column`` its first storage-order
    column. ``order[c]``: the component stored in storage column ``c``."""

    segments: tuple[tuple, ...]
    planes: tuple[tuple, ...]
    order: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.order)


@functools.lru_cache(maxsize=None)
def stream_layout(codec: StreamCodec) -> StreamLayout:
    segments, planes, order = [], [], []
    start, scale_index = 0, 0
    for i, seg in enumerate(codec.kept):
        per = 1 if seg.bits == 16 else CODES_PER_BYTE[seg.bits]
        width = seg.size // per
        if seg.bits == 16 or codec.scale == "channel":
            index, factor = -1, 1.0
        else:
            index, factor = scale_index, (1.0 / half_levels(seg.bits) if codec.scale == "token" else GAUSSIAN_STEP[seg.bits])
            scale_index += 1
        segments.append((seg.bits, width, pow2(width), index, factor))
        for j in range(per):
            planes.append((i, seg.bits, j * seg.bits, width, pow2(width), len(order)))
            order.extend(range(start + j, start + seg.size, per))
        start += seg.size
    return StreamLayout(tuple(segments), tuple(planes), tuple(order))

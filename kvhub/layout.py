"""Storage order: the order in which a compressed stream's components come out of its packed bytes.

A ``b``-bit segment packs ``8/b`` consecutive components per byte, low bits first, so shifting the stored bytes by
``j*b`` bits (and masking) gives *plane* ``j``: components ``a+j, a+j+8/b, ...`` of the segment. Every decode path
reads planes whole and works in this order; the small per-head matrices of the decode plan (:mod:`kvhub.plan`) are
reordered to match once, never the codes of every token.
"""

from __future__ import annotations

import functools

from .codec import StreamCodec
from .quant import CODES_PER_BYTE


def pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= n and >= floor (tl.arange and tl.dot need powers of two, tl.dot at least 16)."""
    return max(floor, 1 << (max(n, 1) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def storage_order(codec: StreamCodec) -> tuple[int, ...]:
    """``order[c]``: the component stored in storage column ``c``."""
    order, start = [], 0
    for seg in codec.kept:
        per = 1 if seg.bits == 16 else CODES_PER_BYTE[seg.bits]
        for j in range(per):
            order.extend(range(start + j, start + seg.size, per))
        start += seg.size
    return tuple(order)

"""A tensor that grows along its token axis in fixed blocks.

Appending to a cache with ``torch.cat`` copies the whole history every step (O(n) per token). Here the buffer is
allocated ahead, so an append writes only the new tokens. Capacity grows by whole blocks of
``max(BLOCK, length / HEADROOM_DIVISOR)`` tokens: what a sequence holds stays within ~3% of what it uses at any
length past a few blocks (a geometric 1.25x growth left up to 25% of every sequence's buffers empty), and a regrowth
copy happens once per block, which costs ~1/32 of the history pass a decode step makes anyway. ``view()`` is the
filled part; ``nbytes()`` counts it, ``reserved_nbytes()`` the allocation."""

from __future__ import annotations

import torch

BLOCK = 64
HEADROOM_DIVISOR = 32
TOKEN_DIM = 2  # [batch, heads, tokens, ...]


def exact_dtype_for(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of a cache's exact tokens and 16-bit segments by default: the model's own when it is 16-bit, else
    fp16 (the reference is an fp16 cache, and an fp32 CPU model should not make them cost twice that)."""
    return model_dtype if model_dtype.itemsize <= 2 else torch.float16


def _capacity(needed: int) -> int:
    step = max(BLOCK, needed // HEADROOM_DIVISOR)
    return -(-needed // step) * step


class GrowableTensor:
    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[TOKEN_DIM]
        if self.buf is None or self.length + n > self.buf.shape[TOKEN_DIM]:
            shape = list(x.shape)
            shape[TOKEN_DIM] = _capacity(self.length + n)
            grown = torch.empty(shape, dtype=x.dtype, device=x.device)
            if self.length:
                grown.narrow(TOKEN_DIM, 0, self.length).copy_(self.view())
            self.buf = grown
        self.buf.narrow(TOKEN_DIM, self.length, n).copy_(x)
        self.length += n

    def view(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """The filled tokens ``[start, start + length)`` (all of them by default), without a copy."""
        assert self.buf is not None
        return self.buf.narrow(TOKEN_DIM, start, self.length - start if length is None else length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def drop_front(self, n: int) -> None:
        """Forget the oldest ``n`` tokens (sliding-window layers), shrinking the allocation with them."""
        if n <= 0 or self.buf is None:
            return
        keep = self.view(n)
        shape = list(keep.shape)
        shape[TOKEN_DIM] = _capacity(max(keep.shape[TOKEN_DIM], 1))
        self.buf = torch.empty(shape, dtype=keep.dtype, device=keep.device)
        self.buf.narrow(TOKEN_DIM, 0, keep.shape[TOKEN_DIM]).copy_(keep)
        self.length = keep.shape[TOKEN_DIM]

    def map_batch(self, fn) -> None:
        """Apply a batch-axis operation (beam reorder, repeat, select) to the whole buffer, headroom included: one
        copy, and the next appends still land in place (applied to the filled part only, every beam step would
        copy twice, once here and once to regrow)."""
        if self.buf is not None:
            self.buf = fn(self.buf).contiguous()

    def to(self, device) -> None:
        if self.buf is not None:
            self.buf = self.buf.to(device, non_blocking=True)

    def nbytes(self) -> int:
        if self.buf is None:
            return 0
        per_token = self.buf.nbytes // max(self.buf.shape[TOKEN_DIM], 1)
        return per_token * self.length

    def reserved_nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.nbytes


class Scratch:
    """Reused buffers for per-step temporaries the size of a layer's history (one per ``slot``), owned by one cache
    and shared by its layers (they decode one at a time). A fresh allocation that large is served by new pages from
    the OS, and faulting them in cost 3-4x the conversion itself (measured on CPU). Counted in the cache's
    allocation, freed with it."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (slot, dtype, torch.device(device))
        n = int(torch.Size(shape).numel())
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self.buffers[key] = torch.empty(max(n, 1 << 16), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

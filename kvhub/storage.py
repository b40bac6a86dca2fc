"""A tensor that grows along its token axis with preallocated capacity.

Appending to a cache with ``torch.cat`` copies the whole history every step (O(n) per token). Here capacity grows
geometrically, so appends are amortized O(1) and history is written once. ``view()`` is the filled part;
``nbytes()`` counts it, ``reserved_nbytes()`` the allocation."""

from __future__ import annotations

import torch

_GROWTH = 1.25
_MIN_STEP = 256
TOKEN_DIM = 2  # [batch, heads, tokens, ...]


class GrowableTensor:
    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None
        self.length = 0

    def append(self, x: torch.Tensor) -> None:
        n = x.shape[TOKEN_DIM]
        if self.buf is None:
            shape = list(x.shape)
            shape[TOKEN_DIM] = max(n, _MIN_STEP)
            self.buf = torch.empty(shape, dtype=x.dtype, device=x.device)
        elif self.length + n > self.buf.shape[TOKEN_DIM]:
            cap = max(self.length + n, int(self.buf.shape[TOKEN_DIM] * _GROWTH), self.buf.shape[TOKEN_DIM] + _MIN_STEP)
            shape = list(self.buf.shape)
            shape[TOKEN_DIM] = cap
            grown = torch.empty(shape, dtype=self.buf.dtype, device=self.buf.device)
            grown.narrow(TOKEN_DIM, 0, self.length).copy_(self.view())
            self.buf = grown
        self.buf.narrow(TOKEN_DIM, self.length, n).copy_(x)
        self.length += n

    def view(self) -> torch.Tensor:
        assert self.buf is not None
        return self.buf.narrow(TOKEN_DIM, 0, self.length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def drop_front(self, n: int) -> None:
        """Forget the oldest ``n`` tokens (sliding-window layers)."""
        if n <= 0 or self.buf is None:
            return
        keep = self.view().narrow(TOKEN_DIM, n, self.length - n).clone()
        self.length = 0
        self.buf.narrow(TOKEN_DIM, 0, keep.shape[TOKEN_DIM]).copy_(keep)
        self.length = keep.shape[TOKEN_DIM]

    def map_batch(self, fn) -> None:
        """Apply a batch-axis operation (beam reorder, repeat, select) to the filled part."""
        if self.buf is not None:
            self.buf = fn(self.view()).contiguous()
            self.length = self.buf.shape[TOKEN_DIM]

    def to(self, device) -> None:
        if self.buf is not None:
            self.buf = self.buf.to(device, non_blocking=True)

    def nbytes(self) -> int:
        if self.buf is None:
            return 0
        per_token = self.buf.nbytes // self.buf.shape[TOKEN_DIM]
        return per_token * self.length

    def reserved_nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.nbytes

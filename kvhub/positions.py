"""The RoPE positions of a stream's stored tokens, for keys coded before RoPE (:mod:`kvhub.rope`).

A key coded before RoPE is turned back by its own position when it is read, so the position must be kept. Held token
by token that is 4 bytes per token, row and layer: on the benchmark model 2.5% of what a 4.9x cache holds. But in
almost every call a row's positions run on by one per token (``generate``, chunked prefill, a forward loop), and
then one origin per row says them all: ``position = origin + index``. :class:`StoredPositions` keeps that origin
while it holds, and switches to one position per token, for good, at the first append that breaks the run (a
left-padded row, whose pads transformers puts at position 1; positions a caller chose). Both forms are counted.
"""

from __future__ import annotations

import torch

from .storage import GrowableTensor

POSITION_DTYPE = torch.int32  # one stored position, once a row's positions stop running on by one


class StoredPositions:
    """Positions ``[B, T]`` of a stream's tokens in storage order, with :class:`~kvhub.storage.GrowableTensor`'s
    housekeeping (truncate, drop_front, map_batch, to, nbytes, reserved_nbytes)."""

    def __init__(self) -> None:
        self.origin: torch.Tensor | None = None  # [B] int64 while every row's positions run on by one
        self.explicit = GrowableTensor()  # [B, 1, T, 1] POSITION_DTYPE once they do not
        self.length = 0

    @property
    def per_token(self) -> bool:
        return self.explicit.buf is not None

    def _run(self, start: int, length: int) -> torch.Tensor:
        return self.origin[:, None] + torch.arange(start, start + length, device=self.origin.device)

    def append(self, positions: torch.Tensor) -> None:
        """Record the positions ``[B, n]`` of the next ``n`` stored tokens."""
        positions = positions.long()
        n = positions.shape[-1]
        if not self.per_token:
            if self.origin is None:
                self.origin = positions[:, 0] - self.length
            if torch.equal(self._run(self.length, n), positions):
                self.length += n
                return
            if self.length:  # the run breaks: every earlier token's position, written out once
                self.explicit.append(self._run(0, self.length).to(POSITION_DTYPE)[:, None, :, None])
            self.origin = None
        self.explicit.append(positions.to(POSITION_DTYPE)[:, None, :, None])
        self.length += n

    def view(self, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Positions ``[B, T]`` of tokens ``[start, start + length)`` (int64 from the origin, as stored otherwise)."""
        length = self.length - start if length is None else length
        if self.per_token:
            return self.explicit.view(start, length)[:, 0, :, 0]
        return self._run(start, length)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self.explicit.truncate(length)

    def drop_front(self, n: int) -> None:
        n = min(max(n, 0), self.length)
        if self.per_token:
            self.explicit.drop_front(n)
        elif self.origin is not None:
            self.origin = self.origin + n  # the same positions, counted from the new first token
        self.length -= n

    def map_batch(self, fn) -> None:
        if self.origin is not None:
            self.origin = fn(self.origin)
        self.explicit.map_batch(fn)

    def to(self, device) -> None:
        if self.origin is not None:
            self.origin = self.origin.to(device)
        self.explicit.to(device)

    def nbytes(self) -> int:
        if self.per_token:
            return self.explicit.nbytes()
        return 0 if self.origin is None else self.origin.nbytes

    def reserved_nbytes(self) -> int:
        if self.per_token:
            return self.explicit.reserved_nbytes()
        return 0 if self.origin is None else self.origin.nbytes

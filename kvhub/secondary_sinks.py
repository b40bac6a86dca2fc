"""Secondary attention sinks kept exact: a few token-heads of a layer's compressed history whose key and value are
held beside their codes, and restored by every decoder.

Past the first tokens (the sinks, kept exact by every codec) a handful of tokens still draw most of the attention
that later queries send to the compressed past: in SmolLM2's layers 3 to 10 the top 1% of those tokens take at least
80% of it, on every evaluation corpus (``benchmarks/secondary_sinks.py``, ``benchmarks/results/frontier-4.md``).
Their value vectors are short, which is how a cache finds them when it codes a token, with no future query to ask:
a token-head whose value vector is shorter than ``secondary_sinks`` times its layer and head's median length on
calibration text (:attr:`kvhub.bases.StreamBasis.norm_median`) is flagged. At 2 bits each of those tokens passes its
quantization error on almost undamped, because so much attention lands on it.

A flagged token keeps its codes (every decoder reads the history as one rectangle) and gets a *residual* row here:
its exact key (after RoPE, as attention scores it) and value minus what its codes decode to, in the cache's exact
dtype, with its batch row, head and history index. A decoder then adds ``q . dk`` to the token's score and ``p dv``
to the output (:func:`kvhub.backends.torch_ops`), or the residual to the decoded vector (a stock kernel's rebuilt
history): the token is then attended as if it had never been coded. The rows follow the history through every
change of it: crop, a sliding window's forgetting, beam reordering, device moves.

Bytes: per flagged token-head 8 bytes of index (int32 row and token) and two residual vectors of ``head_dim``
16-bit numbers, counted in :meth:`nbytes` as the cache's ``secondary_sinks`` part.
"""

from __future__ import annotations

import torch

from .codec import STREAMS
from .errors import KVHubError
from .storage import GrowableTensor


class SecondarySinksError(KVHubError, ValueError):
    """A batch change the exact rows cannot follow."""


class SecondarySinks:
    """The exact rows of one layer (module docstring), in two :class:`~kvhub.storage.GrowableTensor` s along their
    token axis: ``where`` [1, 1, N, 2] int32 (batch row times heads plus head, history index) and ``residuals``
    [1, 1, N, 2, d] (key, value) in ``dtype``, for a ``heads``-head layer."""

    def __init__(self, heads: int, dtype: torch.dtype) -> None:
        self.heads, self.dtype = heads, dtype
        self.where, self.residuals = GrowableTensor(), GrowableTensor()

    def __len__(self) -> int:
        return self.where.length

    def _rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``where`` [N, 2] and ``residuals`` [N, 2, d] as held (views)."""
        return self.where.view()[0, 0], self.residuals.view()[0, 0]

    def _hold(self, where: torch.Tensor, residuals: torch.Tensor) -> None:
        """Hold exactly these rows (after a filter or a batch change), in buffers sized for them."""
        self.where, self.residuals = GrowableTensor(), GrowableTensor()
        if where.shape[0]:
            self.where.append(where[None, None])
            self.residuals.append(residuals[None, None])

    def add(self, flags: torch.Tensor, start: int, key_residual: torch.Tensor, value_residual: torch.Tensor) -> None:
        """Keep the token-heads ``flags`` [B, H, n] marks, of tokens coded at history indices ``[start, start + n)``,
        whose residuals (exact minus decoded) are ``key_residual``/``value_residual`` [B, H, n, d]."""
        b, h, t = flags.nonzero(as_tuple=True)
        if not b.numel():
            return
        self.where.append(torch.stack([b * self.heads + h, t + start], -1).to(torch.int32)[None, None])
        pair = torch.stack([key_residual[b, h, t], value_residual[b, h, t]], 1)
        self.residuals.append(pair.to(self.dtype)[None, None])

    def visible(self, history: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(rows, tokens, residuals)`` for an attention call over the first ``history`` tokens (long, long, float32
        [N, 2, d]), or None when nothing is kept. Rows of tokens coded after that history (the call's own flush) get
        zero residuals at a clamped index instead of being filtered out: no host sync on the decode path."""
        if not len(self):
            return None
        where, residuals = self._rows()
        tokens = where[:, 1].long()
        seen = (tokens < history)[:, None, None]
        return where[:, 0].long(), tokens.clamp(max=history - 1), residuals.float() * seen

    def restore(self, decoded: torch.Tensor, stream: str) -> torch.Tensor:
        """``decoded`` [B, H, T, d] (float32, the history's first ``T`` tokens of ``stream`` as their codes decode)
        with each kept token-head's residual added: the exact vectors, for a stock kernel."""
        side = STREAMS.index(stream)
        seen = self.visible(decoded.shape[2])
        if seen is None:
            return decoded
        rows, tokens, residuals = seen
        flat = decoded.view(-1, decoded.shape[2], decoded.shape[3])
        flat.index_put_((rows, tokens), residuals[:, side], accumulate=True)
        return decoded

    # --- following the history ---------------------------------------------------------------------------------
    def _keep(self, keep, shift: int = 0) -> None:
        """Keep the rows ``keep(tokens)`` marks, their history indices moved down by ``shift``."""
        where, residuals = self._rows()
        mask = keep(where[:, 1])
        kept = where[mask]
        kept[:, 1] -= shift
        self._hold(kept, residuals[mask])

    def truncate(self, length: int) -> None:
        """The history was cut to its first ``length`` tokens."""
        if len(self):
            self._keep(lambda tokens: tokens < length)

    def drop_front(self, n: int) -> None:
        """The history forgot its oldest ``n`` tokens (a sliding window)."""
        if len(self) and n > 0:
            self._keep(lambda tokens: tokens >= n, n)

    def map_batch(self, fn, batch: int) -> None:
        """The batch rows were remapped by ``fn`` (what the layer applies to its tensors: a beam reorder, a repeat,
        a selection): each new row takes the rows of the old row it came from."""
        if not len(self):
            return
        where, residuals = self._rows()
        source = fn(torch.arange(batch, device=where.device)[:, None])  # [new batch, 1]: the old row of each new row
        if source.dim() != 2 or source.shape[1] != 1:
            raise SecondarySinksError(f"a batch change gave rows of shape {tuple(source.shape)}; fix: change the batch "
                                      "with reorder_cache, batch_repeat_interleave or batch_select_indices")
        old_row, head = where[:, 0].long() // self.heads, where[:, 0].long() % self.heads
        new_row, entry = (source[:, 0].long()[:, None] == old_row[None, :]).nonzero(as_tuple=True)
        moved = torch.stack([new_row * self.heads + head[entry], where[entry, 1].long()], -1).to(torch.int32)
        self._hold(moved, residuals[entry])

    def to(self, device) -> None:
        self.where.to(device)
        self.residuals.to(device)

    # --- bytes -------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the kept rows: indices and residuals."""
        return self.where.nbytes() + self.residuals.nbytes()

    def stream_nbytes(self) -> dict[str, int]:
        """:meth:`nbytes` split by stream: each residual to its own, the indices to the keys."""
        half = self.residuals.nbytes() // 2
        return {"keys": self.where.nbytes() + half, "values": half}

    def reserved_nbytes(self) -> int:
        """Bytes allocated, growth headroom included."""
        return self.where.reserved_nbytes() + self.residuals.reserved_nbytes()


def thresholds(basis, fraction: float, device) -> torch.Tensor:
    """[H] float32 on ``device``: ``fraction`` of the calibrated median value length of each head of ``basis``
    (a :class:`~kvhub.bases.StreamBasis` of values), made once per basis, fraction and device and shared by every
    cache of the preset (counted with the bases, not per sequence)."""
    memo = basis.__dict__.setdefault("_on_device", {})
    key = ("secondary_sinks", torch.device(device), fraction)
    if key not in memo:
        memo[key] = (basis.norm_median.to(device, torch.float32) * fraction,)
    return memo[key][0]

"""``CompressedLayer``: one model layer's cache, holding keys and values compressed for real.

Tokens are held in *storage order* ``[sink | compressed history | recent]``:

* ``sink``: the first ``sink`` **real** tokens of each row stay in full precision (attention sinks are unlike every
  other token and a PCA basis reconstructs them badly, see docs/field-notes.md). In a left-padded batch a row's first
  real token is not at position 0: the first call reads each row's padding from ``position_ids`` (transformers
  numbers a row's real tokens from 0, so a row with ``p`` pads ends its first call on position ``n - 1 - p``) and
  moves the row's sink tokens to the front of its storage (``order``), its pads behind them into the history.
  Masks and materialized tensors are permuted the same way, so nothing else sees the difference.
* the most recent ``window`` tokens stay in full precision; once ``flush_block`` more have accumulated beyond the
  window they are compressed together, once, and never re-quantized;
* a sliding-window layer (Mistral, Gemma-2 local layers) compresses inside its window and forgets tokens that left
  it in amortized batches; its mask covers the stock layer's columns, and attention masks the older tokens it still
  holds.

``update`` returns, for the stock attention kernels, the full-length keys and values in tensor order (history
reconstructed). When the model runs :mod:`kvhub.attention` and history exists, it returns only the exact tokens,
tagged with the layer, and attention reads the compressed history directly; with nothing compressed yet (a prefill)
it returns the states untouched and the model's own kernel (SDPA, flash) runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .bases import StreamBasis
from .codec import LayerCodec
from .errors import KVHubError
from .rope import RotaryFrame
from .secondary_sinks import SecondarySinks, thresholds
from .storage import Scratch, exact_dtype_for
from .stream import CompressedStream

MASKED = torch.finfo(torch.float32).min  # additive mask value; -inf would turn a fully masked (pad) row into NaN


class HistoryLostError(KVHubError, RuntimeError):
    """A layer handed attention only its exact tokens, and nothing read its compressed history."""


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` then ``b`` along the token axis, in a tensor of its own: a slice of a prefill's states would keep the
    whole prefill's storage alive."""
    return b.clone() if a.shape[-2] == 0 else (a if b.shape[-2] == 0 else torch.cat([a, b], dim=-2))


def sink_order(position_ids: torch.Tensor | None, batch: int, n: int, sink: int) -> torch.Tensor | None:
    """``[batch, K]`` storage order of the first ``K`` positions that puts each row's first ``sink`` real tokens
    first, or None when no row is padded (or the first call does not hold every row's sink tokens)."""
    if not sink or position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] != n:
        return None
    if position_ids.shape[0] not in (1, batch):
        return None
    pads = (n - 1 - position_ids[:, -1]).clamp(0, n).expand(batch).tolist()
    longest = max(pads)
    if longest == 0 or longest + sink > n:
        return None
    k = longest + sink
    rows = []
    for p in pads:
        rows.append(torch.cat([torch.arange(p, p + sink), torch.arange(0, p), torch.arange(p + sink, k)]))
    return torch.stack(rows).to(position_ids.device)


def _position_ids(kwargs: dict) -> torch.Tensor | None:
    """The call's ``position_ids`` as transformers passes them to ``Cache.update`` (inside ``kwargs``)."""
    return (kwargs.get("kwargs") or {}).get("position_ids", kwargs.get("position_ids"))


def _take(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, :, order[b]]`` along the token axis for the first ``order.shape[1]`` tokens; the rest unchanged."""
    k = order.shape[1]
    index = order[:, None, :, None].expand(x.shape[0], x.shape[1], k, x.shape[3])
    return torch.cat([x[:, :, :k].gather(2, index), x[:, :, k:]], dim=2)


class CompressedLayer(CacheLayerMixin):
    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        codec: LayerCodec,
        key_basis: StreamBasis | None,
        value_basis: StreamBasis | None,
        flush_block: int = 16,
        sliding_window: int | None = None,
        exact_dtype: torch.dtype | None = None,
        fast_path: Callable[[], bool] | None = None,
        scratch: Scratch | None = None,
        on_rebuild: Callable[[], None] | None = None,
        rope: RotaryFrame | None = None,
        secondary_sinks: float = 0.0,
    ) -> None:
        super().__init__()
        self.secondary_sinks = secondary_sinks  # kvhub.secondary_sinks: flag short value vectors, keep them exact
        self.rope = rope  # keys coded before RoPE: each token's position is kept until it is coded
        self.requested_exact_dtype = exact_dtype
        self.fast_path = fast_path
        self.on_rebuild = on_rebuild  # told when held history is rebuilt for a stock kernel
        self.scratch = scratch if scratch is not None else Scratch()
        self.visible = 0
        self.awaiting = False  # exact tokens handed out, history not read yet
        self.codec = codec
        self.bases = {"keys": key_basis, "values": value_basis}
        self.flush_block = flush_block
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.dropped = 0
        self.order: torch.Tensor | None = None

    # --- transformers' layer protocol -----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        # ``exact_dtype=torch.float32`` keeps sink, recent tokens and 16-bit segments bit-exact (used to prove the
        # machinery lossless).
        self.exact_dtype = self.requested_exact_dtype or exact_dtype_for(self.dtype)
        empty = key_states[:, :, :0].to(self.exact_dtype)
        self.sink_keys, self.sink_values = empty.clone(), value_states[:, :, :0].to(self.exact_dtype)
        self.recent_keys, self.recent_values = empty.clone(), self.sink_values.clone()
        self.streams = {
            name: CompressedStream(self.codec.stream(name), self.bases[name], self.device, self.exact_dtype,
                                   self.scratch, self.rope if name == "keys" else None)
            for name in ("keys", "values")
        }
        self.recent_positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=self.device)
        self.exact_rows = None
        if self.secondary_sinks:
            self.sink_threshold = thresholds(self.bases["values"], self.secondary_sinks, self.device)
            self.exact_rows = SecondarySinks(key_states.shape[1], self.exact_dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.awaiting:
            self.awaiting = False
            raise HistoryLostError(
                "kvhub: the last call's attention never read this layer's compressed history, so its output ignored "
                "it (the keys were copied on their way to attention, or a kernel outside kvhub ran); fix: run the "
                "model inside `with kvhub.compressed_attention(model):` and pass the cache's keys to attention as "
                "they are")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self.is_sliding:  # before this call's attention, never after: its queries still see one more token
            self._forget_outside_window()
        first = self.cumulative_length == 0
        position_ids = _position_ids(kwargs)
        if first:
            self.order = sink_order(position_ids, key_states.shape[0], n, self.codec.sink)
        history = self.streams["keys"].length
        if history and self.fast_path is not None and self.fast_path():
            # kvhub.attention reads the compressed history itself: return only the exact tokens, tagged.
            self.visible = history
            # (cat promotes the 16-bit exact tokens to the model's dtype in the same pass)
            keys = torch.cat([self.sink_keys, self.recent_keys, key_states], -2)
            values = torch.cat([self.sink_values, self.recent_values, value_states], -2)
            keys._kvhub_layer, keys._kvhub_sink = self, self.sink_keys.shape[-2]
            self.awaiting = True
        else:
            if history and self.on_rebuild is not None:
                self.on_rebuild()
            keys, values = self._materialized(key_states, value_states)
        self._store(key_states, value_states, first, position_ids)
        return keys, values

    def _positions(self, position_ids: torch.Tensor | None, batch: int, n: int) -> torch.Tensor:
        """[batch, n] RoPE positions of this call's tokens: the model's ``position_ids`` (a padded row's own), or
        the next ``n`` positions when a caller passes none."""
        if position_ids is not None and position_ids.dim() == 2 and position_ids.shape[-1] == n:
            return position_ids.to(self.device, torch.long).expand(batch, n)
        return torch.arange(self.cumulative_length, self.cumulative_length + n, device=self.device).expand(batch, n)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, first: bool,
               position_ids: torch.Tensor | None = None) -> None:
        n = key_states.shape[-2]
        key_states, value_states = key_states.to(self.exact_dtype), value_states.to(self.exact_dtype)
        positions = self._positions(position_ids, key_states.shape[0], n) if self.rope is not None else None
        if first and self.order is not None:
            key_states, value_states = _take(key_states, self.order), _take(value_states, self.order)
            if positions is not None:
                positions = _take(positions[:, None, :, None], self.order)[:, 0, :, 0]
        take = max(0, min(self.codec.sink - self.cumulative_length, n))
        if positions is not None:
            self.recent_positions = torch.cat([self.recent_positions, positions[:, take:]], -1)
        if take:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :take])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :take])
        self.cumulative_length += n
        self.recent_keys = _cat(self.recent_keys, key_states[:, :, take:])
        self.recent_values = _cat(self.recent_values, value_states[:, :, take:])
        self._flush()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        w = self.sliding_window
        kv_offset = max(self.cumulative_length - w + 1, 0)
        if self.cumulative_length >= w:
            return w - 1 + query_length, kv_offset
        return self.cumulative_length + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def take_history(self) -> int:
        """For :func:`kvhub.attention.attend`: how many compressed tokens this call's attention reads (and that it
        read them, see :class:`HistoryLostError`)."""
        self.awaiting = False
        return self.visible

    # --- layout ---------------------------------------------------------------------------------------------
    def _permuted(self) -> torch.Tensor | None:
        """The sink order while its tokens are still held (a sliding layer forgets them as one block)."""
        return self.order if self.dropped == 0 else None

    def _materialized(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Held tokens (history rebuilt) then the new ones, in tensor order, cut to what the stock mask covers."""
        if self.held_tokens() == 0:  # a first prefill: the states themselves, no copy
            return key_states, value_states
        out = []
        for name, new in (("keys", key_states), ("values", value_states)):
            sink, recent = (self.sink_keys, self.recent_keys) if name == "keys" else (self.sink_values, self.recent_values)
            stream = self.streams[name]
            if not stream.length:
                history = sink[:, :, :0].to(self.dtype)
            elif self.exact_rows is not None and len(self.exact_rows):
                history = self.exact_rows.restore(stream.decode(torch.float32), name).to(self.dtype)
            else:
                history = stream.decode(self.dtype)
            held = torch.cat([sink.to(self.dtype), history, recent.to(self.dtype)], -2)
            order = self._permuted()
            if order is not None and held.shape[-2] >= order.shape[1]:
                held = _take(held, order.argsort(-1))
            out.append(torch.cat([held, new], -2))
        keys, values = out
        if self.is_sliding:
            visible = self.sliding_window - 1 + key_states.shape[-2]
            keys, values = keys[:, :, -visible:], values[:, :, -visible:]
        return keys, values

    def storage_mask(self, mask: torch.Tensor | None, query_length: int, total: int) -> torch.Tensor | None:
        """The additive mask ``[B|1, 1, M, total]`` over held-then-new tokens in storage order, from the model's mask
        over the columns :meth:`get_mask_sizes` announced (``None``: nothing to mask). A sliding layer masks what its
        window hides itself: held tokens it has not forgotten yet, and (under a flash-attention mask, which is None
        or 2-D and leaves the window to the kernel) tokens older than each query's window; a padded row's sink and
        pad columns are permuted like its tokens."""
        if mask is not None and mask.shape[-1] > total:  # a 2D padding mask spans every position ever seen
            mask = mask[..., -total:]
        columns = mask.shape[-1] if mask is not None else total
        if mask is None and query_length > 1:
            mask = torch.zeros(query_length, columns, device=self.device).masked_fill_(
                torch.ones(query_length, columns, dtype=torch.bool, device=self.device).triu_(columns - query_length + 1), MASKED
            )[None, None]
        if columns < total:
            if mask is None:
                mask = torch.zeros(1, 1, query_length, columns, device=self.device)
            hidden = mask.new_full((*mask.shape[:-1], total - columns), MASKED)
            mask = torch.cat([hidden, mask], -1)
        if self.is_sliding and total > self.sliding_window:
            mask = self._window_mask(mask, query_length, total)
        order = self._permuted()
        if mask is not None and order is not None:
            k = order.shape[1]
            index = order[:, None, None, :].expand(order.shape[0], 1, mask.shape[2], k)
            mask = torch.cat([mask[..., :k].expand(order.shape[0], -1, -1, -1).gather(-1, index), mask[..., k:].expand(order.shape[0], -1, -1, -1)], -1)
        return mask

    def _window_mask(self, mask: torch.Tensor | None, query_length: int, total: int) -> torch.Tensor:
        """``mask`` with every column older than its query's window hidden. Held tokens are the last ``total``
        positions in tensor order (forgetting drops the oldest), queries the last ``query_length``: column ``j``
        is outside query ``i``'s window when ``j - total <= i - query_length - window``."""
        j = torch.arange(total, device=self.device)
        i = torch.arange(query_length, device=self.device)
        outside = (j[None, :] - total) <= (i[:, None] - query_length - self.sliding_window)
        if mask is None:
            mask = torch.zeros(1, 1, query_length, total, device=self.device)
        return mask.masked_fill(outside, MASKED)

    # --- compression ----------------------------------------------------------------------------------------
    def _flush(self) -> None:
        excess = self.recent_keys.shape[-2] - self.codec.window
        if excess < self.flush_block:
            return
        # (positions are kept, and read by the keys' stream, only with a rope frame: empty otherwise)
        start = self.streams["keys"].length
        self.streams["keys"].append(self.recent_keys[:, :, :excess], self.recent_positions[:, :excess])
        self.recent_positions = self.recent_positions[:, excess:].clone()
        self.streams["values"].append(self.recent_values[:, :, :excess])
        if self.exact_rows is not None:
            self._keep_exact(start, excess)
        self.recent_keys = self.recent_keys[:, :, excess:].clone()
        self.recent_values = self.recent_values[:, :, excess:].clone()

    def _keep_exact(self, start: int, n: int) -> None:
        """Flag the ``n`` tokens just coded at history index ``start`` whose value vectors are short (secondary
        sinks) and keep their residuals: exact (still in ``recent``) minus what their codes decode to."""
        values = self.recent_values[:, :, :n]
        flags = values.float().norm(dim=-1) < self.sink_threshold[:, None]
        if not bool(flags.any()):
            return
        residual = {name: exact.float() - self.streams[name].decode(torch.float32, start, n)
                    for name, exact in (("keys", self.recent_keys[:, :, :n]), ("values", values))}
        self.exact_rows.add(flags, start, residual["keys"], residual["values"])

    def held_tokens(self) -> int:
        return self.sink_keys.shape[-2] + self.streams["keys"].length + self.recent_keys.shape[-2]

    def _forget_outside_window(self) -> None:
        """Drop tokens the coming queries cannot see (all but the last ``window - 1``), in amortized batches (not one
        copy per step). A padded batch's permuted sink block is dropped whole, so storage order stays tensor order
        for what remains."""
        excess = self.held_tokens() - (self.sliding_window - 1)
        if excess < max(self.flush_block, self.sliding_window // 4):
            return
        excess = min(excess, self.sink_keys.shape[-2] + self.streams["keys"].length)
        order = self._permuted()
        if order is not None and excess < order.shape[1]:
            return
        drop_sink = min(excess, self.sink_keys.shape[-2])
        if drop_sink:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, drop_sink:], self.sink_values[:, :, drop_sink:]
        drop = excess - drop_sink
        for stream in self.streams.values():
            stream.drop_front(drop)
        if self.exact_rows is not None:
            self.exact_rows.drop_front(drop)
        self.dropped += excess

    # --- housekeeping (beam search, crop, offload) ------------------------------------------------------------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        if self.exact_rows is not None:  # (before the tensors: it reads the batch size off them)
            self.exact_rows.map_batch(fn, self.sink_keys.shape[0])
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.recent_keys, self.recent_values = fn(self.recent_keys), fn(self.recent_values)
        self.recent_positions = fn(self.recent_positions)
        if self.order is not None:
            self.order = fn(self.order)
        for stream in self.streams.values():
            stream.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens. Every token is encoded on its own, so cutting the
        compressed history is exact: nothing is re-quantized."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if self.is_sliding and self.dropped:
            raise RuntimeError("this sliding-window layer already forgot tokens outside its window; it cannot be cropped")
        remove = min(remove, self.cumulative_length)
        if self.order is not None and self.cumulative_length - remove < self.order.shape[1]:
            raise RuntimeError("cropping into a padded batch's first tokens is not supported; fix: start a new cache")
        self.cumulative_length -= remove
        from_recent = min(remove, self.recent_keys.shape[-2])
        keep = self.recent_keys.shape[-2] - from_recent
        self.recent_keys, self.recent_values = self.recent_keys[:, :, :keep], self.recent_values[:, :, :keep]
        self.recent_positions = self.recent_positions[:, :keep]
        remove -= from_recent
        stored = self.streams["keys"].length
        from_stream = min(remove, stored)
        for stream in self.streams.values():
            stream.truncate(stored - from_stream)
        if self.exact_rows is not None:
            self.exact_rows.truncate(stored - from_stream)
        remove -= from_stream
        keep = self.sink_keys.shape[-2] - remove
        self.sink_keys, self.sink_values = self.sink_keys[:, :, :keep], self.sink_values[:, :, :keep]

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized and self.sink_keys.device != self.device:
            self._move(self.device)

    def _move(self, device) -> None:
        """Move exact tokens and compressed storage, keeping the storage's preallocated capacity."""
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = self.sink_keys.to(device), self.sink_values.to(device)
        self.recent_keys, self.recent_values = self.recent_keys.to(device), self.recent_values.to(device)
        self.recent_positions = self.recent_positions.to(device)
        for stream in self.streams.values():
            stream.to(device)
        if self.exact_rows is not None:
            self.exact_rows.to(device)

    def reset(self) -> None:
        self.is_initialized = False
        self.awaiting = False
        self.cumulative_length = 0
        self.dropped = 0
        self.order = None
        for attr in ("sink_keys", "sink_values", "recent_keys", "recent_values", "recent_positions", "streams",
                     "exact_rows"):
            self.__dict__.pop(attr, None)

    # --- bytes ----------------------------------------------------------------------------------------------
    def stream_nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0}
        exact = {"keys": (self.sink_keys, self.recent_keys, self.recent_positions),
                 "values": (self.sink_values, self.recent_values)}
        out = {name: sum(self.streams[name].nbytes().values()) + sum(t.nbytes for t in exact[name]) for name in exact}
        if self.exact_rows is not None:
            for name, n in self.exact_rows.stream_nbytes().items():
                out[name] += n
        return out

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part, read off the tensors."""
        out = {"codes": 0, "scales": 0, "full_precision": 0}
        if not self.is_initialized:
            return out
        for stream in self.streams.values():
            for part, n in stream.nbytes().items():
                out[part] = out.get(part, 0) + n
        for t in (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values):
            out["full_precision"] += t.nbytes
        if self.rope is not None:  # positions of the recent tokens, to be coded with them
            out["positions"] = out.get("positions", 0) + self.recent_positions.nbytes
        if self.exact_rows is not None:
            out["secondary_sinks"] = self.exact_rows.nbytes()
        return out

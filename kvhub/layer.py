"""``CompressedLayer``: one model layer's cache, holding keys and values compressed for real.

Token positions are laid out as ``[sink | compressed history | recent]``:

* the first ``sink`` tokens of the sequence stay in full precision (attention sinks are unlike every other token
  and a PCA basis reconstructs them badly, see docs/field.md);
* the most recent ``window`` tokens stay in full precision; once ``flush_block`` more have accumulated beyond the
  window they are compressed together, once, and never re-quantized;
* a sliding-window layer (Mistral, Gemma-2 local layers) compresses inside its window and forgets tokens that left
  it, returning exactly the tokens the stock ``DynamicSlidingWindowLayer`` would.

``update`` returns the full-length keys and values (reconstructed history + exact recent tokens), which any
attention implementation accepts. When the model runs :mod:`kvhub.attention` (``fast_path()`` is true), it
returns only the exact tokens, tagged with the layer, and attention reads the compressed history directly.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from collections.abc import Callable

from .bases import StreamBasis
from .codec import LayerCodec
from .stream import CompressedStream


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return b if a.shape[-2] == 0 else (a if b.shape[-2] == 0 else torch.cat([a, b], dim=-2))


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
    ) -> None:
        super().__init__()
        self.requested_exact_dtype = exact_dtype
        self.fast_path = fast_path
        self.visible = 0
        self.codec = codec
        self.bases = {"keys": key_basis, "values": value_basis}
        self.flush_block = flush_block
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0

    # --- transformers' layer protocol -----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        # Sink, recent tokens and 16-bit segments are kept at 16 bits (the model's own dtype when it is already
        # 16-bit): the reference is an fp16 cache, and an fp32 CPU model should not make them cost twice that.
        # ``exact_dtype=torch.float32`` keeps them bit-exact (used to prove the machinery lossless).
        self.exact_dtype = self.requested_exact_dtype or (self.dtype if self.dtype.itemsize <= 2 else torch.float16)
        empty = key_states[:, :, :0].to(self.exact_dtype)
        self.sink_keys, self.sink_values = empty.clone(), value_states[:, :, :0].to(self.exact_dtype)
        self.recent_keys, self.recent_values = empty.clone(), self.sink_values.clone()
        self.streams = {
            name: CompressedStream(self.codec.stream(name), self.bases[name], self.device, self.exact_dtype) for name in ("keys", "values")
        }
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        # The tokens of this call attend to themselves exactly; the past is what the cache holds.
        if self.fast_path is not None and not self.is_sliding and self.fast_path():
            # kvhub.attention reads the compressed history itself: return only the exact tokens, tagged.
            self.visible = self.streams["keys"].length
            keys = torch.cat([self.sink_keys.to(self.dtype), self.recent_keys.to(self.dtype), key_states], -2)
            values = torch.cat([self.sink_values.to(self.dtype), self.recent_values.to(self.dtype), value_states], -2)
            keys._kvhub_layer, keys._kvhub_sink = self, self.sink_keys.shape[-2]
        else:
            keys = torch.cat(
                [self.sink_keys.to(self.dtype), self._history("keys"), self.recent_keys.to(self.dtype), key_states], -2
            )
            values = torch.cat(
                [self.sink_values.to(self.dtype), self._history("values"), self.recent_values.to(self.dtype), value_states], -2
            )
        if self.is_sliding:
            visible = self.sliding_window - 1 + n
            keys, values = keys[:, :, -visible:], values[:, :, -visible:]

        key_states, value_states = key_states.to(self.exact_dtype), value_states.to(self.exact_dtype)
        take = max(0, min(self.codec.sink - self.cumulative_length, n))
        if take:
            self.sink_keys = _cat(self.sink_keys, key_states[:, :, :take])
            self.sink_values = _cat(self.sink_values, value_states[:, :, :take])
        self.cumulative_length += n
        self.recent_keys = _cat(self.recent_keys, key_states[:, :, take:])
        self.recent_values = _cat(self.recent_values, value_states[:, :, take:])
        self._flush()
        if self.is_sliding:
            self._forget_outside_window()
        return keys, values

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

    # --- compression ----------------------------------------------------------------------------------------
    def _history(self, name: str) -> torch.Tensor:
        stream = self.streams[name]
        if stream.length == 0:
            return self.sink_keys[:, :, :0].to(self.dtype)
        return stream.decode(self.dtype)

    def _flush(self) -> None:
        excess = self.recent_keys.shape[-2] - self.codec.window
        if excess < self.flush_block:
            return
        self.streams["keys"].append(self.recent_keys[:, :, :excess])
        self.streams["values"].append(self.recent_values[:, :, :excess])
        self.recent_keys = self.recent_keys[:, :, excess:].clone()
        self.recent_values = self.recent_values[:, :, excess:].clone()

    def held_tokens(self) -> int:
        return self.sink_keys.shape[-2] + self.streams["keys"].length + self.recent_keys.shape[-2]

    def _forget_outside_window(self) -> None:
        """Drop tokens no future query can see, in amortized batches (not one copy per step)."""
        excess = self.held_tokens() - (self.sliding_window - 1)
        if excess < max(self.flush_block, self.sliding_window // 4):
            return
        drop_sink = min(excess, self.sink_keys.shape[-2])
        if drop_sink:
            self.sink_keys, self.sink_values = self.sink_keys[:, :, drop_sink:], self.sink_values[:, :, drop_sink:]
        drop = min(excess - drop_sink, self.streams["keys"].length)
        for stream in self.streams.values():
            stream.drop_front(drop)

    # --- housekeeping (beam search, crop, offload) ------------------------------------------------------------
    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.recent_keys, self.recent_values = fn(self.recent_keys), fn(self.recent_values)
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
        if self.is_sliding and self.cumulative_length != self.held_tokens():
            raise RuntimeError("this sliding-window layer already forgot tokens outside its window; it cannot be cropped")
        remove = min(remove, self.cumulative_length)
        self.cumulative_length -= remove
        from_recent = min(remove, self.recent_keys.shape[-2])
        keep = self.recent_keys.shape[-2] - from_recent
        self.recent_keys, self.recent_values = self.recent_keys[:, :, :keep], self.recent_values[:, :, :keep]
        remove -= from_recent
        stored = self.streams["keys"].length
        from_stream = min(remove, stored)
        for stream in self.streams.values():
            stream.truncate(stored - from_stream)
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
        for stream in self.streams.values():
            stream.to(device)

    def reset(self) -> None:
        self.is_initialized = False
        self.cumulative_length = 0
        for attr in ("sink_keys", "sink_values", "recent_keys", "recent_values", "streams"):
            self.__dict__.pop(attr, None)

    # --- bytes ----------------------------------------------------------------------------------------------
    def stream_nbytes(self) -> dict[str, int]:
        if not self.is_initialized:
            return {"keys": 0, "values": 0}
        exact = {"keys": (self.sink_keys, self.recent_keys), "values": (self.sink_values, self.recent_values)}
        return {name: sum(self.streams[name].nbytes().values()) + sum(t.nbytes for t in exact[name]) for name in exact}

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by part, read off the tensors."""
        out = {"codes": 0, "scales": 0, "full_precision": 0}
        if not self.is_initialized:
            return out
        for stream in self.streams.values():
            for part, n in stream.nbytes().items():
                out[part] += n
        for t in (self.sink_keys, self.sink_values, self.recent_keys, self.recent_values):
            out["full_precision"] += t.nbytes
        return out

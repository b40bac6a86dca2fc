"""``CompressedCache``: a ``transformers.Cache`` whose attention layers store K and V compressed."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, get_layer_types_and_kwargs

from .attention import is_compressed_attention
from .bases import Bases
from .codec import CacheCodec, ModelShape
from .layer import CompressedLayer
from .rope import RotaryFrame
from .storage import Scratch
from .stream import derived_tensors

COMPRESSIBLE = ("full_attention", "sliding_attention")
FP16_BYTES = 2


def _prepared(bases: Bases, codec: CacheCodec, shape: ModelShape) -> Bases:
    """``bases`` checked against and cut to ``codec``, once per (bases, codec): every cache built from one preset
    shares the same tensors (and, through them, the same device copies, see :mod:`kvhub.stream`)."""
    memo = bases.__dict__.setdefault("_prepared", {})
    if (codec, shape) not in memo:
        memo[(codec, shape)] = bases.for_codec(codec, shape)
    return memo[(codec, shape)]


def shared_storages(bases: Bases) -> dict[int, int]:
    """``{storage pointer: bytes}`` of the bases and of what was derived from them once per device and codec
    (:mod:`kvhub.stream` keeps those on each basis): what every cache of a preset shares."""
    storages = {}
    for basis in bases.values():
        for t in (basis.mean, basis.basis, basis.variance, basis.norm_median, *derived_tensors(basis)):
            if t is None:  # (no median: the codec keeps no secondary sinks)
                continue
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return storages


def walked_nbytes(cache: Cache, exclude: set[int]) -> int:
    """Bytes of every distinct tensor storage reachable from ``cache`` by walking its attributes (dicts, lists,
    tuples and kvhub objects), storages in ``exclude`` left out: an allocation count that shares nothing with the
    buffers' own bookkeeping (:meth:`CompressedCache.reserved_nbytes`), for tests and benchmarks."""
    seen, visited, total, stack = set(), set(), 0, [cache.__dict__]
    while stack:
        obj = stack.pop()
        if id(obj) in visited:  # objects refer to each other (a layer to its cache's scratch, bases to memos)
            continue
        visited.add(id(obj))
        for v in obj.values() if isinstance(obj, dict) else obj:
            if isinstance(v, torch.Tensor):
                ptr = v.untyped_storage().data_ptr()
                if ptr not in seen and ptr not in exclude:
                    seen.add(ptr)
                    total += v.untyped_storage().nbytes()
            elif isinstance(v, (dict, list, tuple)):
                stack.append(v)
            elif hasattr(v, "__dict__") and type(v).__module__.startswith(("kvhub", "transformers.cache_utils")):
                stack.append(v.__dict__)
    return total


class CompressedCache(Cache):
    """Drop-in cache for ``model.generate(..., cache=cache)`` / ``past_key_values=cache`` or a forward loop.

    ``exact_dtype`` is the dtype of sink/recent tokens and 16-bit segments: 16-bit by default (the model's dtype if
    it is 16-bit, else fp16); ``torch.float32`` makes a full-rank 16-bit codec lossless, to test the machinery.
    Layers whose type kvhub cannot compress (or whose codec says ``compressed=False``) get the stock transformers
    layer; :attr:`compressed_layers` lists the others. Bytes are read off the held tensors by :meth:`nbytes`.
    """

    def __init__(
        self, config: Any, codec: CacheCodec, bases: Bases | None = None, exact_dtype: torch.dtype | None = None
    ) -> None:
        text_config = config.get_text_config(decoder=True)
        self._attn_config = text_config
        self.shape = ModelShape.from_config(text_config)
        codec.check(self.shape)
        rope = RotaryFrame.from_config(text_config) if codec.keys_before_rope else None
        self.codec = codec
        self.bases = _prepared(bases if bases is not None else Bases(), codec, self.shape)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        self.scratch = Scratch()  # the PyTorch decode path's temporaries, shared by the layers (one at a time)
        self._exact_dtype, self._range_checked = exact_dtype, False
        layers = []
        for i, (layer_type, kwargs) in enumerate(zip(layer_types, layer_kwargs)):
            layer_codec = codec.layers[i]
            if layer_codec.compressed and layer_type in COMPRESSIBLE:
                layers.append(
                    CompressedLayer(
                        layer_codec,
                        self.bases.get((i, "keys")),
                        self.bases.get((i, "values")),
                        codec.flush_block,
                        sliding_window=kwargs.get("sliding_window"),
                        exact_dtype=exact_dtype,
                        fast_path=self._uses_compressed_attention,
                        scratch=self.scratch,
                        on_rebuild=self._warn_rebuild,
                        rope=rope,
                        secondary_sinks=codec.secondary_sinks,
                    )
                )
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        super().__init__(layers=layers)

    def _uses_compressed_attention(self) -> bool:
        """Whether the model reads this cache through kvhub.attention (checked per call: the config is shared)."""
        return is_compressed_attention(self._attn_config._attn_implementation)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not self._range_checked:  # the model's dtype is known now: bases it would overflow are refused
            self.bases.check_dtype(self.codec, key_states.dtype, self._exact_dtype)
            self._range_checked = True
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _warn_rebuild(self) -> None:
        """Once per model: decoding outside ``compressed_attention`` rebuilds K and V from the codes at every step,
        several times slower than decoding on them; the warning gives the one line that fixes it."""
        if not self._attn_config.__dict__.get("_kvhub_rebuild_warned"):
            self._attn_config.__dict__["_kvhub_rebuild_warned"] = True
            warnings.warn("kvhub: this model's attention is not kvhub's, so the compressed cache rebuilds K and V at "
                          "every step (same results, several times slower); fix: run generate inside "
                          "`with kvhub.compressed_attention(model):`", RuntimeWarning, stacklevel=4)

    @property
    def compressed_layers(self) -> list[int]:
        """Indices of the layers that store K/V compressed (the rest use the stock layer)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def nbytes(self) -> dict[str, int]:
        """Bytes the cache holds, by part: ``codes``, ``scales``, ``full_precision`` (sink and recent tokens, and
        the stock layers' tensors), ``positions`` (keys coded before RoPE: each stored token's position),
        ``secondary_sinks`` (the exact rows of :mod:`kvhub.secondary_sinks`, when the codec keeps them) and
        ``total``. Shared per-model bases are not included: see :meth:`bases_nbytes`."""
        out = {"codes": 0, "scales": 0, "full_precision": 0}
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                for part, n in layer.nbytes().items():
                    out[part] = out.get(part, 0) + n
            elif getattr(layer, "is_initialized", False):
                out["full_precision"] += layer.keys.nbytes + layer.values.nbytes
        out["total"] = sum(out.values())
        return out

    def stream_nbytes(self) -> dict[str, int]:
        """Bytes held for keys and for values separately (codes, scales and exact tokens of each)."""
        out = {"keys": 0, "values": 0}
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                for name, n in layer.stream_nbytes().items():
                    out[name] += n
            elif getattr(layer, "is_initialized", False):
                out["keys"] += layer.keys.nbytes
                out["values"] += layer.values.nbytes
        return out

    def bases_nbytes(self) -> int:
        """Bytes of the per-model bases, shared by every sequence and every cache built from the same preset: the
        bases themselves and what was derived from them once per device (see :func:`kvhub.stream._device_basis`)."""
        return sum(shared_storages(self.bases).values())

    def fp16_nbytes(self) -> int:
        """Bytes an fp16 K+V cache would need for the tokens each layer holds."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                if layer.is_initialized:
                    batch = layer.sink_keys.shape[0]
                    total += layer.held_tokens() * batch * self.shape.num_kv_heads * self.shape.head_dim
            elif getattr(layer, "is_initialized", False):
                total += layer.keys.numel()
        return total * 2 * FP16_BYTES

    def compression_ratio(self) -> float:
        """fp16 K+V bytes of the same tokens divided by the bytes held."""
        held = self.nbytes()["total"]
        return self.fp16_nbytes() / held if held else 1.0

    def reserved_nbytes(self) -> int:
        """Bytes allocated, including the growth headroom of the preallocated buffers and the decode scratch."""
        total = self.scratch.nbytes()
        for layer in self.layers:
            if isinstance(layer, CompressedLayer) and layer.is_initialized:
                total += (sum(s.reserved_nbytes() for s in layer.streams.values()) + layer.nbytes()["full_precision"]
                          + layer.recent_positions.nbytes)
                if layer.exact_rows is not None:
                    total += layer.exact_rows.reserved_nbytes()
            elif getattr(layer, "is_initialized", False):
                total += layer.keys.nbytes + layer.values.nbytes
        return total

    def describe(self) -> str:
        n = self.nbytes()
        return (
            f"CompressedCache: {len(self.compressed_layers)}/{len(self.layers)} layers compressed, "
            f"{n['total'] / 1e6:.2f} MB held (codes {n['codes'] / 1e6:.2f}, scales {n['scales'] / 1e6:.2f}, "
            f"full precision {n['full_precision'] / 1e6:.2f}), {self.compression_ratio():.2f}x vs fp16"
        )

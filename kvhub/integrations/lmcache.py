"""A kvhub preset as the codec of LMCache: registers the serde type ``kvhub`` (needs the ``lmcache`` extra).

LMCache's v1 storage path runs a *serde* around every L2 adapter (local disk, remote stores): it serializes each KV
chunk before it leaves L1 memory and deserializes it on prefetch. Importing this module registers ``kvhub``, so an
adapter configured with ::

    {"type": "fs", "base_path": "/cache",
     "serde": {"type": "kvhub", "preset": "HuggingFaceTB/SmolLM2-135M-Instruct", "form": "storage"}}

stores every chunk with the preset's calibrated codec (:mod:`kvhub.integrations.chunks`). Serde options:

* ``preset`` (required): a preset folder, Hub repo id or model name, as :meth:`KVPreset.from_pretrained` takes;
  ``revision`` optionally pins it;
* ``form``: ``"attention"`` (default) stores chunks in the form the cache attends to (per layer and head, per-token
  scales, about 4x smaller than fp16); ``"storage"`` in the preset's storage codec (cross-layer transform, fixed
  bits, no scales: 10x and more, :mod:`kvhub.storage_codec`), for chunks at rest that are only decoded on prefetch.
  docs/lmcache.md says which to pick. A chunk carries no token positions and no room for extra exact rows, so the
  attention form refuses presets that code keys before RoPE or keep secondary sinks (the bundled SmolLM2 preset
  does both: store its chunks in the storage form);
* ``budget`` (storage form only; default: the smallest): which of the storage codec's budgets, e.g. ``"10x"``;
* ``device`` (storage form only; default: where the chunk is, LMCache's CPU memory): ``"cuda"`` runs the storage
  codec's transform on a GPU, as LMCache's turboquant serde stages its chunks;
* ``exact`` (attention form only; default: the preset's sink count): the first tokens of every chunk kept at 16
  bits, since a chunk carries no position to tell whether it holds the attention sinks (the storage codec fixes its
  own count when it is fitted);
* ``tp_size`` / ``tp_rank``: the tensor-parallel layout, when the object key's ``kv_rank`` does not say it (a
  pipeline-parallel engine packs both into one world size: set them explicitly);
* ``max_workers``: threads of LMCache's serde pool;
* ``model`` (default: the preset's base model id): the model name the engine's chunk keys carry, when it serves the
  preset's model under another name (a local path, ``--served-model-name``). A chunk keyed with any other model is
  refused, even when its shapes match the preset's: another model's K/V would decode to plausible garbage.

A chunk written with another preset, a truncated buffer or a chunk of another shape raises a typed
:class:`~kvhub.errors.ChunkError`; LMCache then reports the load as failed and recomputes, never reading garbage.
"""

from __future__ import annotations

from typing import Any

from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde import (
    AsyncSerdeProcessor,
    Deserializer,
    SerdeProcessor,
    Serializer,
    get_registered_serde_types,
    register_serde_factory,
)
from lmcache.v1.memory_management import MemoryObj

from ..errors import ChunkPresetMismatchError, ChunkShapeError, CodecError
from ..preset import KVPreset
from .chunks import ChunkCodec, HeadSlice
from .storage_chunks import StorageChunkCodec

SERDE_TYPE = "kvhub"
_OPTIONS = {"preset", "revision", "form", "budget", "device", "exact", "tp_size", "tp_rank", "max_workers", "model"}
_FORMS = ("attention", "storage")


def _world_from_kv_rank(kv_rank: int) -> tuple[int, int]:
    """``(rank, world)`` packed by ``ObjectKey.ComputeKVRank`` (world size in bits 24-31, global rank in 16-23);
    a bare ``kv_rank`` of 0 means a single rank."""
    world = (kv_rank >> 24) & 0xFF
    return ((kv_rank >> 16) & 0xFF, world) if world else (0, 1)


class _KVHubSerde:
    """What the serializer and the deserializer share: the chunk codec, the model its keys must name, and where a
    key's heads are."""

    def __init__(self, codec: ChunkCodec | StorageChunkCodec, tp_size: int | None, tp_rank: int | None, model: str) -> None:
        self.codec = codec
        self.tp = None if tp_size is None else (tp_rank or 0, tp_size)
        self.model = model

    def heads(self, key: ObjectKey, local_dim: int) -> HeadSlice:
        """The key's head slice, once the key is known to be the preset's model's."""
        if key.model_name.lower() != self.model.lower():
            raise ChunkPresetMismatchError(
                f"a chunk of model '{key.model_name}', but the kvhub serde's preset is for '{self.model}'; fix: "
                f"configure the preset made for '{key.model_name}', or, if that is this model served under another "
                f"name, set the serde option \"model\": \"{key.model_name}\"")
        rank, world = self.tp or _world_from_kv_rank(key.kv_rank)
        return HeadSlice.for_rank(self.codec.shape.num_kv_heads, self._local_heads(local_dim), rank, world)

    def _local_heads(self, local_dim: int) -> int:
        d = self.codec.shape.head_dim
        if local_dim % d:
            raise ChunkShapeError(f"the chunk's last dim {local_dim} is not a multiple of the preset's head_dim {d}; "
                                  "fix: use the preset made for this model")
        return local_dim // d


def _tensor(obj: MemoryObj, what: str):
    if obj.tensor is None:
        raise ChunkShapeError(f"the {what} memory object has no tensor; fix: use a CPU/L1 memory object")
    return obj.tensor


class KVHubSerializer(_KVHubSerde, Serializer):
    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> int:
        chunk = _tensor(src, "source")
        return self.codec.encode(chunk, _tensor(dst, "destination"), self.heads(key, chunk.shape[-1]))

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        """The exact encoded size: a function of the chunk's shape and dtype and of the serde config only (the
        ``fs`` adapter refuses a file shorter than this)."""
        if len(layout_desc.shapes) != 1:
            raise ChunkShapeError(f"the kvhub serde encodes one KV tensor per object, got {len(layout_desc.shapes)}; "
                                  "fix: use it on attention KV object groups only")
        shape, dtype = layout_desc.shapes[0], layout_desc.dtypes[0]
        local = self._local_heads(int(shape[-1]))
        return self.codec.nbytes(shape, dtype, HeadSlice(0, local))


class KVHubDeserializer(_KVHubSerde, Deserializer):
    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey) -> None:
        out = _tensor(dst, "destination")
        self.codec.decode(_tensor(src, "source"), out, self.heads(key, out.shape[-1]))


def _int_option(kwargs: dict[str, Any], name: str) -> int | None:
    value = kwargs.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CodecError(f"kvhub serde option '{name}' must be a non-negative integer, got {value!r}")
    return value


def _attention_codec(preset: KVPreset, exact: int | None) -> ChunkCodec:
    """The attention form's codec. A preset whose codes a chunk cannot hold (keys before RoPE, secondary sinks) but
    which carries a storage codec (it codes any K/V as the engine hands it over, whatever the attention codec) gets
    the chunk codec's refusal with the storage form named as the fix; other errors pass unchanged."""
    unchunkable = preset.codec.keys_before_rope or preset.codec.secondary_sinks
    try:
        return ChunkCodec(preset, exact)
    except CodecError as e:
        if not unchunkable or preset.storage is None:
            raise
        raise CodecError(f"{e}, or store this preset's chunks in its storage form (serde option \"form\": "
                         "\"storage\")") from None


def create_serde(kwargs: dict[str, Any]) -> SerdeProcessor:
    """LMCache's factory for ``{"type": "kvhub", ...}``: validates the options and loads the preset once."""
    unknown = sorted(set(kwargs) - _OPTIONS)
    if unknown:
        raise CodecError(f"unknown kvhub serde option(s) {unknown}; fix: use only {sorted(_OPTIONS)}")
    if not isinstance(kwargs.get("preset"), str) or not kwargs["preset"]:
        raise CodecError("the kvhub serde needs 'preset': a preset folder, Hub repo id or model name")
    tp_size, tp_rank = _int_option(kwargs, "tp_size"), _int_option(kwargs, "tp_rank")
    if tp_size == 0 or (tp_rank is not None and tp_size is None):
        raise CodecError("kvhub serde: tp_size must be >= 1 and given whenever tp_rank is")
    model = kwargs.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise CodecError(f"kvhub serde option 'model' must be a model name, got {model!r}")
    form = kwargs.get("form", "attention")
    if form not in _FORMS:
        raise CodecError(f"kvhub serde option 'form' is {form!r}; fix: use one of {list(_FORMS)}")
    if form == "storage" and "exact" in kwargs:
        raise CodecError("kvhub serde: 'exact' is fixed by the storage codec when it is fitted; fix: drop it, or use "
                         "\"form\": \"attention\"")
    for option in ("budget", "device"):
        if form == "attention" and option in kwargs:
            raise CodecError(f"kvhub serde: '{option}' is an option of the storage form; fix: add \"form\": \"storage\" "
                             "or drop it")
    preset = KVPreset.from_pretrained(kwargs["preset"], revision=kwargs.get("revision"))
    if form == "storage":
        codec = StorageChunkCodec(preset, kwargs.get("budget"), kwargs.get("device"))
    else:
        codec = _attention_codec(preset, _int_option(kwargs, "exact"))
    model = model or preset.base_model["id"]
    return AsyncSerdeProcessor(
        KVHubSerializer(codec, tp_size, tp_rank, model),
        KVHubDeserializer(codec, tp_size, tp_rank, model),
        max_workers=_int_option(kwargs, "max_workers") or 1,
    )


def register() -> None:
    """Register the ``kvhub`` serde type with LMCache (idempotent; importing this module does it)."""
    if SERDE_TYPE not in get_registered_serde_types():
        register_serde_factory(SERDE_TYPE, create_serde)


register()

__all__ = ["SERDE_TYPE", "KVHubSerializer", "KVHubDeserializer", "create_serde", "register"]

"""KV chunks as bytes, encoded with a preset's codec: the format kvhub's distributed-cache integrations write.

A distributed KV store (LMCache) moves *chunks*: every layer's keys and values for a run of tokens, laid out
``[2, num_layers, tokens, heads * head_dim]`` in the model dtype, with a content hash but no token position. A chunk
is encoded here with the same quantizers and bases as :class:`~kvhub.cache.CompressedCache`
(:class:`~kvhub.stream.CompressedStream`), so its size follows from its shape and the preset alone, as a store that
allocates buffers before it sees the data requires.

Sink tokens without positions: a chunk cannot know whether it holds position 0 (its key is a content hash), so every
chunk keeps its first ``exact`` tokens at 16 bits in every layer: the attention sinks when the chunk starts the
sequence, a small fixed cost otherwise. Picking instead the tokens the codec reconstructs worst does not find the
sinks (their error is not the largest; their weight in attention is), and keeping none costs quality:
``benchmarks/lmcache_reuse.py`` measures 0, 1 and the preset's sink count. The indices are stored, so a future rule
needs no new format.

Tensor parallelism: a rank holds a contiguous slice of the KV heads (:class:`HeadSlice`) and encodes it with that
slice of every basis; the slice is written into the header and checked on decode.

Layout (little endian): a 64-byte header (magic, format version, sha256 of the preset's config, layers, tokens,
local heads, head_dim, first head, exact tokens, dtype, CRC-32) then, per layer, the exact tokens' indices (int16) and
vectors, then for keys and values each segment's packed codes and the per-token scales.

A chunk read back from a shared store is not trusted: LMCache reuses it for other users' prompts, and a wrong chunk
would feed the model wrong KV where a refused one is only recomputed. So decoding checks, before writing anything,
that the header agrees with this serde (preset, shape, head slice, dtype, exact-token count), that the buffer is
exactly the size they imply (no trailing bytes), and the CRC-32 of the whole chunk (``zlib.crc32``, in the standard
library: 0.35 ms for a 1.4 MB SmolLM2 chunk of 256 tokens, against 60 ms to encode and 41 ms to decode it on one
core); exact-token indices must be increasing and in range, and the decoded values finite (0.6 ms more). Any mismatch is a typed :class:`~kvhub.errors.ChunkError`. The CRC catches corruption, not a forger: a store
that can write chunks can also write well-formed wrong KV, so stores must be writable only by trusted engines.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from ..bases import StreamBasis
from ..codec import STREAMS, CacheCodec, StreamCodec
from ..errors import (
    ChunkChecksumError,
    ChunkFormatError,
    ChunkPresetMismatchError,
    ChunkShapeError,
    ChunkTruncatedError,
    CodecError,
)
from ..quantizers import QUANTIZERS, SCALE_FORMATS
from ..stream import CompressedStream

MAGIC = b"KVHC"
FORMAT_VERSION = 2  # 2: CRC-32 in the header, exact size, header checked against the serde
HEADER_BYTES = 64
# magic, version, header size, digest, L, T, H, d, head0, exact, dtype, CRC-32 of the chunk with this field zeroed
_HEADER = struct.Struct("<4sHH32sHIHHHHBI")
_CRC = slice(_HEADER.size - 4, _HEADER.size)
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_MAX_EXACT = 2**15 - 1  # exact-token indices are stored as int16


def preset_digest(config: dict[str, Any]) -> bytes:
    """sha256 of the preset's config in canonical JSON. The config lists its bases file's sha256, so the digest also
    pins the bases: a chunk is decoded only by the preset that encoded it. A quantizer whose codes mean what a
    packaged file says (vector codes: the codebook) adds that file's digest, so a chunk written under another
    codebook of the same name is refused, not decoded wrongly; presets of scalar codes keep the config's digest."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    codec = CacheCodec.from_dict(config["codec"])
    names = sorted({name for layer in codec.layers for stream in (layer.keys, layer.values) for name in stream.quantizers})
    for name in names:
        digest.update(QUANTIZERS[name].fingerprint())
    return digest.digest()


def store_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exact tokens and 16-bit segments keep the model dtype when it is 16-bit, else fp16 (as the cache does)."""
    return dtype if dtype.itemsize == 2 else torch.float16


@dataclass(frozen=True)
class HeadSlice:
    """The KV heads ``[start, start + count)`` of the preset that one tensor-parallel rank holds."""

    start: int
    count: int

    @classmethod
    def for_rank(cls, total: int, local: int, rank: int, world: int) -> "HeadSlice":
        """Heads of ``rank`` among ``world`` ranks holding ``local`` heads each: a contiguous share when the heads
        divide evenly, or one replicated head per ``world // total`` ranks when there are more ranks than heads
        (vLLM's layout for GQA models)."""
        if not 0 <= rank < max(world, 1):
            raise ChunkShapeError(f"tensor-parallel rank {rank} is outside a world of {world}; fix: pass tp_rank < tp_size")
        world = max(world, 1)
        if local * world == total:
            return cls(rank * local, local)
        if local == 1 and world > total and world % total == 0:
            return cls(rank // (world // total), 1)
        raise ChunkShapeError(
            f"a chunk with {local} KV heads per rank does not fit {total} heads over {world} tensor-parallel ranks; "
            "fix: set tp_size/tp_rank in the serde config to the engine's tensor-parallel layout"
        )


@dataclass(frozen=True)
class ChunkHeader:
    digest: bytes
    layers: int
    tokens: int
    heads: int
    head_dim: int
    head_start: int
    exact: int
    dtype: torch.dtype

    def pack(self, magic: bytes = MAGIC, version: int = FORMAT_VERSION) -> bytes:
        raw = _HEADER.pack(magic, version, HEADER_BYTES, self.digest, self.layers, self.tokens, self.heads,
                           self.head_dim, self.head_start, self.exact, _DTYPE_CODES[self.dtype], 0)
        return raw + bytes(HEADER_BYTES - len(raw))

    @classmethod
    def unpack(cls, buf: bytes, magic: bytes = MAGIC, version: int = FORMAT_VERSION) -> "ChunkHeader":
        if len(buf) < HEADER_BYTES:
            raise ChunkTruncatedError(f"a kvhub chunk needs a {HEADER_BYTES}-byte header, got {len(buf)} bytes; "
                                      "fix: the stored object is truncated: drop it and recompute the KV")
        got_magic, got_version, size, digest, layers, tokens, heads, head_dim, head0, exact, dtype, _ = _HEADER.unpack_from(buf)
        if got_magic != magic:
            raise ChunkFormatError(f"not a kvhub chunk of this form (magic {got_magic!r}, want {magic!r}); fix: decode "
                                   "it with the serde (and form) that wrote it")
        if got_version != version or size != HEADER_BYTES:
            raise ChunkFormatError(f"kvhub chunk format version {got_version} is not {version}; fix: decode it with "
                                   "the kvhub version that wrote it, or recompute the KV")
        if dtype not in _CODE_DTYPES:
            raise ChunkFormatError(f"kvhub chunk header names unknown dtype code {dtype}; fix: the object is corrupted")
        return cls(digest, layers, tokens, heads, head_dim, head0, exact, _CODE_DTYPES[dtype])


def _checksum(chunk: torch.Tensor) -> int:
    """CRC-32 of the flat uint8 ``chunk``, its header's CRC field read as zero."""
    data = chunk.cpu().numpy()
    head = bytearray(data[:HEADER_BYTES].tobytes())
    head[_CRC] = bytes(_CRC.stop - _CRC.start)
    return zlib.crc32(data[HEADER_BYTES:], zlib.crc32(head))


def check_chunk_shape(shape: torch.Size | tuple[int, ...], model: Any, heads: HeadSlice) -> tuple[int, int]:
    """``(layers, tokens)`` of a ``[2, L, T, H*d]`` chunk of the model ``model`` (a ModelShape), or :class:`ChunkShapeError`."""
    shape = tuple(int(s) for s in shape)
    d = model.head_dim
    if len(shape) != 4 or shape[0] != 2:
        raise ChunkShapeError(f"a KV chunk is [2, layers, tokens, heads*head_dim], got {list(shape)}; "
                              "fix: pass LMCache's KV_2LTD layout")
    if shape[1] != model.num_layers:
        raise ChunkShapeError(f"the chunk has {shape[1]} layers but the preset {model.num_layers}; "
                              "fix: use the preset made for this model (pipeline-parallel slices are not supported)")
    if shape[3] != heads.count * d:
        raise ChunkShapeError(f"the chunk's last dim is {shape[3]}, not {heads.count} heads x head_dim {d}; "
                              "fix: use the preset made for this model and the engine's tensor-parallel layout")
    if heads.start + heads.count > model.num_kv_heads:
        raise ChunkShapeError(f"heads {heads.start}..{heads.start + heads.count - 1} exceed the preset's "
                              f"{model.num_kv_heads} KV heads; fix: set tp_size/tp_rank to the engine's layout")
    return shape[1], shape[2]


def write_checksum(out: torch.Tensor) -> None:
    """Fill the CRC-32 field of the chunk ``out`` (flat uint8, header written)."""
    crc = struct.pack("<I", _checksum(out))
    out[_CRC].copy_(torch.frombuffer(bytearray(crc), dtype=torch.uint8))


def check_chunk(buf: torch.Tensor, digest: bytes, want: tuple, exact: int, nbytes, magic: bytes = MAGIC,
                version: int = FORMAT_VERSION) -> ChunkHeader:
    """The header of the flat uint8 chunk ``buf``, once it is known to be this serde's: written with ``digest``,
    holding ``want`` (layers, tokens, heads, head_dim, first head, dtype) and ``exact`` exact tokens, exactly
    ``nbytes()`` long and with a matching CRC-32; else a typed :class:`~kvhub.errors.ChunkError`."""
    header = ChunkHeader.unpack(buf[:HEADER_BYTES].cpu().numpy().tobytes(), magic, version)
    if header.digest != digest:
        raise ChunkPresetMismatchError(
            f"the chunk was encoded with another preset or form (sha256 {header.digest.hex()[:12]}..., this serde's "
            f"is {digest.hex()[:12]}...); fix: configure the serde with the preset and form that wrote the cache, or clear it")
    got = (header.layers, header.tokens, header.heads, header.head_dim, header.head_start, header.dtype)
    if want != got:
        raise ChunkShapeError(
            f"the chunk holds layers/tokens/heads/head_dim/first head/dtype {got}, the destination wants {want}; "
            "fix: read it with the layout, dtype and tensor-parallel rank that wrote it")
    if header.exact != exact:
        raise ChunkFormatError(f"the header keeps {header.exact} exact tokens, this serde writes {exact}; fix: set "
                               "the serde's 'exact' to the one that wrote the cache, or drop the object and recompute the KV")
    total = nbytes()
    if buf.numel() < total:
        raise ChunkTruncatedError(f"the chunk needs {total} bytes but the buffer holds {buf.numel()}; "
                                  "fix: the stored object is truncated: drop it and recompute the KV")
    if buf.numel() > total:
        raise ChunkFormatError(f"the buffer holds {buf.numel()} bytes, {buf.numel() - total} more than the chunk's "
                               f"{total}; fix: the stored object is corrupted: drop it and recompute the KV")
    if _checksum(buf) != struct.unpack("<I", buf[_CRC].cpu().numpy().tobytes())[0]:
        raise ChunkChecksumError("the chunk's CRC-32 does not match its bytes; fix: the stored object is corrupted "
                                 "or was altered: drop it and recompute the KV")
    return header


def check_finite(out: torch.Tensor) -> None:
    if not out.abs().amax().isfinite():  # amax keeps NaN; ~10x faster than isfinite(out).all() on CPU
        raise ChunkFormatError("the chunk decodes to NaN or inf; fix: the stored object is corrupted: drop it and "
                               "recompute the KV")


def _segment_bytes(size: int, bits: int) -> int:
    return size * bits // 8 if bits < 16 else size


def _scaled(stream: StreamCodec) -> int:
    """Per-token scales a stream stores per token and head: one per quantized segment (none for static scales)."""
    return sum(1 for s in stream.kept if s.bits < 16) if stream.scale != "channel" else 0


def _stream_parts(stream: StreamCodec, heads: int, n: int, exact_dtype: torch.dtype):
    """``(shape, dtype)`` of each tensor a stream of ``n`` tokens stores: codes per kept segment, then scales."""
    parts = []
    for seg in stream.kept:
        if seg.bits == 16:
            parts.append(((heads, n, seg.size), exact_dtype))
        else:
            parts.append(((heads, n, _segment_bytes(seg.size, seg.bits)), torch.uint8))
    if _scaled(stream):
        parts.append(((heads, n, _scaled(stream)), SCALE_FORMATS[stream.scale_format].dtype))
    return parts


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class ChunkCodec:
    """Encodes and decodes chunks with one preset; the first ``exact`` tokens of each chunk are kept at 16 bits
    (default: the preset's sink count, see the module docstring)."""

    def __init__(self, preset: Any, exact: int | None = None) -> None:
        if preset.codec.keys_before_rope:
            raise CodecError("this preset codes keys before RoPE, and a chunk does not carry its tokens' positions; "
                             "fix: store chunks with a preset whose keys are coded after RoPE (tuned without "
                             "--keys-before-rope)")
        if preset.codec.secondary_sinks:
            raise CodecError("this preset keeps secondary sinks exact beside their codes, and a chunk's layout has no "
                             "room for those rows; fix: store chunks with a preset tuned without --secondary-sinks")
        self.codec = preset.codec
        self.shape = preset.shape
        self.bases = preset.bases
        self.digest = preset_digest(preset.config)
        self.exact = max(layer.sink for layer in self.codec.layers) if exact is None else int(exact)
        if not 0 <= self.exact <= _MAX_EXACT:
            raise CodecError(f"exact={self.exact} must be between 0 and {_MAX_EXACT}; fix: pass a token count "
                             "(0 keeps none exact)")
        self._sliced: dict[tuple[int, str, HeadSlice], StreamBasis] = {}

    # --- sizes ------------------------------------------------------------------------------------------------
    def _check_shape(self, shape: torch.Size | tuple[int, ...], heads: HeadSlice) -> tuple[int, int]:
        return check_chunk_shape(shape, self.shape, heads)

    def _layer_parts(self, i: int, heads: int, tokens: int, exact: int, dtype: torch.dtype):
        layer = self.codec.layers[i]
        d, sd = self.shape.head_dim, store_dtype(dtype)
        if not layer.compressed:
            return [((heads, tokens, d), sd)] * 2
        e = min(exact, tokens)
        parts = [((e,), torch.int16), ((heads, e, d), sd), ((heads, e, d), sd)] if e else []
        for name in STREAMS:
            parts += _stream_parts(layer.stream(name), heads, tokens - e, sd)
        return parts

    def nbytes(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, heads: HeadSlice) -> int:
        """Exact size of the encoded chunk: a function of the shape, dtype, head slice and this codec only."""
        layers, tokens = self._check_shape(shape, heads)
        return HEADER_BYTES + sum(_nbytes(s, t) for i in range(layers)
                                  for s, t in self._layer_parts(i, heads.count, tokens, self.exact, dtype))

    # --- encoding ---------------------------------------------------------------------------------------------
    def _basis(self, i: int, name: str, heads: HeadSlice) -> StreamBasis | None:
        full = self.bases.get((i, name))
        if full is None:
            return None
        key = (i, name, heads)
        if key not in self._sliced:
            s = slice(heads.start, heads.start + heads.count)
            self._sliced[key] = StreamBasis(full.mean[s], full.basis[s], full.variance[s])
        return self._sliced[key]

    def _stream(self, i: int, name: str, heads: HeadSlice, device, dtype: torch.dtype) -> CompressedStream:
        return CompressedStream(self.codec.layers[i].stream(name), self._basis(i, name, heads), device, store_dtype(dtype))

    def encode(self, chunk: torch.Tensor, out: torch.Tensor, heads: HeadSlice) -> int:
        """Write ``chunk`` [2, L, T, H*d] into the flat uint8 ``out``; return the bytes written."""
        layers, tokens = self._check_shape(chunk.shape, heads)
        if chunk.dtype not in _DTYPE_CODES:
            raise ChunkShapeError(f"chunk dtype {chunk.dtype} is not fp16, bf16 or fp32; fix: store the model's KV dtype")
        total = self.nbytes(chunk.shape, chunk.dtype, heads)
        if out.numel() < total:
            raise ChunkTruncatedError(f"the output buffer holds {out.numel()} bytes, the chunk needs {total}; "
                                      "fix: size it with estimate_serialized_size")
        out = out.view(-1)
        out[:HEADER_BYTES].copy_(torch.frombuffer(bytearray(self._header(layers, tokens, heads, chunk.dtype).pack()), dtype=torch.uint8))
        offset = HEADER_BYTES
        sd = store_dtype(chunk.dtype)

        def put(t: torch.Tensor) -> None:
            nonlocal offset
            b = t.contiguous().view(torch.uint8).view(-1)
            out[offset : offset + b.numel()].copy_(b)
            offset += b.numel()

        d = self.shape.head_dim
        for i in range(layers):
            x = {n: chunk[s, i].reshape(tokens, heads.count, d).permute(1, 0, 2).unsqueeze(0) for s, n in enumerate(STREAMS)}
            if not self.codec.layers[i].compressed:
                for n in STREAMS:
                    put(x[n][0].to(sd))
                continue
            streams = {n: self._stream(i, n, heads, chunk.device, chunk.dtype) for n in STREAMS}
            for n in STREAMS:
                streams[n].append(x[n])
            idx = torch.arange(min(self.exact, tokens))
            keep = torch.ones(tokens, dtype=torch.bool)
            keep[idx] = False
            if idx.numel():
                put(idx.to(torch.int16))
                for n in STREAMS:
                    put(x[n][0][:, idx.to(chunk.device)].to(sd))
            keep = keep.to(chunk.device)
            for n in STREAMS:
                stream = streams[n]
                for store in stream.codes:
                    put(store.view()[0][:, keep])
                if _scaled(stream.codec):
                    put(stream.scales.view()[0][:, keep])
        assert offset == total, (offset, total)  # the layout in _layer_parts and the writes above must agree
        write_checksum(out[:total])
        return total

    def _header(self, layers: int, tokens: int, heads: HeadSlice, dtype: torch.dtype) -> ChunkHeader:
        return ChunkHeader(self.digest, layers, tokens, heads.count, self.shape.head_dim, heads.start,
                           min(self.exact, tokens), dtype)

    # --- decoding ---------------------------------------------------------------------------------------------
    def decode(self, buf: torch.Tensor, out: torch.Tensor, heads: HeadSlice) -> None:
        """Decode the flat uint8 ``buf`` into ``out`` [2, L, T, H*d], of the dtype the chunk was encoded from.
        Refuses, with a typed :class:`~kvhub.errors.ChunkError` and before writing anything, a buffer from another
        preset, of another shape, dtype, head slice or exact-token count than this serde writes, a truncated or
        over-long one, or one whose CRC-32 fails (see the module docstring)."""
        buf = buf.view(-1)
        layers, tokens = self._check_shape(out.shape, heads)
        header = check_chunk(buf, self.digest, (layers, tokens, heads.count, self.shape.head_dim, heads.start, out.dtype),
                             min(self.exact, tokens), lambda: self.nbytes(out.shape, out.dtype, heads))
        offset = HEADER_BYTES

        def take(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            nonlocal offset
            n = _nbytes(shape, dtype)
            t = buf[offset : offset + n].clone().view(dtype).view(shape)  # clone: the slice may be unaligned
            offset += n
            return t

        d, sd = self.shape.head_dim, store_dtype(header.dtype)
        for i in range(layers):
            dst = {n: out[s, i].view(tokens, heads.count, d) for s, n in enumerate(STREAMS)}
            if not self.codec.layers[i].compressed:
                for n in STREAMS:
                    dst[n].copy_(take((heads.count, tokens, d), sd).permute(1, 0, 2))
                continue
            e = header.exact
            keep = torch.ones(tokens, dtype=torch.bool)
            if e:
                idx = take((e,), torch.int16).long()
                if idx[0] < 0 or idx[-1] >= tokens or (idx[1:] <= idx[:-1]).any():
                    raise ChunkFormatError(f"layer {i}: exact-token indices {idx.tolist()[:8]} are not increasing "
                                           f"positions below {tokens}; fix: the object is corrupted: drop it and "
                                           "recompute the KV")
                keep[idx] = False
                for n in STREAMS:
                    dst[n][idx.to(out.device)] = take((heads.count, e, d), sd).permute(1, 0, 2).to(out.device, out.dtype)
            keep = keep.to(out.device)
            for n in STREAMS:
                stream = self._stream(i, n, heads, out.device, header.dtype)
                stores = stream.codes + ([stream.scales] if _scaled(stream.codec) else [])
                for (shape, dtype), store in zip(_stream_parts(stream.codec, heads.count, tokens - e, sd), stores):
                    store.append(take(shape, dtype).unsqueeze(0).to(out.device))
                dst[n][keep] = stream.decode(out.dtype)[0].permute(1, 0, 2)
        check_finite(out)


def to_chunks(keys: list[torch.Tensor], values: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """Per-layer keys and values [1, H, T, d] (a transformers cache's layers) as LMCache's KV_2LTD chunks
    [2, L, tokens, H*d], in their dtype; a last partial chunk is dropped, as LMCache stores only full chunks."""
    kv = torch.stack([torch.stack(keys), torch.stack(values)])[:, :, 0]  # [2, L, H, T, d]
    kv = kv.permute(0, 1, 3, 2, 4).flatten(-2)  # [2, L, T, H*d]
    return [kv[:, :, s : s + tokens].contiguous() for s in range(0, kv.shape[2] - tokens + 1, tokens)]


def from_chunks(chunks: list[torch.Tensor], head_dim: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inverse of :func:`to_chunks`: per-layer keys and values [1, H, T, d] for a transformers cache."""
    kv = torch.cat(chunks, dim=2)  # [2, L, T, H*d]
    kv = kv.unflatten(-1, (-1, head_dim)).permute(0, 1, 3, 2, 4).unsqueeze(2)  # [2, L, 1, H, T, d]
    return list(kv[0]), list(kv[1])


__all__ = ["ChunkCodec", "ChunkHeader", "HeadSlice", "to_chunks", "from_chunks", "preset_digest", "MAGIC", "FORMAT_VERSION",
           "HEADER_BYTES"]

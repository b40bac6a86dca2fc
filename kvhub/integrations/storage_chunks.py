"""KV chunks in the storage form: a preset's storage codec (:mod:`kvhub.storage_codec`) as bytes.

Layout (little endian): the 64-byte header of :mod:`kvhub.integrations.chunks` with magic ``KVHS`` (its digest is
the sha256 of the storage codec, every tensor and its layout, and of the budget's name, so a chunk decodes only with
the codec and budget that wrote it; re-measuring the preset's metrics does not invalidate a store), then the first ``exact`` tokens of every layer's keys and values at 16 bits (``[2, L, exact, H*d]``),
then the packed code runs of the other tokens (:meth:`StorageCodec.encode`). Its size follows from the shape, the
dtype and the budget alone. Decoding runs the checks of the attention form (header against this serde, exact size,
CRC-32, finite values) before it trusts a byte.

The transform mixes every KV head of a layer group, so a chunk must hold all heads: a tensor-parallel rank holding
a slice is refused (the attention form handles slices).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..errors import ChunkShapeError, CodecError
from ..storage_codec import StorageCodec
from .chunks import (
    HEADER_BYTES,
    ChunkHeader,
    HeadSlice,
    check_chunk,
    check_chunk_shape,
    check_finite,
    store_dtype,
    write_checksum,
)

MAGIC = b"KVHS"
FORMAT_VERSION = 1


class StorageChunkCodec:
    """Encodes and decodes whole-model chunks with a preset's storage codec at one of its budgets."""

    def __init__(self, preset: Any, budget: str | None = None, device: str | None = None) -> None:
        storage: StorageCodec | None = preset.storage
        if storage is None:
            raise CodecError(f"the preset for {preset.base_model['id']} has no storage codec; fix: fit one with "
                             "`kvhub fit-storage`, or use the attention form (serde option \"form\": \"attention\")")
        self.storage = storage
        self.budget = budget or min(storage.budgets, key=storage.bits_per_token, default="")
        storage.budget(self.budget)  # a typed error for an unknown name
        self.shape = preset.shape
        # where the transform runs: the chunk's own device by default; "cuda" stages CPU chunks through a GPU (two
        # matmuls of [tokens, 5760] x [5760, ~3300] per stream on SmolLM2: ~0.15 s per chunk on 2 CPU cores)
        try:
            self.device = torch.device(device) if device else None
        except (RuntimeError, TypeError):
            raise CodecError(f"storage codec device {device!r} is not a torch device; fix: use \"cuda\", \"cuda:N\" "
                             "or drop it") from None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise CodecError(f"storage codec device {device!r}: this process sees no CUDA device; fix: drop 'device' "
                             "to run the codec on CPU")
        self.exact = storage.exact
        self.digest = hashlib.sha256(storage.digest() + self.budget.encode()).digest()

    def _check_shape(self, shape, heads: HeadSlice) -> tuple[int, int]:
        if heads.start != 0 or heads.count != self.shape.num_kv_heads:
            raise ChunkShapeError(f"the storage form encodes all {self.shape.num_kv_heads} KV heads together, the chunk "
                                  f"holds {heads.count} from head {heads.start}; fix: use the attention form "
                                  "(\"form\": \"attention\") with tensor parallelism")
        return check_chunk_shape(shape, self.shape, heads)

    def nbytes(self, shape, dtype: torch.dtype, heads: HeadSlice) -> int:
        """Exact size of the encoded chunk (exact tokens are 16-bit whatever ``dtype``): shape and budget only."""
        _, tokens = self._check_shape(shape, heads)
        return self.storage.chunk_bytes(tokens, self.budget, HEADER_BYTES)

    def encode(self, chunk: torch.Tensor, out: torch.Tensor, heads: HeadSlice) -> int:
        layers, tokens = self._check_shape(chunk.shape, heads)
        if chunk.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ChunkShapeError(f"chunk dtype {chunk.dtype} is not fp16, bf16 or fp32; fix: store the model's KV dtype")
        total = self.nbytes(chunk.shape, chunk.dtype, heads)
        out = out.view(-1)
        if out.numel() < total:
            raise ChunkShapeError(f"the output buffer holds {out.numel()} bytes, the chunk needs {total}; fix: size "
                                  "it with estimate_serialized_size")
        e = min(self.exact, tokens)
        header = ChunkHeader(self.digest, layers, tokens, heads.count, self.shape.head_dim, heads.start, e, chunk.dtype)
        parts = [torch.frombuffer(bytearray(header.pack(MAGIC, FORMAT_VERSION)), dtype=torch.uint8).to(out.device),
                 chunk[:, :, :e].to(store_dtype(chunk.dtype)).contiguous().view(torch.uint8).view(-1),
                 *self.storage.encode(chunk[:, :, e:].to(self.device or chunk.device), self.budget)]
        offset = 0
        for p in parts:
            out[offset : offset + p.numel()].copy_(p.view(-1))
            offset += p.numel()
        assert offset == total, (offset, total)  # nbytes and the parts written must agree
        write_checksum(out[:total])
        return total

    def decode(self, buf: torch.Tensor, out: torch.Tensor, heads: HeadSlice) -> None:
        buf = buf.view(-1)
        layers, tokens = self._check_shape(out.shape, heads)
        e = min(self.exact, tokens)
        check_chunk(buf, self.digest, (layers, tokens, heads.count, self.shape.head_dim, heads.start, out.dtype), e,
                    lambda: self.nbytes(out.shape, out.dtype, heads), MAGIC, FORMAT_VERSION)
        width = self.shape.num_kv_heads * self.shape.head_dim
        sd = store_dtype(out.dtype)
        n = 2 * layers * e * width * sd.itemsize
        exact = buf[HEADER_BYTES : HEADER_BYTES + n].clone().view(sd).view(2, layers, e, width)
        offset, runs = HEADER_BYTES + n, []
        for size in self.storage.run_sizes(tokens - e, self.budget):
            runs.append(buf[offset : offset + size])
            offset += size
        out[:, :, :e] = exact.to(out.device, out.dtype)
        if self.device is None or self.device == out.device:
            self.storage.decode(runs, tokens - e, out[:, :, e:], self.budget)
        else:
            staged = torch.empty(2, layers, tokens - e, width, dtype=out.dtype, device=self.device)
            self.storage.decode([r.to(self.device) for r in runs], tokens - e, staged, self.budget)
            out[:, :, e:] = staged.to(out.device)
        check_finite(out)


__all__ = ["StorageChunkCodec", "MAGIC", "FORMAT_VERSION"]

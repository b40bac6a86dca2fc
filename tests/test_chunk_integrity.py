"""Chunks read back from a shared store are not trusted (issue #22 item 4): every corrupted or altered chunk raises a
typed ChunkError, never decodes into other KV. Each repro of the issue is tried twice: as stored (the CRC-32 catches
it) and resealed with a recomputed CRC, as a writer that knows the format would, where the header cross-checks,
the exact size, the index rule and the finite-values check must catch it on their own. Then a fuzz of 2,000 random
mutations (fixed seed): each one raises a typed error or decodes to exactly the original tensor."""

from __future__ import annotations

import random
import struct

import pytest
import torch
from transformers import DynamicCache

from kvhub import CacheCodec, KVPreset, LayerCodec
from kvhub.codec import Segment, StreamCodec
from kvhub.errors import ChunkChecksumError, ChunkError
from kvhub.integrations.chunks import _CRC, HEADER_BYTES, ChunkCodec, HeadSlice, _checksum, to_chunks
from tests.tiny_models import VOCAB, tiny_bases

CAL = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}
HEADS = HeadSlice(0, 2)  # tiny llama: 2 layers, 2 KV heads, head_dim 16
NAN, INF = b"\x00\x7e", b"\x00\x7c"  # fp16, little endian


@pytest.fixture(scope="module")
def sealed(tiny_llama):
    """A valid fp16 chunk of the tiny model's real K/V through a codec with every part a chunk stores (exact tokens,
    a 16-bit segment, 4-bit codes, per-token and RMS scales), its codec, and its decoded tensor."""
    cache = DynamicCache(config=tiny_llama.config)
    ids = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        tiny_llama(input_ids=ids, cache=cache, use_cache=True)
    chunk = to_chunks([la.keys for la in cache.layers], [la.values for la in cache.layers], 32)[0].half()
    keys = StreamCodec((Segment(8, 16), Segment(8, 4)), scale="token")
    values = StreamCodec((Segment(16, 4),), scale="rms")
    preset = KVPreset.create(tiny_llama.config, CacheCodec((LayerCodec(keys, values, sink=4),) * 2),
                             tiny_bases(tiny_llama), CAL, "test/tiny-llama")
    codec = ChunkCodec(preset)
    buf = torch.empty(codec.nbytes(chunk.shape, chunk.dtype, HEADS), dtype=torch.uint8)
    codec.encode(chunk, buf, HEADS)
    out = torch.empty_like(chunk)
    codec.decode(buf, out, HEADS)
    return codec, bytes(buf.numpy()), chunk, out


def _decode(codec, data: bytes, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    codec.decode(torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8),
                 out, HEADS)
    return out


def _reseal(data: bytes) -> bytes:
    """``data`` with its CRC recomputed: what a writer that knows the format stores."""
    raw = bytearray(data)
    raw[_CRC] = struct.pack("<I", _checksum(torch.frombuffer(bytearray(raw), dtype=torch.uint8)))
    return bytes(raw)


def _parts(codec, chunk) -> dict[str, int]:
    """Byte offset of each part of layer 0 (indices, exact K and V, then each stream's codes and scales)."""
    names = ["indices", "exact-keys", "exact-values", "key-16-bit", "key-4-bit", "key-scales", "value-4-bit",
             "value-scales"]
    offset, out = HEADER_BYTES, {}
    for name, (shape, dtype) in zip(names, codec._layer_parts(0, 2, chunk.shape[2], codec.exact, chunk.dtype)):
        out[name] = offset
        offset += dtype.itemsize * torch.Size(shape).numel()
    return out


def _at(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


# header fields: dtype code at byte 54, exact count at 52 (see chunks._HEADER)
REPROS = {
    "NaN in a per-token scale": lambda d, p: _at(d, p["key-scales"] + 6, NAN),
    "inf in an exact token": lambda d, p: _at(d, p["exact-keys"] + 10, INF),
    "NaN in a 16-bit segment": lambda d, p: _at(d, p["key-16-bit"] + 2, NAN),
    "dtype code fp16 -> bf16": lambda d, p: _at(d, 54, b"\x01"),
    "exact-token count 4 -> 0": lambda d, p: _at(d, 52, b"\x00\x00"),
    "permuted exact-token indices": lambda d, p: _at(d, p["indices"], struct.pack("<4h", 1, 0, 2, 3)),
    "trailing bytes": lambda d, p: d + b"\x00" * 16,
    "a doubled chunk": lambda d, p: d + d,
}


@pytest.mark.parametrize("resealed", [False, True], ids=["as-stored", "resealed"])
@pytest.mark.parametrize("repro", sorted(REPROS))
def test_each_repro_of_the_issue_raises_a_typed_error(sealed, repro, resealed):
    codec, data, chunk, _ = sealed
    bad = REPROS[repro](data, _parts(codec, chunk))
    with pytest.raises(ChunkError):
        _decode(codec, _reseal(bad) if resealed else bad, chunk)


def test_redirected_exact_token_indices_fail_the_checksum(sealed):
    codec, data, chunk, _ = sealed
    with pytest.raises(ChunkChecksumError):
        _decode(codec, _at(data, _parts(codec, chunk)["indices"], struct.pack("<4h", 0, 1, 2, 9)), chunk)


def test_a_chunk_decodes_only_into_the_dtype_it_was_written_from(sealed):
    codec, data, chunk, _ = sealed
    with pytest.raises(ChunkError, match="dtype"):
        _decode(codec, data, chunk.bfloat16())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    kind = rng.randrange(9)
    if kind == 0:  # one bit
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a few random bytes, sometimes the same value (a no-op must decode exactly)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(raw))
            raw[i] = raw[i] if rng.random() < 0.1 else rng.randrange(256)
    elif kind == 2:  # truncated
        return bytes(raw[: rng.randrange(len(raw))])
    elif kind == 3:  # extended
        return bytes(raw) + rng.randbytes(rng.randint(1, 100))
    elif kind == 4:  # NaN or inf at an even offset
        i = rng.randrange(HEADER_BYTES, len(raw) - 1) & ~1
        raw[i : i + 2] = rng.choice([NAN, INF, b"\x00\xfc"])
    elif kind == 5:  # a header byte
        raw[rng.randrange(HEADER_BYTES)] = rng.randrange(256)
    elif kind == 6:  # two spans swapped
        n = rng.randint(1, 64)
        i, j = rng.randrange(len(raw) - n), rng.randrange(len(raw) - n)
        raw[i : i + n], raw[j : j + n] = raw[j : j + n], raw[i : i + n]
    elif kind == 7:  # a span zeroed
        i = rng.randrange(len(raw))
        raw[i : i + rng.randint(1, 256)] = bytes(min(256, len(raw) - i))[: len(raw[i : i + 256])]
    else:  # the doubled chunk
        return bytes(raw) * 2
    return bytes(raw)


def test_two_thousand_mutations_raise_a_typed_error_or_decode_exactly(sealed):
    codec, data, chunk, reference = sealed
    rng = random.Random(22)
    outcomes = {"refused": 0, "exact": 0}
    for _ in range(2000):
        bad = _mutate(rng, data)
        try:
            out = _decode(codec, bad, chunk)
        except ChunkError:
            outcomes["refused"] += 1
            continue
        assert torch.equal(out, reference), "a mutated chunk decoded into other KV"
        outcomes["exact"] += 1
    assert outcomes["refused"] > 1800 and outcomes["exact"] > 0, outcomes  # the no-ops decode, the rest is refused

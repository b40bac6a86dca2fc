"""The chunk byte format (kvhub.integrations.chunks) on a tiny model: the codec paths the bundled SmolLM2 preset does
not take (16-bit segments, identity projection, static per-channel scales, uncompressed layers), checked against the
input itself. Needs no lmcache: runs in the main suite. The LMCache end to end is tests/test_lmcache.py."""

from __future__ import annotations

import pytest
import torch

from kvhub import CacheCodec, KVPreset, LayerCodec, ModelShape, StreamCodec
from kvhub.codec import BitsCode, Segment
from kvhub.errors import ChunkPresetMismatchError, ChunkShapeError
from kvhub.integrations.chunks import HEADER_BYTES, ChunkCodec, HeadSlice, from_chunks, to_chunks
from tests.tiny_models import tiny_bases, tiny_chunks

CAL = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}
HEADS = HeadSlice(0, 2)  # tiny llama: 2 layers, 2 KV heads, head_dim 16


@pytest.fixture(scope="module")
def kv(tiny_llama):
    """Two 32-token fp16 chunks of the tiny model's real K/V."""
    return tiny_chunks(tiny_llama, 64, 32, seed=7)


def make_preset(model, codec: CacheCodec) -> KVPreset:
    return KVPreset.create(model.config, codec, tiny_bases(model), CAL, "test/tiny-llama")


def round_trip(preset, chunk, **kw):
    codec = ChunkCodec(preset, **kw)
    buf = torch.empty(codec.nbytes(chunk.shape, chunk.dtype, HEADS), dtype=torch.uint8)
    assert codec.encode(chunk, buf, HEADS) == buf.numel()
    out = torch.full_like(chunk, float("nan"))
    codec.decode(buf, out, HEADS)
    return out, buf.numel()


def test_chunk_layout_round_trips_as_to_chunks_says(kv):
    keys, values = from_chunks(kv, 16)
    assert torch.equal(torch.cat(to_chunks(keys, values, 32)), torch.cat(kv))


def test_16_bit_identity_codec_is_lossless(tiny_llama, kv):
    shape = ModelShape.from_config(tiny_llama.config)
    preset = make_preset(tiny_llama, CacheCodec.uniform(shape, 16, 16, projection="identity", sink=2))
    for chunk in kv:
        out, n = round_trip(preset, chunk)
        assert torch.equal(out, chunk)
        # per layer: 2 int16 indices + 2 exact tokens x 2 heads x K,V x 16 x 2 bytes + 30 coded tokens x same
        assert n == HEADER_BYTES + 2 * (2 * 2 + 32 * 2 * 2 * 16 * 2)


def test_static_scales_16_bit_segments_and_uncompressed_layers(tiny_llama, kv):
    """Layer 0: keys 8x16-bit + 8x4-bit PCA, values 8-bit PCA with static per-channel steps (no scales stored);
    layer 1 left uncompressed (kept whole at 16 bits)."""
    keys = StreamCodec((Segment(8, 16), Segment(8, 4)), scale="token")
    values = StreamCodec((Segment(16, 8),), scale="channel")
    uncompressed = LayerCodec(keys, values, sink=2, compressed=False)
    preset = make_preset(tiny_llama, CacheCodec((LayerCodec(keys, values, sink=2), uncompressed)))
    for chunk in kv:
        out, n = round_trip(preset, chunk)
        assert torch.equal(out[:, 1], chunk[:, 1]) and torch.equal(out[:, 0, :2], chunk[:, 0, :2])
        for s in (0, 1):
            err = ((out[s, 0].float() - chunk[s, 0].float()).norm() / chunk[s, 0].float().norm()).item()
            assert 0 < err < 0.15, (s, err)
        # layer 0: indices 2x2 + exact 2x2x2x16x2 + 30 tokens x 2 heads x (K 8x2 + 8/2 + scale 2, V 16) bytes;
        # layer 1: 32 tokens x 2 heads x 2 x 16 x 2 bytes.
        assert n == HEADER_BYTES + (4 + 256 + 30 * 2 * (16 + 4 + 2 + 16)) + 32 * 2 * 2 * 16 * 2


def test_another_preset_and_another_slice_are_refused(tiny_llama, kv):
    shape = ModelShape.from_config(tiny_llama.config)
    a = make_preset(tiny_llama, CacheCodec.uniform(shape, 8, 8))
    b = make_preset(tiny_llama, CacheCodec.uniform(shape, 8, 4))
    codec = ChunkCodec(a)
    buf = torch.empty(codec.nbytes(kv[0].shape, kv[0].dtype, HEADS), dtype=torch.uint8)
    codec.encode(kv[0], buf, HEADS)
    with pytest.raises(ChunkPresetMismatchError):
        ChunkCodec(b).decode(buf, torch.empty_like(kv[0]), HEADS)
    with pytest.raises(ChunkShapeError, match="first head"):  # rank 1's head read as rank 0's
        part = kv[0][..., 16:].contiguous()
        one = torch.empty(codec.nbytes(part.shape, part.dtype, HeadSlice(1, 1)), dtype=torch.uint8)
        codec.encode(part, one, HeadSlice(1, 1))
        codec.decode(one, torch.empty_like(part), HeadSlice(0, 1))


def test_log8_scales_travel_as_one_byte_each(tiny_llama, kv):
    """Keys 8x4 + 8x2-bit, values 16x4-bit, per-token scales as 8-bit log codes: the chunk decodes to what the
    stream itself decodes, and its size counts one byte per scale."""
    keys = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="token", scale_format="log8")
    values = StreamCodec((Segment(16, 4),), scale="rms", scale_format="log8")
    preset = make_preset(tiny_llama, CacheCodec((LayerCodec(keys, values, sink=2),) * 2))
    for chunk in kv:
        out, n = round_trip(preset, chunk)
        assert torch.equal(out[:, :, :2], chunk[:, :, :2])
        err = ((out.float() - chunk.float()).norm() / chunk.float().norm()).item()
        assert 0 < err < 0.2, err
        # per layer: indices 2x2 + exact 2x2x2x16x2 + 30 tokens x 2 heads x (K 4+2 codes + 2 scales, V 8 + 1) bytes
        assert n == HEADER_BYTES + 2 * (4 + 256 + 30 * 2 * (4 + 2 + 2 + 8 + 1))


def test_vector_codes_travel_in_the_bytes_of_scalar_codes(tiny_llama, kv):
    """Values as vector codes (each byte a codeword): a chunk is as large as with Lloyd-Max levels of the same bits,
    keeps its exact tokens, and decodes within the scalar codes' error."""
    keys = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="token", scale_format="log8")
    sizes, errors = {}, {}
    for quantizer in ("lloyd-max", "vq"):
        values = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="rms", quantizer=quantizer, scale_format="log8")
        preset = make_preset(tiny_llama, CacheCodec((LayerCodec(keys, values, sink=2),) * 2))
        out, sizes[quantizer] = round_trip(preset, kv[0])
        assert torch.equal(out[:, :, :2], kv[0][:, :, :2])
        errors[quantizer] = ((out[1].float() - kv[0][1].float()).norm() / kv[0][1].float().norm()).item()
    assert sizes["vq"] == sizes["lloyd-max"]
    assert 0 < errors["vq"] < 1.1 * errors["lloyd-max"], errors


@pytest.mark.parametrize("where", ["values", "keys' 2-bit tail"])
def test_vector_code_chunks_name_their_codebook(tiny_llama, kv, monkeypatch, where):
    """A chunk of vector codes (a stream's, or one bit width's by ``by_bits``) is tied to the packaged codebook that
    made its bytes: under another codebook file of the same quantizer name it is refused, not decoded with the wrong
    codewords. Scalar-code presets keep the digest of their config alone (chunks already at rest stay readable)."""
    import hashlib
    import json

    from kvhub.quantizers import vector

    tail = (BitsCode(2, "rms", "vq"),) if where != "values" else ()
    keys = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="token", scale_format="log8", by_bits=tail)
    values = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="rms", quantizer="lloyd-max" if tail else "vq",
                         scale_format="log8")
    preset = make_preset(tiny_llama, CacheCodec((LayerCodec(keys, values, sink=2),) * 2))
    codec = ChunkCodec(preset)
    buf = torch.empty(codec.nbytes(kv[0].shape, kv[0].dtype, HEADS), dtype=torch.uint8)
    codec.encode(kv[0], buf, HEADS)

    monkeypatch.setattr(vector, "codebook_sha256", lambda: hashlib.sha256(b"another codebook").digest())
    with pytest.raises(ChunkPresetMismatchError):
        ChunkCodec(preset).decode(buf, torch.empty_like(kv[0]), HEADS)

    scalar = make_preset(tiny_llama, CacheCodec.uniform(ModelShape.from_config(tiny_llama.config), 8, 4))
    config_only = hashlib.sha256(json.dumps(scalar.config, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert ChunkCodec(scalar).digest == config_only

"""Vector codes (kvhub.quantizers.vector): the packaged codebooks against published scalar optima, the stream's
bytes against a brute-force nearest-codeword search and an independent byte count, and the refusals. Decoding from
the stored bytes is held to a float64 reference in tests/test_conformance.py (codec "vq")."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

import kvhub.quantizers.vector as vector
from kvhub.codec import Segment, StreamCodec
from kvhub.errors import CodecError
from kvhub.kernels import decode_attention
from kvhub.schema import load_schema
from kvhub.stream import CompressedStream

LLOYD_MAX_MSE = {2: 0.1175, 4: 0.009497}  # N(0, 1), Max 1960, Table I
# The packaged codebooks as first published: every stored vector code (a preset's cache, KV at rest, an LMCache
# chunk) decodes only with these, so a refit needs a new quantizer name, not a new file under this one.
CODEBOOK_SHA256 = "3356cae26f0397742741a4cbd1031076b28a41ece04851f602890e533836f47d"


def test_the_packaged_codebooks_are_the_published_ones():
    assert hashlib.sha256(vector.CODEBOOK_FILE.read_bytes()).hexdigest() == CODEBOOK_SHA256


def book(bits: int) -> torch.Tensor:
    return load_file(str(vector.CODEBOOK_FILE))[f"bits{bits}"]


@pytest.mark.parametrize("bits", [2, 4])
def test_packaged_codebook_beats_lloyd_max_on_fresh_gaussian_vectors(bits):
    b = book(bits)
    assert tuple(b.shape) == (256, 8 // bits)
    x = torch.randn(200_000, b.shape[1], generator=torch.Generator().manual_seed(7))
    mse = (x - b[torch.cdist(x, b).argmin(1)]).pow(2).mean().item()
    assert mse < 0.9 * LLOYD_MAX_MSE[bits]  # measured 17-18% below (benchmarks/results/vq_codebooks.json)


def stream_of(bits: int, z: torch.Tensor, scale_format: str = "fp16") -> CompressedStream:
    codec = StreamCodec((Segment(z.shape[-1], bits),), "identity", "rms", "vq", scale_format)
    s = CompressedStream(codec, None, z.device)
    s.append(z)
    return s


@pytest.mark.parametrize("bits", [2, 4])
def test_each_stored_byte_is_the_nearest_codeword_of_its_components(bits):
    z = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(1)) * 3
    s = stream_of(bits, z)
    per = 8 // bits
    scaled = (z / s.token_scales().float()).unflatten(-1, (-1, per))  # [B, H, T, groups, per]
    want = torch.cdist(scaled.reshape(-1, per), book(bits)).argmin(1).reshape(scaled.shape[:-1])
    assert torch.equal(s.codes[0].view(0, 50).long(), want)


@pytest.mark.parametrize("bits", [2, 4])
def test_vector_codes_cost_what_scalar_codes_of_the_same_bits_cost(bits):
    z = torch.randn(1, 3, 40, 16)
    s = stream_of(bits, z)
    assert s.nbytes() == {"codes": 3 * 40 * 16 * bits // 8, "scales": 3 * 40 * 2}  # fp16 scale per token and head


def test_encoding_in_blocks_gives_the_codes_of_one_pass(monkeypatch):
    z = torch.randn(2, 3, 64, 16, generator=torch.Generator().manual_seed(2))
    whole = stream_of(2, z).codes[0].view(0, 64).clone()
    monkeypatch.setattr(vector, "ENCODE_BLOCK_BYTES", 1)  # one token per block
    assert torch.equal(stream_of(2, z).codes[0].view(0, 64), whole)


@pytest.mark.parametrize(("scale", "bits"), [("token", 4), ("rms", 8)])
def test_codec_refuses_vector_codes_it_cannot_run(scale, bits):
    with pytest.raises(CodecError, match="fix:"):
        StreamCodec((Segment(16, bits),), "pca", scale, "vq").check("s", 16)


def test_schema_and_codec_round_trip_name_vector_codes():
    codec = StreamCodec((Segment(8, 4), Segment(8, 2)), "pca", "rms", "vq")
    assert StreamCodec.from_dict(codec.to_dict()) == codec and codec.to_dict()["quantizer"] == "vq"
    assert "vq" in str(load_schema("preset"))


def test_fused_decode_refuses_vector_codes():
    z = torch.randn(1, 2, 8, 16)
    keys, values = stream_of(4, z), stream_of(2, z)
    q, exact = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="vector codes"):
        decode_attention(q, keys, values, 8, exact, exact, None, None, 0.25)


def test_a_damaged_codebook_file_is_refused_with_a_fix(tmp_path, monkeypatch):
    bad = tmp_path / "gaussian_vq.safetensors"
    save_file({"bits2": torch.zeros(255, 4), "bits4": torch.zeros(256, 2)}, str(bad))
    monkeypatch.setattr(vector, "CODEBOOK_FILE", bad)
    vector.codebooks.cache_clear()
    try:
        with pytest.raises(ValueError, match="fix:"):
            vector.codebooks()
    finally:
        vector.codebooks.cache_clear()

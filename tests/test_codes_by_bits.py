"""A code per bit width (``StreamCodec.by_bits``): why it exists (measured on Gaussian coefficients), what the codec
and the schema accept and refuse, and what the tuner's ladder asks of it. Decoding such streams against a float64
reference from their stored bytes is in tests/test_conformance.py (codecs "by-bits-vq" and "by-bits-scalar")."""

from __future__ import annotations

import pytest
import torch
from jsonschema import Draft202012Validator

from kvhub.codec import BitsCode, Segment, StreamCodec
from kvhub.errors import CodecError
from kvhub.quantizers.vector import codebooks
from kvhub.schema import load_schema
from kvhub.stream import CompressedStream
from kvhub.tuning import stream_ladders
from tests.test_conformance import unpack_codes

TAIL = BitsCode(2, "rms", "vq")


def _two_bit_mse(size: int, scale: str, quantizer: str) -> float:
    """MSE of unit-Gaussian coefficients through a one-segment 2-bit identity stream, read back by hand from its
    bytes: uniform levels ``(code - 1.5) * step`` or the packaged codebook's codewords, times the stored scale."""
    z = torch.randn(1, 1, 20_000, size, generator=torch.Generator().manual_seed(size))
    stream = CompressedStream(StreamCodec((Segment(size, 2),), "identity", scale, quantizer), None, z.device)
    stream.append(z)
    data, scales = stream.codes[0].view(0, z.shape[2]).long(), stream.token_scales().double()
    if quantizer == "vq":
        levels = codebooks()[2].double()[data].flatten(-2)
    else:
        codes = unpack_codes(data, 2)
        step = 2 / 3 if scale == "token" else 0.9957  # absmax: outer levels at +-1; RMS: Max (1960)'s optimal step
        levels = (codes.double() - 1.5) * step
    return (levels * scales - z.double()).pow(2).mean().item()


@pytest.mark.parametrize("size", [16, 32])
def test_two_bit_codes_lose_far_less_with_rms_scales_than_with_absmax(size):
    absmax = _two_bit_mse(size, "token", "uniform")
    rms, vq = _two_bit_mse(size, "rms", "uniform"), _two_bit_mse(size, "rms", "vq")
    assert absmax > 1.45 * rms and absmax > 1.7 * vq, (absmax, rms, vq)  # "half as much again, or more"; "about twice"
    assert vq < rms  # 4-D codewords beat scalar levels at the same bytes


def test_by_bits_round_trips_and_names_each_widths_code():
    codec = StreamCodec((Segment(48, 4), Segment(16, 2)), "pca", "token", scale_format="log8", by_bits=(TAIL,))
    codec.check("keys", 64)
    assert StreamCodec.from_dict(codec.to_dict()) == codec
    assert codec.code_of(4) == ("token", "uniform") and codec.code_of(2) == ("rms", "vq")
    assert codec.quantizers == ("uniform", "vq")
    assert "by_bits" not in StreamCodec((Segment(64, 4),)).to_dict()  # presets made before it re-save byte for byte
    config = {"segments": [[48, 4], [16, 2]], "scale": "token", "by_bits": [TAIL.to_dict()]}
    assert StreamCodec.from_dict(config) == StreamCodec((Segment(48, 4), Segment(16, 2)), by_bits=(TAIL,))


@pytest.mark.parametrize(("segments", "scale", "by_bits", "problem"), [
    ([(48, 4), (16, 2)], "token", (TAIL, TAIL), "twice"),
    ([(64, 4)], "token", (TAIL,), "has none of"),
    ([(48, 4), (16, 2)], "channel", (TAIL,), "per-token"),
    ([(48, 4), (16, 2)], "token", (BitsCode(2, "channel", "vq"),), "per-token"),
    ([(48, 4), (16, 2)], "token", (BitsCode(2, "token", "vq"),), "unit Gaussian"),
    ([(48, 8), (16, 4)], "rms", (BitsCode(8, "rms", "lloyd-max"),), "tabulated"),
])
def test_codec_refuses_codes_by_bits_it_cannot_run(segments, scale, by_bits, problem):
    codec = StreamCodec(tuple(Segment(*s) for s in segments), "pca", scale, by_bits=by_bits)
    with pytest.raises(CodecError, match=f"(?s){problem}.*fix:"):
        codec.check("layer 0 keys", 64)


def test_schema_bounds_the_codes_by_bits():
    check = Draft202012Validator(load_schema("preset")["$defs"]["stream"]).is_valid
    ok = {"segments": [[48, 4], [16, 2]], "by_bits": [TAIL.to_dict()]}
    assert check(ok)
    assert not check({**ok, "by_bits": [{"bits": 2, "scale": "channel", "quantizer": "vq"}]})
    assert not check({**ok, "by_bits": [{"bits": 2, "scale": "rms"}]})
    assert not check({**ok, "by_bits": [{**TAIL.to_dict(), "extra": 1}]})
    assert not check({**ok, "by_bits": [TAIL.to_dict()] * 4})


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("quantizer", ["uniform", "vq"])
def test_the_ladder_codes_only_the_keys_2_bit_tails_by_rms_when_asked(quantizer, head_dim):
    plain, tails = stream_ladders(head_dim, quantizer), stream_ladders(head_dim, quantizer, key_tails="rms")
    assert plain["values"] == tails["values"] and all(not k.by_bits for k in plain["keys"])
    changed = [i for i, (a, b) in enumerate(zip(plain["keys"], tails["keys"])) if a.segments != b.segments]
    assert changed == [3]  # only the all-4-bit keys' rung, which had no tail to code
    assert {s.bits for s in plain["keys"][3].segments} == {4}
    rung = tails["keys"][3]
    assert [s.bits for s in rung.segments] == [8, 4, 2] and rung.segments[0].size == head_dim // 16
    assert tails["keys"][2].bits_per_token() < rung.bits_per_token() < plain["keys"][3].bits_per_token()
    for before, after in zip(plain["keys"], tails["keys"]):
        after.check("keys", head_dim)
        if after.segments == before.segments:
            assert after.bits_per_token() == before.bits_per_token()
        has_tail = any(s.bits == 2 for s in after.segments)
        assert after.by_bits == ((BitsCode(2, "rms", quantizer),) if has_tail else ())


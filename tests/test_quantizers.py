"""Quantizers and scale schemes: each against an independent reference (published optima for N(0, 1), the
pre-plugin formula for the default), the registry against the codec and the schema."""

from __future__ import annotations

import pytest
import torch

from kvhub.codec import QUANTIZERS as CODEC_QUANTIZERS
from kvhub.codec import SCALE_FORMATS as CODEC_SCALE_FORMATS
from kvhub.codec import Segment, StreamCodec
from kvhub.errors import CodecError
from kvhub.preset import KVPreset
from kvhub.quant import unpack
from kvhub.quantizers import QUANTIZERS, SCALE_FORMATS, SCALES
from kvhub.schema import load_schema
from kvhub.stream import CompressedStream
from tests.paths import BOOKS_TUNED

# MSE of N(0, 1) under the optimal quantizers (Max 1960, Tables I and II): Lloyd-Max and the best uniform step.
PUBLISHED_MSE = {("lloyd-max", 2): 0.1175, ("lloyd-max", 4): 0.009497, ("uniform", 2): 0.1188, ("uniform", 4): 0.01154}


def gaussian(n: int = 2_000_000, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 1, n // 16, 16, generator=torch.Generator().manual_seed(seed))


def roundtrip(quantizer: str, scale: str, bits: int, z: torch.Tensor) -> torch.Tensor:
    """Encode ``z`` through a stream (identity projection, one segment) and read it back through its level table."""
    codec = StreamCodec((Segment(z.shape[-1], bits),), "identity", scale, quantizer)
    stream = CompressedStream(codec, None, z.device)
    stream.append(z)
    return stream.coefficients().clone()


@pytest.mark.parametrize(("quantizer", "bits"), sorted(PUBLISHED_MSE))
def test_gaussian_mse_matches_published_optimum(quantizer, bits):
    # channel scale needs a calibrated sigma; per-token RMS over 16 unit-Gaussian values is close to 1, so the
    # reference here is a static unit scale: the quantizer alone, encoded and decoded through its table.
    z = gaussian()
    q = QUANTIZERS[quantizer]
    codes = q.encode(z, torch.ones(()), bits, "deviation")
    mse = (q.levels(bits, "deviation")[codes.long()].float() - z).pow(2).mean().item()
    assert mse == pytest.approx(PUBLISHED_MSE[(quantizer, bits)], rel=0.01)


def test_lloyd_max_levels_are_the_published_ones():
    levels = QUANTIZERS["lloyd-max"].levels(2, "deviation")
    assert levels.tolist() == pytest.approx([-1.5104, -0.4528, 0.4528, 1.5104], abs=1e-4)
    top = QUANTIZERS["lloyd-max"].levels(4, "deviation")[8:]  # Max 1960, Table I, N = 16
    assert top.tolist() == pytest.approx([0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6180, 2.0690, 2.7326], abs=2e-4)


@pytest.mark.parametrize("bits", [2, 4])
def test_lloyd_max_beats_uniform_through_a_stream_with_rms_scales(bits):
    z = gaussian(400_000, seed=1)
    err = {q: (roundtrip(q, "rms", bits, z) - z).pow(2).mean().item() for q in ("uniform", "lloyd-max")}
    assert err["lloyd-max"] < err["uniform"]
    assert err["lloyd-max"] < 1.15 * PUBLISHED_MSE[("lloyd-max", bits)]  # per-token RMS costs a little


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_absmax_uniform_error_is_within_half_a_step(bits):
    z = gaussian(160_000, seed=2) * torch.linspace(0.01, 100, 10_000)[None, None, :, None]
    got = roundtrip("uniform", "token", bits, z)
    half_step = z.abs().amax(-1, keepdim=True) / (2 ** bits - 1)  # absmax / (2**(b-1) - 0.5) / 2
    assert ((got - z).abs() <= half_step * (1 + 1e-2) + 1e-6).all()


def _legacy_codes(z: torch.Tensor, bits: int, scale: str, sigma: torch.Tensor | None) -> torch.Tensor:
    """The pre-plugin quantizer (kvhub 0.1.0's quant.quantize with its step rules), written out independently."""
    h = 2 ** (bits - 1) - 0.5
    gaussian_step = {2: 0.9957, 4: 0.3352, 8: 0.0308}[bits]
    if scale == "channel":
        step = gaussian_step * sigma
    else:
        stat = z.abs().amax(-1, keepdim=True) if scale == "token" else z.pow(2).mean(-1, keepdim=True).sqrt()
        stat = stat.clamp(1e-8, 65504).half().float()
        step = stat * (1 / h if scale == "token" else gaussian_step)
    return torch.round(z / step + h).clamp_(0, 2**bits - 1).to(torch.uint8)


def test_default_quantizer_is_bit_identical_to_the_legacy_formula_on_a_calibrated_preset():
    """The books-tuned preset's own bases and codec (scalar codes, keys after RoPE; the bundled preset when the
    quantizers became plug-ins): every code equal to the pre-plugin formula's, so its logits are unchanged bit for
    bit (the rest of the path did not change)."""
    preset = KVPreset.from_pretrained(BOOKS_TUNED)
    gen = torch.Generator().manual_seed(3)
    for (i, name), basis in sorted(preset.bases.items())[:6]:
        codec = preset.codec.layers[i].stream(name)
        for scale in ("token", "rms", "channel"):
            variant = StreamCodec(codec.segments, codec.projection, scale)
            stream = CompressedStream(variant, basis, torch.device("cpu"))
            x = torch.randn(1, basis.mean.shape[0], 40, basis.mean.shape[1], generator=gen) * 3
            stream.append(x)
            z = stream.project(x)
            for seg, (a, b), store in zip(stream.segments, stream.bounds, stream.codes):
                want = _legacy_codes(z[..., a:b], seg.bits, scale, stream.sigma[:, None, a:b])
                assert torch.equal(unpack(store.view(0, 40), seg.bits), want), (i, name, scale, seg)


def test_registry_codec_and_schema_name_the_same_quantizers():
    schema = load_schema("preset")
    stream = schema["$defs"]["stream"]["properties"]
    assert set(QUANTIZERS) == set(CODEC_QUANTIZERS) == set(stream["quantizer"]["enum"])
    assert set(SCALES) == set(stream["scale"]["enum"])
    assert set(SCALE_FORMATS) == set(CODEC_SCALE_FORMATS) == set(stream["scale_format"]["enum"])
    assert all(SCALE_FORMATS[f].bits == bits for f, bits in CODEC_SCALE_FORMATS.items())


def test_codec_names_the_quantizer_only_when_not_default():
    default = StreamCodec((Segment(16, 4),), "pca", "rms")
    assert "quantizer" not in default.to_dict()
    lm = StreamCodec((Segment(8, 4), Segment(8, 2)), "pca", "rms", "lloyd-max")
    assert StreamCodec.from_dict(lm.to_dict()) == lm and lm.to_dict()["quantizer"] == "lloyd-max"
    lm.check("s", 16)


@pytest.mark.parametrize(("scale", "bits", "quantizer"), [("token", 4, "lloyd-max"), ("rms", 8, "lloyd-max"),
                                                          ("rms", 4, "e8")])
def test_codec_refuses_quantizers_it_cannot_run(scale, bits, quantizer):
    with pytest.raises(CodecError):
        StreamCodec((Segment(16, bits),), "pca", scale, quantizer).check("s", 16)


# --- scale formats -------------------------------------------------------------------------------------------------
STEP = 2 ** (1 / 16)  # the log8 grid's ratio between neighbouring codes
FP16_ROUNDING = 1 + 2**-10


def _stats(n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics spread over 2**-6 .. 2**6 times a per head and group reference, [1, H=3, n, groups=2]."""
    gen = torch.Generator().manual_seed(1)
    reference = torch.tensor([[0.01, 3.0], [1.0, 40.0], [0.2, 0.2]])
    ratio = torch.exp2(torch.rand(1, 3, n, 2, generator=gen) * 12 - 6)
    return ratio * reference[None, :, None, :], reference


def test_log8_absmax_scale_is_never_below_the_absmax_and_at_most_one_step_above():
    stat, reference = _stats()
    fmt = SCALE_FORMATS["log8"]
    stored = fmt.store(stat, reference, "absmax")
    assert stored.dtype == torch.uint8
    loaded = fmt.load(stored, reference).float()
    assert (loaded >= stat).all()  # the outer level still reaches the largest coefficient: nothing clips
    assert (loaded <= stat * STEP * FP16_ROUNDING).all()


def test_log8_deviation_scale_rounds_to_the_nearest_step():
    stat, reference = _stats()
    fmt = SCALE_FORMATS["log8"]
    loaded = fmt.load(fmt.store(stat, reference, "deviation"), reference).float()
    assert (loaded / stat).log2().abs().max() <= 1 / 32 + 2**-10


def test_log8_saturates_at_the_ends_of_its_grid():
    reference = torch.ones(1, 1)
    fmt = SCALE_FORMATS["log8"]
    stat = torch.tensor([2.0**-12, 2.0**12, 0.0]).view(1, 1, 3, 1)
    loaded = fmt.load(fmt.store(stat, reference, "deviation"), reference).float().flatten()
    assert loaded.tolist() == pytest.approx([2.0**-8, 2 ** (127 / 16), 2.0**-8], rel=1e-3)


@pytest.mark.parametrize("scale", ["token", "rms"])
def test_log8_stream_stores_one_byte_per_scale_at_nearly_the_fp16_error(scale):
    """Bytes counted independently: 2 x 3 heads x 50 tokens x 2 segments scales; codes 16 + 8 bytes per token."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, 3, 50, 64, generator=gen) * torch.logspace(0.5, -1, 64)
    errors = {}
    for fmt in ("fp16", "log8"):
        codec = StreamCodec((Segment(32, 4), Segment(32, 2)), "identity", scale, scale_format=fmt)
        codec.check("s", 64)
        stream = CompressedStream(codec, None, z.device)
        stream.append(z)
        assert stream.nbytes()["scales"] == 2 * 3 * 50 * 2 * (2 if fmt == "fp16" else 1)
        assert stream.nbytes()["codes"] == 2 * 3 * 50 * (16 + 8)
        errors[fmt] = (stream.coefficients() - z).pow(2).mean().item()
    assert codec.bits_per_token() == 32 * 4 + 32 * 2 + 2 * 8
    assert errors["fp16"] * 0.9 < errors["log8"] < errors["fp16"] * 1.12  # absmax steps at most 4.4% wider


def test_codec_names_the_scale_format_only_when_not_default_and_refuses_what_it_cannot_store():
    default = StreamCodec((Segment(16, 4),), "pca", "rms")
    assert "scale_format" not in default.to_dict()
    log8 = StreamCodec((Segment(16, 4),), "pca", "rms", scale_format="log8")
    assert StreamCodec.from_dict(log8.to_dict()) == log8 and log8.to_dict()["scale_format"] == "log8"
    for bad in (StreamCodec((Segment(16, 4),), "pca", "channel", scale_format="log8"),
                StreamCodec((Segment(16, 4),), "pca", "rms", scale_format="log4")):
        with pytest.raises(CodecError, match="scale_format|scale"):
            bad.check("s", 16)

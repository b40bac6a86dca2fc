"""Preset statistics are bounded by what the decode arithmetic survives (issue #22 item 5): the crafted presets that
gave NaN or inf logits are refused with a typed one-line error, and every preset that is accepted, drawn at the
bounds, gives finite logits in fp16, bf16 and fp32."""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvhub import CompressedCache, compressed_attention
from kvhub.bases import Bases, StreamBasis
from kvhub.calibration import _Moments
from kvhub.codec import CacheCodec, LayerCodec, ModelShape, Segment, StreamCodec
from kvhub.errors import CodecError, CodecRangeError, PresetTensorError
from kvhub.preset import KVPreset
from tests.tiny_models import VOCAB, tiny_bases, tiny_model

CAL = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@lru_cache(maxsize=None)
def model_in(dtype: torch.dtype):
    model = tiny_model("llama").to(dtype)
    model.config._name_or_path = "test/tiny-llama"
    return model


@lru_cache(maxsize=None)
def calibrated() -> Bases:
    return tiny_bases(model_in(torch.float32))


def codec_of(stream: StreamCodec) -> CacheCodec:
    shape = ModelShape.from_config(model_in(torch.float32).config)
    return CacheCodec(tuple(LayerCodec(stream, stream, sink=2, window=2) for _ in range(shape.num_layers)), flush_block=4)


def with_stats(bases: Bases, mean=lambda m: m, variance=lambda v: v) -> Bases:
    return Bases({k: StreamBasis(mean(b.mean), b.basis, variance(b.variance)) for k, b in bases.items()})


def saved_preset(tmp_path, stream: StreamCodec, **stats) -> KVPreset:
    """A preset of ``stream`` on every layer whose stored statistics are rewritten by ``stats``, saved and loaded."""
    model = model_in(torch.float32)
    preset = KVPreset.create(model.config, codec_of(stream), calibrated(), CAL, "test/tiny-llama")
    preset.bases = with_stats(preset.bases, **stats)
    return KVPreset.load_folder(preset.save_pretrained(tmp_path / "preset"))


def alternating(value: float):
    return lambda m: torch.full_like(m, value) * torch.where(torch.arange(m.shape[-1]) % 2 == 0, 1.0, -1.0)


LOG8 = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="rms", scale_format="log8")
CHANNEL = StreamCodec((Segment(8, 4), Segment(8, 2)), scale="channel")


def logits_of(model, cache) -> torch.Tensor:
    """Logits of a 24-token prefill then 4 decode steps, reading the compressed history (sink 2, window 2)."""
    ids = torch.randint(3, VOCAB, (1, 28), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), compressed_attention(model):
        out = [model(input_ids=ids[:, :24], cache=cache, use_cache=True).logits]
        for t in range(24, 28):
            out.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("stream, stats", [
    (LOG8, {"mean": alternating(65504.0)}),
    (CHANNEL, {"variance": lambda v: torch.full_like(v, 4.29e9)}),
], ids=["mean 65504 with log8 scales", "variance 4.29e9 with channel scales"])
def test_preset_that_overflows_fp16_is_refused_for_an_fp16_model(tmp_path, stream, stats):
    """The issue's repros gave non-finite fp16 logits; they fit bf16 and fp32, so they load and are refused when
    the cache is built for an fp16 model, in one line naming the fix."""
    preset = saved_preset(tmp_path, stream, **stats)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.isfinite(logits_of(model_in(dtype), preset.build_cache(model_in(dtype)))).all()
    with pytest.raises(CodecRangeError, match=r"layer 0 keys: decoded vectors can reach a norm of .* beyond 65504, "
                                              r"what fp16 holds; fix: run the model in bf16 or fp32") as info:
        preset.build_cache(model_in(torch.float16))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("variance", [0.0, 1e-40, 1e-30], ids=["zero", "denormal", "ratio 1e-30"])
def test_variance_the_decoder_would_clamp_is_refused_at_load(tmp_path, variance):
    """A zero, denormal or absurdly small variance is not what the decoder uses (it clamps sigma): refused for
    every dtype when the preset loads."""
    def set_one(v):
        v = v.clone()
        v[:, -1] = variance
        return v

    with pytest.raises(PresetTensorError, match="variance of head 0 component 15 is .*, below the decoder's floor") as info:
        saved_preset(tmp_path, CHANNEL, variance=set_one)
    assert isinstance(info.value.__cause__, CodecRangeError) and "fix:" in str(info.value)


def test_calibration_raises_a_flat_direction_to_the_floor():
    """Keys with no spread along a direction calibrate to a variance the load accepts (the floor), not zero."""
    shape = ModelShape.from_config(model_in(torch.float32).config)
    bases = calibrated()
    flat = Bases({k: StreamBasis(b.mean, b.basis, torch.cat([b.variance[:, :-1], torch.zeros_like(b.variance[:, -1:])], -1))
                  for k, b in bases.items()})
    codec = CacheCodec.uniform(shape, 16, 16)
    with pytest.raises(CodecRangeError):
        flat.for_codec(codec, shape)
    moments = _Moments(1, 4, "cpu")
    moments.add(torch.randn(1, 1, 64, 4) * torch.tensor([3.0, 2.0, 1.0, 0.0]))
    StreamBasis.check(moments.basis(), "flat", 1, 4, 4)


def largest_accepted(bases: Bases, codec: CacheCodec, dtype: torch.dtype, which: str) -> Bases:
    """``bases`` with the mean, the variances or both scaled up to the largest factor the checks accept for
    ``dtype`` (bisection on log2 of the factor)."""
    shape = ModelShape.from_config(model_in(dtype).config)

    def scaled(log2: float) -> Bases:
        t = 2.0**log2
        return with_stats(bases, mean=(lambda m: m * t) if which in ("mean", "both") else (lambda m: m),
                          variance=(lambda v: v * t * t) if which in ("variance", "both") else (lambda v: v))

    def accepted(log2: float) -> bool:
        try:
            scaled(log2).for_codec(codec, shape).check_dtype(codec, dtype)
            return True
        except CodecError:
            return False

    lo, hi = 0.0, 64.0
    assert accepted(lo)
    if accepted(hi):
        return scaled(hi)
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if accepted(mid) else (lo, mid)
    return scaled(lo)


STREAMS = st.sampled_from([
    StreamCodec((Segment(8, 4), Segment(8, 2))),
    StreamCodec((Segment(4, 16), Segment(12, 4))),
    StreamCodec((Segment(16, 8),), scale="rms"),
    StreamCodec((Segment(8, 4), Segment(8, 2)), scale="token", scale_format="log8"),
    StreamCodec((Segment(4, 16), Segment(8, 4), Segment(4, 2)), scale="rms", quantizer="lloyd-max", scale_format="log8"),
    StreamCodec((Segment(8, 4), Segment(8, 2)), scale="channel"),
    StreamCodec((Segment(8, 4), Segment(4, 2), Segment(4, 0)), scale="channel", quantizer="lloyd-max"),
])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(keys=STREAMS, values=STREAMS, which=st.sampled_from(["mean", "variance", "both"]), dtype=st.sampled_from(DTYPES))
def test_presets_at_the_bounds_give_finite_logits(keys, values, which, dtype):
    """Whatever loads and passes the dtype check, drawn at the bound, generates finite logits in that dtype."""
    model = model_in(dtype)
    shape = ModelShape.from_config(model.config)
    codec = codec_of(keys)
    codec = replace(codec, layers=tuple(replace(layer, values=values) for layer in codec.layers))
    bases = largest_accepted(calibrated().rotated_for(codec, shape), codec, dtype, which)
    cache = CompressedCache(model.config, codec, bases)
    assert torch.isfinite(logits_of(model, cache)).all()

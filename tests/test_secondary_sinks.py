"""Secondary sinks kept exact (kvhub.secondary_sinks), against independent references.

* Which token-heads are kept: counted here from the fed values' lengths and the threshold, not from the layer.
* Attention, on every backend: a float64 reference over the keys and values decoded from the stored bytes
  (``decoded_history``, the conformance matrix's decoder) with the kept token-heads replaced by the vectors fed in.
  A backend that does not restore them must fall back to PyTorch.
* The history a stock kernel gets (rebuilt from the codes) after every change of the batch and the history: beam
  reorder, repeat, selection, crop, and a sliding window forgetting tokens; each held to the same reference,
  transformed here with the fed tensors.
* Bytes: counted from the kept count and the row layout; a preset round trip keeps the medians; the codec refuses a
  threshold out of range and bases without medians.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kvhub import CompressedCache, compressed_attention
from kvhub.bases import Bases
from kvhub.codec import CacheCodec, LayerCodec, ModelShape
from kvhub.errors import CodecError
from kvhub.layer import CompressedLayer
from tests.test_conformance import (BACKENDS, BATCH, HISTORY_TOKENS, LOSSY, Q_HEADS, SCALING, SOFTCAP,
                                    assert_close_to_reference, assert_fell_back, assert_served, attend, decoded_history,
                                    force_backend, random_bases, recording, reference_attention)
from tests.tiny_models import basis_samples, tiny_bases, tiny_model

FRACTION = 0.3
SHORT = 0.05  # the fed values made short: well under FRACTION of the median, so they are flagged
SINK, WINDOW = 2, 4


def short_values(full, gen, tokens: int = HISTORY_TOKENS, batch: int = BATCH) -> torch.Tensor:
    """Values drawn as the conformance matrix draws them, about one token-head in eight scaled to ``SHORT`` of its
    length around zero (what a secondary sink's value looks like)."""
    v = basis_samples(full["values"], batch, tokens, gen)
    pick = torch.rand(v.shape[:3], generator=gen) < 0.125
    return torch.where(pick[..., None], v * SHORT / v.norm(dim=-1, keepdim=True) * v.norm(dim=-1).median(), v)


def with_medians(full, gen) -> dict:
    """``full`` with the values' median length per head measured on a fresh sample (as calibration would)."""
    sample = basis_samples(full["values"], 4, 256, gen)
    median = sample.norm(dim=-1).transpose(0, 1).flatten(1).median(-1).values
    return {"keys": full["keys"], "values": replace(full["values"], norm_median=median)}


def sinks_layer(codec_name: str, gen, sliding_window: int | None = None):
    """A layer of the conformance codec ``codec_name`` keeping secondary sinks, fed a prefill; returns the layer, the
    bases and the fed keys and values."""
    keys, values = LOSSY[codec_name]
    full = with_medians(random_bases(gen), gen)
    layer_codec = LayerCodec(keys, values, sink=SINK, window=WINDOW)
    bases = {name: full[name].truncated(layer_codec.stream(name).rank) for name in full}
    layer = CompressedLayer(layer_codec, bases["keys"], bases["values"], flush_block=8, fast_path=lambda: True,
                            exact_dtype=torch.float32, secondary_sinks=FRACTION, sliding_window=sliding_window)
    k = basis_samples(full["keys"], BATCH, HISTORY_TOKENS, gen)
    v = short_values(full, gen)
    layer.update(k, v)
    return layer, full, k, v


def expected_flags(v: torch.Tensor, full, history: int, start: int = SINK) -> torch.Tensor:
    """[B, H, history] the token-heads of the history (fed from position ``start`` on) whose fed value is shorter
    than the threshold."""
    lengths = v[:, :, start : start + history].norm(dim=-1)
    return lengths < FRACTION * full["values"].norm_median[None, :, None]


def reference_history(layer, name: str, fed: torch.Tensor, flags: torch.Tensor, start: int = SINK) -> torch.Tensor:
    """The history decoded from the stored bytes in float64, the flagged token-heads replaced by what was fed."""
    history = flags.shape[-1]
    decoded = decoded_history(layer, name, history)
    return torch.where(flags[..., None], fed[:, :, start : start + history].double(), decoded)


def test_the_kept_token_heads_are_the_short_values():
    gen = torch.Generator().manual_seed(0)
    layer, full, _, v = sinks_layer("lloydmax-rms-log8", gen)
    history = layer.streams["keys"].length
    flags = expected_flags(v, full, history)
    assert 0 < int(flags.sum()) < flags.numel() / 4, "the fixture should flag some token-heads, not most"
    assert len(layer.exact_rows) == int(flags.sum())
    element = layer.exact_dtype.itemsize
    assert layer.nbytes()["secondary_sinks"] == int(flags.sum()) * (2 * 4 + 2 * v.shape[-1] * element)


@pytest.mark.parametrize("codec", ["uniform-token-fp16", "lloydmax-rms-log8", "vq"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len", [1, 20])
def test_attention_restores_the_kept_token_heads(codec, backend, q_len, monkeypatch):
    force_backend(monkeypatch, backend)
    gen = torch.Generator().manual_seed(3)
    layer, full, k, v = sinks_layer(codec, gen)
    history = layer.streams["keys"].length
    flags = expected_flags(v, full, history)
    held = {name: torch.cat([sink.double(), reference_history(layer, name, fed, flags), recent.double()], -2)
            for name, fed, sink, recent in (("keys", k, layer.sink_keys, layer.recent_keys),
                                            ("values", v, layer.sink_values, layer.recent_values))}
    k_new = basis_samples(full["keys"], BATCH, q_len, gen)
    v_new = short_values(full, gen, tokens=q_len)  # a long chunk's flush keeps rows past this call's history
    query = torch.randn(BATCH, Q_HEADS, q_len, k.shape[-1], generator=gen)
    keys, values = layer.update(k_new, v_new)
    if q_len > 16:
        assert int(layer.exact_rows.where.view()[..., 1].max()) >= history, "the fixture should flag a flushed new token"
    total = held["keys"].shape[-2] + q_len
    visible = torch.ones(q_len, total, dtype=torch.bool).tril_(total - q_len)[None, None]
    softcap = SOFTCAP if q_len == 1 else None
    with recording() as rec:
        got = attend(layer, query, keys, values, None, SCALING, softcap)
    ref = reference_attention(query, torch.cat([held["keys"], k_new.double()], -2),
                              torch.cat([held["values"], v_new.double()], -2), visible, softcap)
    assert_close_to_reference(got, ref)
    codes_only = {name: torch.cat([held[name][:, :, :SINK], decoded_history(layer, name, history),
                                   held[name][:, :, SINK + history :], new.double()], -2)
                  for name, new in (("keys", k_new), ("values", v_new))}
    unrestored = reference_attention(query, codes_only["keys"], codes_only["values"], visible, softcap)
    assert (unrestored - ref).abs().max() > 100 * 1e-4 * ref.abs().max(), "the kept rows should matter here"
    if backend == "triton" or q_len > 16 or codec == "vq":
        assert_fell_back(rec, backend)
    else:
        assert_served(rec, backend)


def assert_rebuilt_history(layer, full, k, v, gen, start: int = SINK) -> None:
    """The keys and values a stock kernel gets from ``layer`` (history rebuilt from the codes, what ``update``
    returns outside compressed attention) hold, at the history, the float64 reference over ``k``/``v`` as fed
    (``start``: the fed position of the first history token)."""
    history = layer.streams["keys"].length
    flags = expected_flags(v, full, history, start)
    assert len(layer.exact_rows) == int(flags.sum())
    new = {name: basis_samples(full[name], k.shape[0], 1, gen) for name in ("keys", "values")}
    keys, values = layer._materialized(new["keys"], new["values"])
    end = keys.shape[-2] - 1 - layer.recent_keys.shape[-2]  # [sink | history | recent | new], a window's tail
    shown = min(history, end)
    for name, got, fed in (("keys", keys, k), ("values", values, v)):
        ref = reference_history(layer, name, fed, flags, start)[:, :, history - shown :]
        err = (got[:, :, end - shown : end].double() - ref).abs().max().item()
        assert err <= 1e-5 * ref.abs().max().item(), f"{name}: rebuilt history off the reference by {err:.3g}"


@pytest.mark.parametrize("change", ["none", "reorder", "select", "repeat", "crop"])
def test_rebuilt_history_follows_batch_and_history_changes(change):
    gen = torch.Generator().manual_seed(5)
    layer, full, k, v = sinks_layer("uniform-token-fp16", gen)
    if change == "reorder":  # beam search: rows reordered and duplicated
        index = torch.tensor([1, 0, 1])
        layer.reorder_cache(index)
        k, v = k[index], v[index]
    elif change == "select":
        layer.batch_select_indices(torch.tensor([1]))
        k, v = k[1:], v[1:]
    elif change == "repeat":
        layer.batch_repeat_interleave(2)
        k, v = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
    elif change == "crop":  # into the compressed history
        layer.crop(-(layer.recent_keys.shape[-2] + 10))
    assert_rebuilt_history(layer, full, k, v, gen)


def test_rebuilt_history_follows_a_sliding_window():
    gen = torch.Generator().manual_seed(6)
    layer, full, k, v = sinks_layer("uniform-token-fp16", gen, sliding_window=40)
    steps = [short_values(full, gen, tokens=1) for _ in range(30)]
    keys = [basis_samples(full["keys"], BATCH, 1, gen) for _ in steps]
    layer.fast_path = lambda: False  # (the steps' attention is the stock kernel's; only the history is checked)
    for key, value in zip(keys, steps):
        layer.update(key, value)
    assert layer.dropped > SINK, "the window should have forgotten the sink tokens and some history"
    k, v = torch.cat([k, *keys], -2), torch.cat([v, *steps], -2)
    held = layer.held_tokens()
    assert_rebuilt_history(layer, full, k, v, gen, start=k.shape[-2] - held)


# --- a whole model through a preset -----------------------------------------------------------------------------
CAL = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": 2}
MODEL_FRACTION = 0.6  # the tiny random model's value lengths are spread narrowly: a high threshold still flags few


@pytest.fixture(scope="module")
def sinks_preset(tmp_path_factory):
    from kvhub import KVPreset

    model = tiny_model("llama")
    model.config._name_or_path = "test/tiny-llama"
    shape = ModelShape.from_config(model.config)
    codec = replace(CacheCodec.uniform(shape, 4, 2, sink=2, window=8), secondary_sinks=MODEL_FRACTION)
    folder = tmp_path_factory.mktemp("preset") / "sinks"
    KVPreset.create(model.config, codec, tiny_bases(model), CAL, "test/tiny-llama").save_pretrained(folder)
    return model, folder


def test_a_preset_keeps_its_threshold_and_medians(sinks_preset):
    from safetensors.torch import load_file

    from kvhub import KVPreset
    from kvhub.preset import BASES_NAME

    model, folder = sinks_preset
    preset = KVPreset.from_pretrained(folder)
    assert preset.codec.secondary_sinks == MODEL_FRACTION
    stored = load_file(folder / BASES_NAME)
    medians = {k for k in stored if k.endswith("norm_median")}
    assert medians == {f"layers.{i}.values.norm_median" for i in range(model.config.num_hidden_layers)}
    assert all((stored[k] > 0).all() for k in medians)
    card = (folder / "README.md").read_text()
    assert f"shorter than {MODEL_FRACTION:g} of its layer and head's calibrated median" in card


def test_a_preset_without_secondary_sinks_stores_no_medians(tmp_path):
    from safetensors.torch import load_file

    from kvhub import KVPreset
    from kvhub.preset import BASES_NAME

    model = tiny_model("llama")
    codec = CacheCodec.uniform(ModelShape.from_config(model.config), 4, 2)
    KVPreset.create(model.config, codec, tiny_bases(model), CAL, "test/tiny-llama").save_pretrained(tmp_path / "p")
    assert not [k for k in load_file(tmp_path / "p" / BASES_NAME) if "norm_median" in k]


def test_the_model_keeps_what_its_first_layer_flags_and_counts_the_bytes(sinks_preset):
    """Layer 0's values depend on the tokens alone, so DynamicCache's tell which of its token-heads the compressed
    cache must keep; the rows' bytes are part of the total and of what is allocated."""
    from transformers import DynamicCache

    from kvhub import KVPreset
    from kvhub.cache import shared_storages, walked_nbytes

    model, folder = sinks_preset
    preset = KVPreset.from_pretrained(folder)
    ids = torch.randint(3, 128, (2, 96), generator=torch.Generator().manual_seed(2))
    stock = DynamicCache(config=model.config)
    cache = CompressedCache(model.config, preset.codec, preset.bases)
    with torch.no_grad():
        model(input_ids=ids, cache=stock, use_cache=True)
        with compressed_attention(model):
            for a in range(0, 96, 16):
                model(input_ids=ids[:, a : a + 16], cache=cache, use_cache=True)
    layer = cache.layers[0]
    history = layer.streams["keys"].length
    values = stock.layers[0].values[:, :, 2 : 2 + history]
    expected = values.norm(dim=-1) < MODEL_FRACTION * preset.bases[(0, "values")].norm_median[None, :, None]
    assert 0 < int(expected.sum()) == len(layer.exact_rows)
    parts = cache.nbytes()
    assert parts["secondary_sinks"] == sum(len(x.exact_rows) for x in cache.layers) * (8 + 2 * values.shape[-1] * 2)  # int32 pair, fp16 K and V
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert cache.reserved_nbytes() == pytest.approx(walked_nbytes(cache, set(shared_storages(cache.bases))), rel=1e-9)


def test_the_codec_refuses_a_threshold_out_of_range_and_bases_without_medians():
    model = tiny_model("llama")
    shape = ModelShape.from_config(model.config)
    with pytest.raises(CodecError, match="secondary_sinks"):
        replace(CacheCodec.uniform(shape, 4, 2), secondary_sinks=1.5).check(shape)
    bases = tiny_bases(model)
    stripped = Bases({k: replace(b, norm_median=None) for k, b in bases.items()})
    with pytest.raises(CodecError, match="median"):
        CompressedCache(model.config, replace(CacheCodec.uniform(shape, 4, 2), secondary_sinks=0.3), stripped)


def test_lmcache_chunks_refuse_a_preset_with_secondary_sinks(sinks_preset):
    from kvhub import KVPreset
    from kvhub.integrations.chunks import ChunkCodec

    with pytest.raises(CodecError, match="secondary sinks"):
        ChunkCodec(KVPreset.from_pretrained(sinks_preset[1]))

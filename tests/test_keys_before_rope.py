"""Keys coded before RoPE (:mod:`kvhub.rope`, ``CacheCodec.keys_before_rope``), on tiny random models of every
supported architecture: the frame is each model's own RoPE (against transformers' rotary modules), the machinery is
lossless with 16-bit codes (against DynamicCache), what is coded is ``k_proj``'s output (a hook on the model), and a
lossy decode step reads the codes as a float64 recomputation with transformers' RoPE does. Quality is measured on the
real checkpoint elsewhere (``benchmarks/presets/smollm2-3pct-prerope``)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from kvhub import CompressedCache, KVPreset, ModelShape, backends, compressed_attention
from kvhub.calibration import calibrate
from kvhub.errors import CodecError
from kvhub.integrations.chunks import ChunkCodec
from kvhub.rope import RopeFrameError, RotaryFrame
from kvhub.positions import POSITION_DTYPE
from kvhub.tuning import search
from tests.test_engine import EXACT, forward_loop, lossless
from tests.test_user_paths import lossy_codec
from tests.tiny_models import ARCHS, VOCAB, tiny_model

SINK = 2


def prerope_bases(model):
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, VOCAB, (1, 64), generator=gen) for _ in range(4)]
    return calibrate(model, windows, sink=SINK, progress=False, keys_before_rope=True)[0]


def before_rope(codec):
    return replace(codec, keys_before_rope=True)


def setup(arch: str = "llama"):
    model = tiny_model(arch)
    shape = ModelShape.from_config(model.config)
    codec = before_rope(lossy_codec(shape, sink=SINK))
    return model, codec, prerope_bases(model).rotated_for(codec, shape)


# --- the frame ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_frame_is_the_models_own_rope(arch):
    model = tiny_model(arch)
    positions = torch.tensor([[0, 1, 7, 300, 4095], [5, 5, 9, 10, 11]])
    x = torch.randn(2, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = model.model.rotary_emb(x, positions)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    frame = RotaryFrame.from_config(model.config)
    torch.testing.assert_close(frame.turn(x, positions), want)
    torch.testing.assert_close(frame.unturn(want, positions), x, atol=1e-5, rtol=1e-5)


def test_turning_the_halves_of_each_pair_is_bit_identical_to_transformers_formula():
    """The frame turns the two halves of each channel pair without ``rotate_half``'s copy; stored keys must not move
    by a bit against transformers' ``x * cos + rotate_half(x) * sin`` (and its inverse) over the same angles, with
    and without a scaled cos and sin."""
    from transformers.models.llama.modeling_llama import rotate_half

    gen = torch.Generator().manual_seed(2)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    x = torch.randn(2, 3, 300, 64, generator=gen) * 5
    positions = torch.randint(0, 8192, (2, 300), generator=gen)
    emb = torch.cat([positions[..., None].float() * inv_freq] * 2, -1)[:, None]
    cos, sin = emb.cos(), emb.sin()
    for scaling in (1.0, 1.25):
        frame = RotaryFrame(inv_freq, scaling)
        assert torch.equal(frame.turn(x, positions), (x * cos + rotate_half(x) * sin) * scaling)
        assert torch.equal(frame.unturn(x, positions), (x * cos - rotate_half(x) * sin) / scaling)


@pytest.mark.parametrize("params", [
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
])
def test_scaled_rope_types_are_the_models_own(params):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=1024,
                         rope_parameters=params)
    positions = torch.tensor([[0, 3, 200, 900]])
    x = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(1))
    cos, sin = LlamaRotaryEmbedding(config)(x, positions)
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    frame = RotaryFrame.from_config(config)
    torch.testing.assert_close(frame.turn(x, positions), want)
    torch.testing.assert_close(frame.unturn(want, positions), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
])
def test_rope_that_cannot_be_undone_per_position_is_refused(params):
    config = LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4, head_dim=16,
                         rope_parameters=params)
    codec = before_rope(lossless(tiny_model("llama")))
    with pytest.raises(RopeFrameError, match="fix: keep its keys coded after RoPE"):
        CompressedCache(config, replace(codec, layers=codec.layers[:1]))


# --- the machinery, against independent references ------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_lossless_codes_before_rope_read_as_dynamic_cache(arch):
    """16-bit codes before RoPE, rebuilt for the model's kernel and read by kvhub's attention: DynamicCache's logits,
    sliding layers included (they forget tokens with their positions)."""
    model = tiny_model(arch)
    codec, bases = before_rope(lossless(model)), prerope_bases(model)
    ids = torch.randint(3, VOCAB, (1, 72), generator=torch.Generator().manual_seed(5))
    ref = forward_loop(model, ids, DynamicCache(config=model.config))
    rebuilt = forward_loop(model, ids, CompressedCache(model.config, codec, bases, torch.float32))
    with compressed_attention(model):
        cache = CompressedCache(model.config, codec, bases, torch.float32)
        read = forward_loop(model, ids, cache)
    assert (ref - rebuilt).abs().max().item() <= EXACT
    assert (ref - read).abs().max().item() <= EXACT
    assert all(layer.streams["keys"].length > 0 for layer in cache.layers)


def test_what_is_coded_is_the_key_before_rope():
    """The stored codes, projected back without turning, are layer 0's ``k_proj`` output at each stored position."""
    model = tiny_model("llama")
    codec = before_rope(lossless(model, sink=SINK))
    cache = CompressedCache(model.config, codec, prerope_bases(model), torch.float32)
    raw = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: raw.append(out))
    ids = torch.randint(3, VOCAB, (1, 72), generator=torch.Generator().manual_seed(6))
    forward_loop(model, ids, cache)
    hook.remove()
    shape = ModelShape.from_config(model.config)
    k_proj = torch.cat(raw, 1).view(1, 72, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
    stream = cache.layers[0].streams["keys"]
    coded = stream.rows() @ stream.plan().matrix.transpose(-1, -2)
    torch.testing.assert_close(coded, k_proj[:, :, SINK : SINK + stream.length], atol=1e-5, rtol=1e-5)
    assert torch.equal(stream.stored_positions()[0], torch.arange(SINK, SINK + stream.length, dtype=POSITION_DTYPE))


def _reference_keys(model, layer) -> torch.Tensor:
    """The layer's held keys in float64 from its codes: rows times the plan's matrix, turned by transformers' RoPE at
    the stored positions, between the exact sink and recent tokens."""
    stream = layer.streams["keys"]
    unturned = stream.rows().double() @ stream.plan().matrix.double().transpose(-1, -2)
    positions = stream.stored_positions().long()
    cos, sin = model.model.rotary_emb(unturned, positions)
    turned, _ = apply_rotary_pos_emb(unturned, unturned, cos.double(), sin.double())
    return torch.cat([layer.sink_keys.double(), turned, layer.recent_keys.double()], 2)


def test_a_lossy_decode_step_reads_the_codes_as_a_float64_recomputation():
    """With 4/2-bit codes, a decode step through kvhub's attention gives the logits of the model's own attention over
    keys and values recomputed from the stored codes in float64 (transformers' RoPE, not kvhub's frame)."""
    model, codec, bases = setup()
    ids = torch.randint(3, VOCAB, (1, 61), generator=torch.Generator().manual_seed(7))
    cache = CompressedCache(model.config, codec, bases)
    with torch.no_grad():
        model(input_ids=ids[:, :60], cache=cache, use_cache=True)
        reference = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            assert layer.streams["keys"].length > 0
            values = torch.cat([layer.sink_values.double(), layer.streams["values"].decode(torch.float64),
                                layer.recent_values.double()], 2)
            reference.update(_reference_keys(model, layer).float(), values.float(), i)
        want = model(input_ids=ids[:, 60:], cache=reference, use_cache=True).logits
        with compressed_attention(model):
            got = model(input_ids=ids[:, 60:], cache=cache, use_cache=True).logits
    assert (want - got).abs().max().item() <= 1e-4


def test_padded_batch_rows_match_their_solo_runs():
    """Each row keeps its own positions: a left-padded row codes its keys as the prompt alone does, and generates
    what it generates alone, with lossy codes."""
    model, codec, bases = setup()
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randint(3, VOCAB, (1, 40), generator=gen), torch.randint(3, VOCAB, (1, 25), generator=gen)
    kw = dict(max_new_tokens=12, do_sample=False)
    caches = [CompressedCache(model.config, codec, bases) for _ in range(3)]
    with compressed_attention(model):
        solo = [model.generate(x, attention_mask=torch.ones_like(x), cache=c, **kw)[0, x.shape[1]:]
                for x, c in zip((a, b), caches)]
        batch = torch.cat([a, torch.cat([torch.zeros(1, 15, dtype=torch.long), b], 1)])
        mask = torch.cat([torch.ones(1, 40), torch.cat([torch.zeros(1, 15), torch.ones(1, 25)], 1)]).long()
        out = model.generate(batch, attention_mask=mask, cache=caches[2], **kw)
    assert torch.equal(out[0, 40:], solo[0]) and torch.equal(out[1, 40:], solo[1])
    # the padded row's coded real tokens (behind its 15 pads) sit at the positions b's tokens have alone
    alone, padded = caches[1].layers[0].streams["keys"], caches[2].layers[0].streams["keys"]
    real = padded.stored_positions()[1, 15:]
    assert len(real) > 10 and torch.equal(real, alone.stored_positions()[0, : len(real)])


def test_beam_search_matches_dynamic_cache():
    """Beams reorder the stored positions with the codes."""
    model = tiny_model("llama")
    codec, bases = before_rope(lossless(model)), prerope_bases(model)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, **kw)
    new = model.generate(ids, cache=CompressedCache(model.config, codec, bases, torch.float32), **kw)
    assert torch.equal(ref, new)


def test_a_run_of_positions_costs_one_origin_per_row_whatever_the_length():
    """Unpadded rows run on by one position per token: what the positions cost does not grow with the history."""
    model, codec, bases = setup()
    held = []
    for length in (50, 150):
        ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(8))
        cache = CompressedCache(model.config, codec, bases)
        forward_loop(model, ids, cache, prefill=30)
        held.append(cache.nbytes())
        assert cache.reserved_nbytes() >= held[-1]["total"]
    assert held[0]["positions"] == held[1]["positions"] > 0
    assert held[1]["codes"] > 2 * held[0]["codes"]
    for n in held:
        assert n["total"] == n["codes"] + n["scales"] + n["full_precision"] + n["positions"]


def test_a_padded_row_keeps_one_position_per_token_and_counts_them():
    """A left-padded row's pads sit at position 1, which breaks the run: from then on every coded token keeps a
    4-byte position per row, in ``nbytes`` and the allocation."""
    model, codec, bases = setup()
    ids = torch.randint(3, VOCAB, (2, 60), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = CompressedCache(model.config, codec, bases)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=20, do_sample=False)
    coded = sum(layer.streams["keys"].length for layer in cache.layers)
    assert coded > 0 and cache.nbytes()["positions"] >= 4 * 2 * coded
    assert cache.reserved_nbytes() >= cache.nbytes()["total"]


@pytest.mark.parametrize("steps", [
    [torch.arange(0, 5), torch.arange(5, 9)],  # a run throughout
    [torch.arange(3, 8), torch.tensor([1, 1, 8, 9])],  # broken at the second append
    [torch.tensor([1, 1, 0, 1, 2]), torch.arange(3, 7)],  # broken from the first
])
def test_stored_positions_read_back_what_was_appended_through_the_housekeeping(steps):
    """Against a plain tensor of the same positions: appends, a beam reorder, a crop, a sliding window's drop."""
    from kvhub.positions import StoredPositions

    rows = torch.tensor([[0], [100]])
    held, plain = StoredPositions(), torch.zeros(2, 0, dtype=torch.long)
    for step in steps:
        held.append(step + rows)
        plain = torch.cat([plain, step + rows], -1)
    assert torch.equal(held.view().long(), plain)
    held.map_batch(lambda t: t.index_select(0, torch.tensor([1, 1])))
    plain = plain[[1, 1]]
    held.truncate(7)
    plain = plain[:, :7]
    held.drop_front(3)
    plain = plain[:, 3:]
    assert torch.equal(held.view().long(), plain) and torch.equal(held.view(1, 2).long(), plain[:, 1:3])
    held.append(plain[:, -1:] + 1)  # one more token after the last one
    assert torch.equal(held.view().long(), torch.cat([plain, plain[:, -1:] + 1], -1))


def test_decode_steps_are_scored_on_the_pytorch_backend_and_say_why():
    model, codec, bases = setup()
    ids = torch.randint(3, VOCAB, (1, 45), generator=torch.Generator().manual_seed(9))
    with compressed_attention(model), backends.recording() as log:
        forward_loop(model, ids, CompressedCache(model.config, codec, bases), prefill=40)
    assert set(log.calls) == {"torch"}
    if backends.BACKENDS["native"].unavailable(torch.device("cpu")) is None:
        assert any(name == "native" and "before RoPE" in why for name, why in log.fallbacks)


# --- presets, tuner, what cannot take it -----------------------------------------------------------------------------
def test_a_preset_keeps_the_flag_and_one_without_it_does_not_write_it(tmp_path):
    model, codec, bases = setup()
    calibration = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": SINK}
    for flag in (True, False):
        folder = tmp_path / str(flag)
        KVPreset.create(model.config, replace(codec, keys_before_rope=flag), bases, calibration,
                        "test/tiny").save_pretrained(folder)
        written = json.loads((folder / "kvhub_preset.json").read_text())["codec"]
        assert written.get("keys_before_rope", "absent") == (True if flag else "absent")
        assert KVPreset.from_pretrained(folder).codec.keys_before_rope is flag
        assert ("Keys are coded before RoPE" in (folder / "README.md").read_text()) is flag


def test_chunks_for_lmcache_refuse_keys_coded_before_rope(tmp_path):
    model, codec, bases = setup()
    calibration = {"corpus": "random", "corpus_sha256": "0" * 64, "tokens": 256, "seq_len": 64, "sink": SINK}
    preset = KVPreset.create(model.config, codec, bases, calibration, "test/tiny")
    with pytest.raises(CodecError, match="before RoPE.*fix:"):
        ChunkCodec(preset)


def test_the_tuner_searches_codecs_that_code_keys_before_rope():
    model = tiny_model("llama")
    bases = prerope_bases(model)
    windows = [torch.randint(3, VOCAB, (1, 160), generator=torch.Generator().manual_seed(s)) for s in (10, 11)]
    result = search(model, bases, {"random": windows}, target_delta=0.05, sink=SINK, windows=(0,), flush_block=4,
                    log=lambda line: None, keys_before_rope=True)
    assert result.trials and all(t.codec.keys_before_rope for t in result.trials)
    assert result.codec.keys_before_rope


def test_the_fused_kernels_refuse_keys_coded_before_rope():
    from kvhub.kernels import decode_attention

    model, codec, bases = setup()
    cache = CompressedCache(model.config, codec, bases)
    forward_loop(model, torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3)), cache, prefill=39)
    layer = cache.layers[0]
    query = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="coded before it"):
        decode_attention(query, layer.streams["keys"], layer.streams["values"], layer.streams["keys"].length,
                         layer.recent_keys, layer.recent_values, None, None, 0.25)

"""The kvhub serde inside LMCache (issue 16), on real SmolLM2 K/V from a forward pass over evaluation text.

Runs only where the ``lmcache`` extra is installed (``bash scripts/test-lmcache.sh`` builds .venv-lmcache and runs
``pytest -m lmcache``); elsewhere the whole module is skipped. End to end means LMCache's own ``StorageManager`` ->
store controller -> serde -> ``fs`` adapter -> eviction from L1 -> prefetch -> deserialize -> read, on CPU."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

lmcache = pytest.importorskip("lmcache")

from transformers import DynamicCache  # noqa: E402

from kvhub import KVPreset, load_model  # noqa: E402
from kvhub.eval import ppl  # noqa: E402
from kvhub.errors import (  # noqa: E402
    ChunkFormatError,
    ChunkPresetMismatchError,
    ChunkShapeError,
    ChunkTruncatedError,
    CodecError,
)
from kvhub.integrations.chunks import HEADER_BYTES, ChunkCodec, HeadSlice, from_chunks, to_chunks  # noqa: E402
from kvhub.integrations.lmcache import SERDE_TYPE, create_serde  # noqa: E402
from kvhub.integrations.lmcache_disk import DiskStore  # noqa: E402
from kvhub.text import read_texts, token_windows  # noqa: E402
from tests.paths import BOOKS_TUNED, EVALUATION, PRESETS, ROOT  # noqa: E402

pytestmark = pytest.mark.lmcache

# the attention form takes presets whose keys are coded after RoPE, without secondary sinks: the books-tuned preset
# (bundled until 2026-12-07); the bundled preset stores its chunks in the storage form, with the same storage codec
PRESET = BOOKS_TUNED
BUNDLED = PRESETS / "HuggingFaceTB--SmolLM2-135M-Instruct"
CHUNK = 256  # LMCache's default chunk size
PREFIX, CONTINUATION = 2 * CHUNK, 64


@pytest.fixture(scope="module")
def smollm2():
    return load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(scope="module")
def window(smollm2):
    _, tok = smollm2
    return token_windows(tok, dict(read_texts([EVALUATION]))["austen_emma"], PREFIX + CONTINUATION, 1)[0]


@pytest.fixture(scope="module")
def chunks(smollm2, window):
    """The prefix's K/V as two fp16 LMCache chunks (the first holds position 0, hence the attention sinks)."""
    model, _ = smollm2
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=window[:, :PREFIX], cache=cache, use_cache=True)
    return to_chunks([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], CHUNK), cache


@pytest.fixture(scope="module")
def preset():
    return KVPreset.from_pretrained(PRESET)


def kvhub_serde(**extra):
    return {"type": SERDE_TYPE, "preset": str(PRESET), **extra}


def fp16(chunks):
    return [c.half() for c in chunks]


def continuation_nll(model, window, keys, values):
    """Mean NLL of the continuation after a prefix whose K/V are given, read through a plain DynamicCache."""
    r = ppl.continuation_nll(model, window[:, PREFIX:], keys, values)
    return r.nll_sum / r.tokens


def round_trip(tmp_path, serde, chunks):
    """Store, evict from L1, prefetch from disk, read: returns (restored chunks, bytes on disk per chunk)."""
    with DiskStore(tmp_path, serde) as store:
        keys = [store.key(c, bytes([i])) for i, c in enumerate(chunks)]
        reported = store.put(chunks, keys)
        store.evict(keys)
        restored = store.get(keys, chunks[0].shape, chunks[0].dtype)
    on_disk = sorted(p.stat().st_size for p in tmp_path.glob("*.data"))
    assert sorted(reported.values()) == on_disk  # what LMCache says it wrote is what the folder holds
    return restored, on_disk


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --- end to end ---------------------------------------------------------------------------------------------------
def test_store_evict_prefetch_read_on_real_kv(smollm2, window, chunks, preset, tmp_path):
    model, _ = smollm2
    raw, exact_cache = chunks
    src = fp16(raw)
    fp16_bytes = src[0].numel() * 2
    restored, on_disk = round_trip(tmp_path / "kvhub", kvhub_serde(), src)
    fp8, fp8_disk = round_trip(tmp_path / "fp8", {"type": "fp8"}, src)
    assert restored is not None and fp8 is not None

    # Bytes, from the preset's layout by hand: per layer 4 exact tokens (int16 index + 3 heads x K,V x 64 x 2 bytes)
    # and 252 coded tokens x 3 heads x (K 64x4 bits + 1 one-byte log8 scale, V 32x4 + 32x2 bits + 2 scales = 33 + 26
    # bytes);
    # a 64-byte header. >= 3.5x under the fp16 chunk and ~2x under fp8's one byte per element.
    assert on_disk == [64 + 30 * (4 * 2 + 4 * 3 * 2 * 64 * 2 + 252 * 3 * (33 + 26))] * 2
    assert fp8_disk == [src[0].numel()] * 2
    assert fp16_bytes / on_disk[0] >= 3.5 and fp8_disk[0] / on_disk[0] >= 1.9

    # Reconstruction (relative Frobenius error; measured here K 0.064-0.067, V 0.18-0.19, fp8 0.026): K 4-bit, V
    # 4/2-bit; fp8 is finer and 2x bigger. The sink tokens of chunk 0 come back exact.
    for got, ref in zip(restored, src):
        for s, limit in ((0, 0.10), (1, 0.25)):
            assert 0 < rel_err(got[s], ref[s]) < limit, (s, rel_err(got[s], ref[s]))
    assert torch.equal(restored[0][:, :, :4], src[0][:, :, :4])
    assert rel_err(fp8[1], src[1]) < rel_err(restored[1], src[1])

    # The reuse case: the continuation read against the restored prefix in a kvhub-free DynamicCache.
    exact = continuation_nll(model, window, [la.keys for la in exact_cache.layers], [la.values for la in exact_cache.layers])
    reused = continuation_nll(model, window, *from_chunks(restored, 64))
    assert abs(reused - exact) / exact < 0.01, (exact, reused)  # measured: -0.08% on this window


# --- refused inputs -----------------------------------------------------------------------------------------------
def another_preset(preset, tmp_path):
    """The same codec and bases under another config: decoding its chunks would even look right, so only the
    digest can refuse them."""
    folder = tmp_path / "other-preset"
    shutil.copytree(PRESET, folder)
    config = json.loads((folder / "kvhub_preset.json").read_text())
    config["calibration"]["tokens"] += 1
    (folder / "kvhub_preset.json").write_text(json.dumps(config))
    return folder


def test_chunk_from_another_preset_is_refused(chunks, preset, tmp_path):
    src = fp16(chunks[0])[:1]
    with DiskStore(tmp_path / "store", kvhub_serde()) as store:
        keys = [store.key(src[0])]
        store.put(src, keys)
    other = another_preset(preset, tmp_path)
    with DiskStore(tmp_path / "store", kvhub_serde(preset=str(other))) as store:
        assert store.get(keys, src[0].shape, src[0].dtype) is None  # LMCache reports a miss: no garbage KV
    buf = (tmp_path / "store").glob("*.data").__next__().read_bytes()
    with pytest.raises(ChunkPresetMismatchError, match="another preset"):
        ChunkCodec(KVPreset.from_pretrained(other)).decode(torch.frombuffer(bytearray(buf), dtype=torch.uint8),
                                                           torch.empty_like(src[0]), HeadSlice(0, 3))


def test_a_chunk_of_another_model_is_refused_even_when_shapes_match(chunks, preset, tmp_path):
    """The serde's preset is for SmolLM2; an engine serving another model of the same shapes keys its chunks with
    that model's name: the serde refuses to store them, and refuses to read one stored under that name, unless the
    serde's `model` option says the engine's name is this preset's model."""
    from lmcache.v1.distributed.api import ObjectKey

    from kvhub.integrations.lmcache import KVHubSerializer

    src = fp16(chunks[0])[:1]
    other = "other-org/Same-Shapes-Model"
    with DiskStore(tmp_path / "a", kvhub_serde(), model_name=other, timeout_s=5) as store:
        with pytest.raises(Exception, match="stored 0 of 1"):
            store.put(src, [store.key(src[0])])
    with DiskStore(tmp_path / "b", kvhub_serde(model=other)) as store:  # told the engine's name: stored
        keys = [store.key(src[0])]
        store.put(src, keys)
        store.evict(keys)
    with DiskStore(tmp_path / "b", kvhub_serde(), model_name=other) as store:  # the same files, default serde
        assert store.get(keys, src[0].shape, src[0].dtype) is None  # refused on read: a miss, never garbage
    serializer = KVHubSerializer(ChunkCodec(preset), None, None, preset.base_model["id"])
    with pytest.raises(ChunkPresetMismatchError, match=f"a chunk of model '{other}'.*\"model\": \"{other}\""):
        serializer.heads(ObjectKey(chunk_hash=b"0" * 16, model_name=other, kv_rank=0), 192)
    assert serializer.heads(ObjectKey(chunk_hash=b"0" * 16, model_name=preset.base_model["id"].lower(), kv_rank=0),
                            192) == HeadSlice(0, 3)
    with pytest.raises(CodecError, match="'model' must be a model name"):
        create_serde({"preset": str(PRESET), "model": ""})


def test_truncated_file_is_refused(chunks, preset, tmp_path):
    src = fp16(chunks[0])[:1]
    with DiskStore(tmp_path, kvhub_serde()) as store:
        keys = [store.key(src[0])]
        store.put(src, keys)
        store.evict(keys)
        path = next(tmp_path.glob("*.data"))
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        assert store.get(keys, src[0].shape, src[0].dtype) is None
    codec = ChunkCodec(preset)
    for cut in (10, HEADER_BYTES + 100, len(data) - 1):
        with pytest.raises(ChunkTruncatedError, match="truncated"):
            codec.decode(torch.frombuffer(bytearray(data[:cut]), dtype=torch.uint8), torch.empty_like(src[0]), HeadSlice(0, 3))


def test_shape_mismatch_is_refused(chunks, preset, tmp_path):
    src = fp16(chunks[0])[0]
    codec = ChunkCodec(preset)
    buf = torch.empty(codec.nbytes(src.shape, src.dtype, HeadSlice(0, 3)), dtype=torch.uint8)
    codec.encode(src, buf, HeadSlice(0, 3))
    for wrong in (src[:, :, :128], src[:, :29], src[..., :128]):
        with pytest.raises(ChunkShapeError):
            codec.decode(buf, torch.empty_like(wrong), HeadSlice(0, wrong.shape[-1] // 64))
    with pytest.raises(ChunkShapeError, match="layers"):
        codec.encode(src[:, :29].contiguous(), buf, HeadSlice(0, 3))
    with pytest.raises(ChunkShapeError, match="head_dim"):
        codec.encode(src[..., :100].contiguous(), buf, HeadSlice(0, 3))
    bad = buf.clone()
    bad[:4] = torch.tensor(list(b"XXXX"), dtype=torch.uint8)
    with pytest.raises(ChunkFormatError, match="not a kvhub chunk"):
        codec.decode(bad, torch.empty_like(src), HeadSlice(0, 3))
    with DiskStore(tmp_path, kvhub_serde()) as store:  # through LMCache: a read with another layout is a miss
        keys = [store.key(src)]
        store.put([src], keys)
        store.evict(keys)
        assert store.get(keys, torch.Size([2, 30, 128, 192]), torch.float16) is None


def test_serde_config_errors_are_typed():
    with pytest.raises(CodecError, match="unknown kvhub serde option"):
        create_serde({"preset": str(PRESET), "presett": 1})
    with pytest.raises(CodecError, match="needs 'preset'"):
        create_serde({})
    with pytest.raises(CodecError, match="exact"):
        create_serde({"preset": str(PRESET), "exact": -1})
    with pytest.raises(CodecError, match="between 0 and 32767") as refused:
        create_serde({"preset": str(PRESET), "exact": 40000})
    assert "storage form" not in str(refused.value)  # the storage form is no fix for a bad option
    with pytest.raises(CodecError, match="tp_size"):
        create_serde({"preset": str(PRESET), "tp_rank": 1})
    from lmcache.v1.distributed.serde import get_registered_serde_types

    assert SERDE_TYPE in get_registered_serde_types()


# --- sinks and tensor parallelism -----------------------------------------------------------------------------------
def encode_decode(preset, src, **kw):
    codec = ChunkCodec(preset, **kw)
    buf = torch.empty(codec.nbytes(src.shape, src.dtype, HeadSlice(0, 3)), dtype=torch.uint8)
    assert codec.encode(src, buf, HeadSlice(0, 3)) == buf.numel()
    out = torch.empty_like(src)
    codec.decode(buf, out, HeadSlice(0, 3))
    return out, buf.numel()


def test_first_tokens_of_every_chunk_are_kept_exact(chunks, preset):
    """A chunk has no position, so each keeps its first ``exact`` tokens (default: the preset's sink, 4) at 16 bits in
    every layer; ``exact=0`` keeps none and saves exactly their 16-bit cost minus their codes."""
    for src in fp16(chunks[0]):
        out, n = encode_decode(preset, src)
        assert torch.equal(out[:, :, :4], src[:, :, :4]) and not torch.equal(out[:, :, 4:8], src[:, :, 4:8])
        none, n0 = encode_decode(preset, src, exact=0)
        assert not torch.equal(none[:, :, :4], src[:, :, :4])
        # per layer: 4 int16 indices + 4 tokens x 3 heads x (K+V 64 x 2 bytes exact - 59 bytes of codes and scales)
        assert n - n0 == 30 * (4 * 2 + 4 * 3 * (256 - 59))


def test_tensor_parallel_ranks_encode_their_head_slice(chunks, preset, tmp_path):
    """TP=3 on SmolLM2 (3 KV heads): each rank stores its head under its kv_rank and decodes it back to exactly what
    the single-rank chunk decodes to for that head."""
    src = fp16(chunks[0])[0]
    whole, _ = encode_decode(preset, src)
    with DiskStore(tmp_path, kvhub_serde()) as store:
        for rank in range(3):
            part = src[..., rank * 64 : (rank + 1) * 64].contiguous()
            keys = [store.key(part, rank=rank, world=3)]
            store.put([part], keys)
            store.evict(keys)
            got = store.get(keys, part.shape, part.dtype)
            assert got is not None and torch.equal(got[0], whole[..., rank * 64 : (rank + 1) * 64])
    assert HeadSlice.for_rank(3, 1, 5, 6) == HeadSlice(2, 1)  # more ranks than KV heads: vLLM replicates heads
    with pytest.raises(ChunkShapeError, match="tensor-parallel"):
        HeadSlice.for_rank(3, 2, 0, 2)


def test_bf16_chunks_keep_their_dtype(chunks, preset):
    """vLLM serves in bf16: exact tokens and the decoded chunk stay bf16, at the same bytes as an fp16 chunk."""
    src = chunks[0][0].bfloat16()
    out, n = encode_decode(preset, src)
    assert out.dtype == torch.bfloat16 and torch.equal(out[:, :, :4], src[:, :, :4])
    assert n == encode_decode(preset, src.half())[1]
    assert rel_err(out[0], src[0]) < 0.10 and rel_err(out[1], src[1]) < 0.25


# --- the storage form (issue 24) ------------------------------------------------------------------------------------
def storage_serde(budget, preset=BUNDLED, **extra):
    return kvhub_serde(form="storage", budget=budget, preset=str(preset), **extra)


def storage_layout_bytes(preset, budget, tokens=CHUNK):
    """The stored chunk's size counted here from the layout in kvhub/integrations/storage_chunks.py: header, the
    first token of each layer's K and V at 16 bits, and per group and bit width b the n_b coefficients' codes of the
    other tokens, b bits each, rounded up to whole bytes per run."""
    section = json.loads((BUNDLED / "kvhub_preset.json").read_text())["storage"]
    exact = section["exact_tokens"]
    bits = preset.storage.budgets[budget]
    runs = sum(-(-int((b == w).sum()) * (tokens - exact) * w // 8) for b in bits for w in range(1, 9))
    return 64 + 2 * 30 * exact * 192 * 2 + runs


@pytest.mark.parametrize("budget", ["10x", "16x"])
def test_storage_form_round_trip_through_lmcache(smollm2, window, chunks, preset, tmp_path, budget):
    model, _ = smollm2
    raw, exact_cache = chunks
    src = fp16(raw)
    restored, on_disk = round_trip(tmp_path, storage_serde(budget), src)
    assert restored is not None
    assert on_disk == [storage_layout_bytes(preset, budget)] * 2
    assert src[0].numel() * 2 / on_disk[0] >= float(budget[:-1])  # every byte on disk counted
    assert torch.equal(restored[0][:, :, :1], src[0][:, :, :1])  # the sink token of chunk 0 comes back exact
    exact = continuation_nll(model, window, [la.keys for la in exact_cache.layers], [la.values for la in exact_cache.layers])
    reused = continuation_nll(model, window, *from_chunks(restored, 64))
    assert abs(reused - exact) / exact < {"10x": 0.05, "16x": 0.10}[budget], (exact, reused)


def test_storage_form_refuses_another_preset_budget_and_truncation(chunks, preset, tmp_path):
    src = fp16(chunks[0])[:1]
    with DiskStore(tmp_path / "store", storage_serde("10x")) as store:
        keys = [store.key(src[0])]
        store.put(src, keys)
    other = KVPreset.from_pretrained(BUNDLED)  # another storage codec: the same but one group's mean moved
    other.storage.groups[0].mean += 0.01
    other = other.save_pretrained(tmp_path / "other-storage")
    with DiskStore(tmp_path / "store", storage_serde("10x", preset=str(other))) as store:
        assert store.get(keys, src[0].shape, src[0].dtype) is None  # a miss, never another preset's KV
    with DiskStore(tmp_path / "store", kvhub_serde()) as store:  # the attention form does not read storage chunks
        assert store.get(keys, src[0].shape, src[0].dtype) is None
    path = next((tmp_path / "store").glob("*.data"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with DiskStore(tmp_path / "store", storage_serde("10x")) as store:
        assert store.get(keys, src[0].shape, src[0].dtype) is None
    from kvhub.integrations.storage_chunks import StorageChunkCodec

    with pytest.raises(ChunkPresetMismatchError):  # the other budget, same preset
        StorageChunkCodec(preset, "16x").decode(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                torch.empty_like(src[0]), HeadSlice(0, 3))
    with pytest.raises(ChunkTruncatedError):
        StorageChunkCodec(preset, "10x").decode(torch.frombuffer(bytearray(data[:-1]), dtype=torch.uint8),
                                                torch.empty_like(src[0]), HeadSlice(0, 3))


def test_the_bundled_preset_is_refused_by_the_attention_form_in_one_line_naming_the_storage_form():
    """The bundled preset codes keys before RoPE and keeps secondary sinks, for which a chunk has neither positions
    nor room; it carries a storage codec, so the refusal names that form as the fix (which the round trips above
    store it in)."""
    with pytest.raises(CodecError, match='before RoPE.*"form": "storage"') as refused:
        create_serde({"preset": str(BUNDLED)})
    assert "\n" not in str(refused.value)
    with pytest.raises(CodecError, match="before RoPE") as refused:  # no storage codec: the chunk codec's own fix
        create_serde({"preset": str(ROOT / "benchmarks" / "presets" / "smollm2-1pct-fresh-windows")})
    assert "storage" not in str(refused.value)


def test_storage_form_config_errors_are_typed():
    with pytest.raises(CodecError, match="'form'"):
        create_serde({"preset": str(PRESET), "form": "disk"})
    with pytest.raises(CodecError, match="'exact' is fixed"):
        create_serde({"preset": str(PRESET), "form": "storage", "exact": 4})
    with pytest.raises(CodecError, match="'budget' is an option of the storage form"):
        create_serde({"preset": str(PRESET), "budget": "10x"})
    with pytest.raises(CodecError, match="no budget '7x'"):
        create_serde({"preset": str(PRESET), "form": "storage", "budget": "7x"})

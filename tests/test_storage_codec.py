"""The storage codec (KV at rest) without LMCache: its quantizer tables against published values, its bit packing
and allocation against brute force, its chunk bytes against a layout count made here and its decode against a
float64 recomputation from the stored codes; refusals; the preset file. Mechanics on a random-weight model only:
quality is measured on SmolLM2 by benchmarks/lmcache_reuse.py."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import numpy as np
import pytest
import torch

from kvhub import KVPreset
from kvhub.errors import ChunkChecksumError, ChunkPresetMismatchError, ChunkShapeError, ChunkTruncatedError, CodecError
from kvhub.errors import PresetFileError, PresetFormatError
from kvhub.integrations.chunks import HeadSlice
from kvhub.integrations.storage_chunks import StorageChunkCodec
from kvhub.storage_codec import distortion, levels, pack_bits, unpack_bits
from kvhub.storage_fit import StorageFitConfig, _GroupMoments, allocate, domain_weights, fit_preset_storage
from tests.tiny_models import VOCAB, tiny_chunks

CONFIG = StorageFitConfig(ratios=(6.0, 10.0), prefix=48, continuation=16, windows_per_file=2, sink=2, exact=1,
                          chunk_tokens=32)


def test_levels_match_the_published_gaussian_quantizers():
    # Max (1960), Table I: Lloyd-Max MSE of a unit Gaussian at 2, 4, 8, 16 levels; Table II: best uniform at 32 levels
    for bits, mse in [(1, 0.3634), (2, 0.1175), (3, 0.03454), (4, 0.009497)]:
        assert distortion(bits) == pytest.approx(mse, rel=2e-3)
    assert 0.0025 < distortion(5) < 0.0035  # uniform 5-bit: above Lloyd-Max's 0.002499, well below 4 bits
    assert all(distortion(b + 1) < distortion(b) for b in range(8))
    lv, th = levels(2)
    assert torch.allclose(lv, torch.tensor([-1.510, -0.4528, 0.4528, 1.510]), atol=1e-3)
    assert torch.allclose(th, (lv[1:] + lv[:-1]) / 2)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_packing_round_trips_in_the_counted_bytes(bits):
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)
    packed = pack_bits(codes.to(torch.uint8), bits)
    assert packed.numel() == math.ceil(1001 * bits / 8)
    # numpy's bit order as the reference: code i's bit j is stream bit i * bits + j, little-endian within bytes
    ref = np.packbits(((codes.numpy()[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1), bitorder="little")
    assert packed.numpy().tobytes() == ref.tobytes()
    assert torch.equal(unpack_bits(packed, bits, 1001), codes)


def test_allocation_is_the_brute_force_optimum():
    variances = [torch.tensor([5.0, 1.0, 0.2]), torch.tensor([3.0, 0.05])]
    flat = [float(v) for vs in variances for v in vs]
    for budget in (1, 3, 6, 9):
        got = [int(b) for bits in allocate(variances, budget) for b in bits]
        best = min(itertools.product(range(5), repeat=len(flat)),
                   key=lambda a: (sum(a) > budget, sum(v * distortion(b) for v, b in zip(flat, a))))
        cost = lambda a: sum(v * distortion(b) for v, b in zip(flat, a))  # noqa: E731
        assert sum(got) == budget and cost(got) == pytest.approx(cost(best))


def test_every_calibration_domain_weighs_the_same_however_many_files_it_has():
    domains = ["novel"] * 16 + ["German"] * 4 + ["logs"] * 4
    weights = domain_weights(domains)
    per_domain = {d: sum(w for w, e in zip(weights, domains) if e == d) for d in set(domains)}
    assert per_domain == pytest.approx({"novel": 8.0, "German": 8.0, "logs": 8.0})  # 24 windows, a third each
    assert domain_weights(["a", "b"]) == [1.0, 1.0]


def test_a_window_weighed_twice_moves_the_moments_as_if_it_were_read_twice():
    gen = torch.Generator().manual_seed(5)
    x1, g1, x2, g2 = (torch.randn(7, 2 * 3, generator=gen) for _ in range(4))
    weighted, repeated = _GroupMoments(2, 3), _GroupMoments(2, 3)
    weighted.add(x1, g1, 2.0)
    weighted.add(x2, g2, 1.0)
    for x, g in ((x1, g1), (x1, g1), (x2, g2)):
        repeated.add(x, g)
    # the reference: the data written out with the first window twice, moments by numpy in float64
    data = np.concatenate([x1.numpy(), x1.numpy(), x2.numpy()]).astype(np.float64)
    for a, b in zip(weighted.transform(1e-2), repeated.transform(1e-2)):
        assert torch.allclose(a, b, atol=1e-6)
    mean = weighted.sum / weighted.count
    assert np.allclose(mean.numpy(), data.mean(0))


@pytest.fixture(scope="module")
def fitted(tiny_preset, tiny_llama, tmp_path_factory):
    """The tiny preset with a storage codec fitted on random token text, saved and loaded back."""
    folder = tmp_path_factory.mktemp("storage") / "preset"
    shutil.copytree(tiny_preset, folder)
    text = tmp_path_factory.mktemp("calib") / "random.txt"
    words = torch.randint(0, 500, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    text.write_text(" ".join(f"w{w}" for w in words))
    tokenizer = _WordTokenizer()
    preset = fit_preset_storage(KVPreset.load_folder(folder), tiny_llama, tokenizer, [text], CONFIG, progress=False)
    preset.save_pretrained(folder, overwrite=True)
    return folder


class _WordTokenizer:
    """Maps ``w<n>`` words to ids below the tiny model's vocabulary (the fit only needs ids)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([[3 + int(w[1:]) % (VOCAB - 3) for w in text.split()]])
        return {"input_ids": ids}


@pytest.fixture(scope="module")
def chunk(tiny_llama):
    return tiny_chunks(tiny_llama, 32, 32, seed=11)[0]


def _layout_bytes(storage, budget, tokens):
    """The chunk's size counted from the layout described in kvhub/integrations/storage_chunks.py."""
    elems = 2 * storage.num_layers * storage.num_kv_heads * storage.head_dim
    runs = sum(math.ceil(int((bits == b).sum()) * (tokens - storage.exact) * b / 8)
               for bits in storage.budgets[budget] for b in range(1, 9))
    return 64 + storage.exact * elems * 2 + runs


def _encode(codec, chunk):
    heads = HeadSlice(0, codec.shape.num_kv_heads)
    buf = torch.zeros(codec.nbytes(chunk.shape, chunk.dtype, heads), dtype=torch.uint8)
    assert codec.encode(chunk, buf, heads) == buf.numel()
    return buf, heads


def test_the_saved_preset_lists_the_storage_file_and_loads_it_back(fitted):
    config = json.loads((fitted / "kvhub_preset.json").read_text())
    names = [f["name"] for f in config["files"]]
    assert names == ["bases.safetensors", "storage.safetensors"]
    assert sorted(config["storage"]["budgets"]) == ["10x", "6x"]
    storage = KVPreset.load_folder(fitted).storage
    for name, budget in config["storage"]["budgets"].items():
        fp16 = 32 * 2 * 2 * 2 * 16 * 2
        assert budget["ratio_vs_fp16_chunk"] == pytest.approx(fp16 / _layout_bytes(storage, name, 32), abs=1e-3)
        assert budget["ratio_vs_fp16_chunk"] >= float(name[:-1])  # every byte counted, within the budget


@pytest.mark.parametrize("budget", ["6x", "10x"])
def test_chunk_bytes_and_decode_against_float64_from_the_stored_codes(fitted, chunk, budget):
    preset = KVPreset.load_folder(fitted)
    codec = StorageChunkCodec(preset, budget)
    buf, heads = _encode(codec, chunk)
    assert buf.numel() == _layout_bytes(preset.storage, budget, 32)
    out = torch.full_like(chunk, float("nan"))
    codec.decode(buf, out, heads)
    # the exact token is the input's, bit for bit
    assert torch.equal(out[:, :, :1], chunk[:, :, :1])
    # float64 reference: unpack the runs with numpy, look up the Gaussian levels, undo the transform in float64
    data = buf.numpy()
    offset = 64 + 2 * 2 * 1 * 32 * 2
    ref = torch.empty(2, 2, 31, 32, dtype=torch.float64)
    for g, bits in zip(preset.storage.groups, preset.storage.budgets[budget]):
        coeff = torch.zeros(31, g.rank, dtype=torch.float64)
        for b in range(1, 9):
            cols = (bits == b).nonzero().flatten()
            if not cols.numel():
                continue
            n = math.ceil(31 * cols.numel() * b / 8)
            raw = np.unpackbits(data[offset : offset + n], bitorder="little")[: 31 * cols.numel() * b]
            codes = (raw.reshape(-1, b).astype(np.int64) << np.arange(b)).sum(1).reshape(31, cols.numel())
            coeff[:, cols] = levels(b)[0].double()[torch.from_numpy(codes)] * g.sigma.double()[cols]
            offset += n
        x = coeff @ g.decode.double() + g.mean.double()
        ref[{"keys": 0, "values": 1}[g.stream], list(g.layers)] = x.view(31, len(g.layers), 32).permute(1, 0, 2)
    assert offset == buf.numel()
    assert torch.allclose(out[:, :, 1:].double(), ref, atol=2e-2, rtol=1e-2)  # fp16 output rounding
    # and the codec compresses for real: the decoded chunk is near the input, more so with more bits
    err = ((out.double() - chunk.double()).norm() / chunk.double().norm()).item()
    assert err < {"6x": 0.6, "10x": 0.8}[budget]


def test_more_bits_give_less_error(fitted, chunk):
    preset = KVPreset.load_folder(fitted)
    errs = {}
    for budget in ("6x", "10x"):
        codec = StorageChunkCodec(preset, budget)
        buf, heads = _encode(codec, chunk)
        out = torch.empty_like(chunk)
        codec.decode(buf, out, heads)
        errs[budget] = (out.float() - chunk.float()).norm().item()
    assert errs["6x"] < errs["10x"]


def test_refusals(fitted, tiny_preset, chunk):
    preset = KVPreset.load_folder(fitted)
    codec = StorageChunkCodec(preset, "6x")
    buf, heads = _encode(codec, chunk)
    out = torch.empty_like(chunk)
    with pytest.raises(ChunkPresetMismatchError):  # another budget of the same preset
        StorageChunkCodec(preset, "10x").decode(buf, out, heads)
    with pytest.raises(ChunkTruncatedError):
        codec.decode(buf[:-1], out, heads)
    flipped = buf.clone()
    flipped[-1] ^= 1
    with pytest.raises(ChunkChecksumError):
        codec.decode(flipped, out, heads)
    with pytest.raises(ChunkShapeError, match="attention form"):  # a tensor-parallel slice
        codec.nbytes((2, 2, 32, 16), torch.float16, HeadSlice(1, 1))
    with pytest.raises(CodecError, match="no budget '7x'"):
        StorageChunkCodec(preset, "7x")
    with pytest.raises(CodecError, match="not a torch device"):
        StorageChunkCodec(preset, "6x", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CodecError, match="no CUDA device"):
            StorageChunkCodec(preset, "6x", device="cuda")
    with pytest.raises(CodecError, match="no storage codec"):
        StorageChunkCodec(KVPreset.load_folder(tiny_preset))


def test_a_tampered_or_unlisted_storage_file_is_refused(fitted, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(fitted, folder)
    data = bytearray((folder / "storage.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "storage.safetensors").write_bytes(bytes(data))
    preset = KVPreset.load_folder(folder)  # the attention form does not read the storage file
    with pytest.raises(PresetFileError, match="storage.safetensors"):
        preset.storage
    config = json.loads((folder / "kvhub_preset.json").read_text())
    config["files"] = config["files"][:1]
    (folder / "kvhub_preset.json").write_text(json.dumps(config))
    with pytest.raises(PresetFormatError, match="storage section"):
        KVPreset.load_folder(folder)


def test_a_storage_file_with_nan_is_refused_even_with_a_matching_checksum(fitted, tmp_path):
    import hashlib

    from safetensors.torch import load, save

    from kvhub.errors import PresetTensorError

    folder = tmp_path / "p"
    shutil.copytree(fitted, folder)
    path = folder / "storage.safetensors"
    tensors = load(path.read_bytes())
    tensors["groups.0.sigma"][0] = float("nan")
    data = save(tensors, metadata={"format": "kvhub-storage-codec/1"})
    path.write_bytes(data)
    config = json.loads((folder / "kvhub_preset.json").read_text())
    entry = next(f for f in config["files"] if f["name"] == "storage.safetensors")
    entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (folder / "kvhub_preset.json").write_text(json.dumps(config))
    with pytest.raises(PresetTensorError, match="NaN or inf"):
        KVPreset.load_folder(folder).storage


@pytest.mark.parametrize("ratios", ["abc", "1", "10,0.5", "500"])
def test_fit_storage_refuses_bad_ratios_in_one_line(tiny_preset, ratios, capsys):
    from kvhub.cli import main

    before = sorted(p.name for p in tiny_preset.iterdir())
    assert main(["fit-storage", str(tiny_preset), "--ratios", ratios]) == 2
    err = capsys.readouterr().err
    assert "--ratios" in err and "Traceback" not in err
    assert sorted(p.name for p in tiny_preset.iterdir()) == before  # nothing written


def test_validate_reads_the_storage_file_and_show_lists_the_budgets(fitted, tmp_path, capsys):
    from kvhub.cli import main

    assert main(["validate", str(fitted)]) == 0
    assert "storage codec with budgets 10x, 6x" in capsys.readouterr().out
    assert main(["show", str(fitted)]) == 0
    out = capsys.readouterr().out
    assert "storage codec (KV at rest" in out and "6x: " in out and "not measured" in out
    folder = tmp_path / "p"
    shutil.copytree(fitted, folder)
    data = bytearray((folder / "storage.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "storage.safetensors").write_bytes(bytes(data))
    assert main(["validate", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "storage.safetensors" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _continuation_delta_by_hand(model, codec, ids, prefix, chunk_tokens):
    """The reuse case written out: the prefix's K/V through the codec's bytes per chunk, then the continuation's
    summed NLL against them in a DynamicCache, against the exact prefix's (kvhub.eval.reuse does this in the code)."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    with torch.no_grad():
        exact = DynamicCache(config=model.config)
        model(input_ids=ids[:, :prefix], cache=exact, use_cache=True)
        kv = torch.stack([torch.stack([la.keys[0] for la in exact.layers]),
                          torch.stack([la.values[0] for la in exact.layers])])  # [2, L, H, P, d]
        h, d = kv.shape[2], kv.shape[4]
        flat = kv.permute(0, 1, 3, 2, 4).reshape(2, kv.shape[1], prefix, h * d).half()
        restored = torch.empty_like(flat)
        for s in range(0, prefix, chunk_tokens):
            piece = flat[:, :, s : s + chunk_tokens].contiguous()
            buf, heads = _encode(codec, piece)
            out = torch.empty_like(piece)
            codec.decode(buf, out, heads)
            restored[:, :, s : s + chunk_tokens] = out
        back = restored.float().reshape(2, kv.shape[1], prefix, h, d).permute(0, 1, 3, 2, 4)
        nll = []
        for past in (kv, back):
            cache = DynamicCache(config=model.config)
            for i in range(past.shape[1]):
                cache.update(past[0, i : i + 1], past[1, i : i + 1], i)
            logits = model(input_ids=ids[:, prefix:], cache=cache, use_cache=True).logits[0, :-1]
            nll.append(F.cross_entropy(logits.float(), ids[0, prefix + 1 :], reduction="sum").item())
    return nll[1] - nll[0], ids.shape[1] - prefix - 1


def test_registry_verify_re_measures_each_storage_budget_and_names_the_corpus_that_moved(fitted, tiny_llama,
                                                                                          tmp_path):
    from kvhub.registry_tools.verify import Tolerances, storage_checks

    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{w}" for w in torch.randint(0, 500, (600,), generator=torch.Generator().manual_seed(8)).tolist()))
    preset = KVPreset.load_folder(fitted)
    tokenizer, prefix, continuation = _WordTokenizer(), 64, 16
    ids = tokenizer(text.read_text())["input_ids"]
    mid = (ids.shape[1] - 2 * (prefix + continuation)) // 2  # token_windows' middle windows, two of them
    truth = {}
    for budget in preset.storage.budgets:
        codec = StorageChunkCodec(preset, budget)
        parts = [_continuation_delta_by_hand(tiny_llama, codec, ids[:, s : s + prefix + continuation], prefix, 32)
                 for s in (mid, mid + prefix + continuation)]
        truth[budget] = 100 * (math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts)) - 1)

    def claim(shift):
        for budget, delta in truth.items():
            preset.config["storage"]["budgets"][budget]["metrics"] = {
                "ppl_delta_pct_mean": delta + shift, "ppl_delta_pct_worst": delta + shift, "worst_corpus": "words",
                "ppl_delta_pct_by_corpus": {"words": delta + shift}, "ppl_delta_pct_se_by_corpus": {"words": 0.0},
                "windows_by_corpus": {"words": 2}, "prefix_tokens": prefix, "continuation_tokens": continuation}
        return storage_checks(preset, tiny_llama, tokenizer, [str(text)], None, Tolerances(ppl_pp=0.01))

    checks = claim(0.0)
    assert [c.name for c in checks] == [f"storage budget {b}" for b in preset.storage.budgets] and all(c.ok for c in checks)
    moved = claim(0.5)  # a claim half a point better or worse than the bytes give
    assert not any(c.ok for c in moved) and all("words" in c.detail and "fix:" in c.detail for c in moved)
    del preset.config["storage"]["budgets"]["6x"]["metrics"]["prefix_tokens"]
    (refused,) = storage_checks(preset, tiny_llama, tokenizer, [str(text)], None, Tolerances())
    assert not refused.ok and "prefix and continuation" in refused.detail

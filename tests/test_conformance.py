"""Conformance matrix (issue #21): every decode backend against an independent reference, never against another
backend.

* Model level: a lossless codec (full rank, 16-bit segments) under ``compressed_attention`` must give the logits of
  ``transformers.DynamicCache`` on the same tiny model, with the same attention implementation, through a prefill
  that leaves compressed history, decode steps past the sliding windows, and prefill chunks after history (one short
  enough for the fused kernels, one longer than their query limit); plus beam search and ``crop``.
* Layer level: lossy codecs must give the attention that a float64 reference computes over the keys and values the
  stored codes decode to, decoded here from the bytes with the level sets' and scale formats' own definitions.
* Repros of three bugs of issue #21 (sliding windows under the flash-attention mask, fp32 exact segments in the C
  kernels, log8 scale overflow).

Every cell forces one backend (``KVHUB_KERNELS``) and checks, through ``kvhub.backends.recording()``, which backend
served its attention calls, and that a case the backend does not support fell back to PyTorch instead.
"""

from __future__ import annotations

import itertools
import random
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

import kvhub.attention
from kvhub import CompressedCache, compressed_attention
from kvhub.codec import BitsCode, LayerCodec, Segment, StreamCodec
from kvhub.layer import CompressedLayer
from kvhub.quantizers import QUANTIZERS, SCALE_FORMATS, SCALES
from kvhub.quantizers.vector import CODEBOOK_FILE
from tests.flash_like import NAME as FLASH_LIKE
from tests.test_engine import lossless
from tests.tiny_models import VOCAB, basis_samples, random_basis, tiny_bases, tiny_model

BACKENDS = ("torch", "native", "triton")
VQ_BOOKS = load_file(str(CODEBOOK_FILE))  # the packaged codebooks, read from the file, not through kvhub
MAX_KERNEL_QUERIES = 16  # the fused kernels' query limit (kvhub.kernels.MAX_QUERY_TOKENS): longer chunks fall back
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PADS = 7  # left pads of the second row in padded cells


def recording():
    """``kvhub.backends.recording()``, imported at use: without that API the tests that need it fail one by one."""
    from kvhub.backends import recording as record

    return record()


def force_backend(monkeypatch, backend: str) -> None:
    """``KVHUB_KERNELS=backend``. Nothing is skipped: the suite's set-up installs Triton (the ``dev`` extra) and
    needs a C compiler, so a backend that is missing here makes its cells fail (they see the fallback to torch)."""
    monkeypatch.setenv("KVHUB_KERNELS", backend)


def assert_served(rec, backend: str) -> None:
    assert set(rec.calls) == {backend}, f"{backend} forced, served by {dict(rec.calls)}, fallbacks {dict(rec.fallbacks)}"


def assert_fell_back(rec, backend: str) -> None:
    """A call ``backend`` does not support ran on PyTorch, and (for a kernel backend) the pass-over is recorded."""
    assert set(rec.calls) == {"torch"}, f"served by {dict(rec.calls)}, expected a fallback to torch"
    if backend != "torch":
        assert any(name == backend for name, _ in rec.fallbacks), f"no fallback of {backend} in {dict(rec.fallbacks)}"


def pairwise(dims: dict[str, tuple], allowed=lambda row: True, seed: int = 0) -> list[dict]:
    """Rows covering every pair of values of every two dimensions that some ``allowed`` row holds: greedily, each
    row the candidate that covers most pairs not yet covered, candidates in a seeded shuffle (the choice is fixed,
    ties included)."""
    names = list(dims)
    candidates = [c for c in itertools.product(*dims.values()) if allowed(dict(zip(names, c)))]
    random.Random(seed).shuffle(candidates)

    def pairs(row):
        return {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(names)), 2)}

    uncovered = set().union(*(pairs(c) for c in candidates))
    rows = []
    while uncovered:
        best = max(candidates, key=lambda c: len(pairs(c) & uncovered))
        rows.append(dict(zip(names, best)))
        uncovered -= pairs(best)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Model level: lossless codec against DynamicCache
# ---------------------------------------------------------------------------------------------------------------

# "exact": the dtype of the sink/recent tokens and 16-bit segments; "fp32" makes the codec bit-exact, "model" is
# kvhub's default (the model's dtype when it is 16-bit, else fp16: then the codec rounds K and V to fp16).
MODEL_CELLS = pairwise({
    "arch": ("llama", "mistral", "gemma2", "qwen2-mixed"),
    "dtype": tuple(DTYPES),
    "mask": ("sdpa", "eager", FLASH_LIKE),
    "padded": (False, True),
    "backend": BACKENDS,
    "exact": ("fp32", "model"),
}, allowed=lambda row: not (row["arch"] == "gemma2" and row["mask"] == "sdpa"))  # transformers: Gemma-2 has no SDPA
PREFILL = 36  # > the tiny models' window of 24: sliding layers forget from the first decode step on
# Decode steps per cell: enough to slide the windows several times (the layers forget in blocks of 6 tokens);
# fewer under Triton, whose interpreter costs 0.25 to 0.8 s per attention call on a loaded 2-core machine.
STEPS = {"torch": 16, "native": 16, "triton": 4}
SHORT_CHUNK, LONG_CHUNK = 6, MAX_KERNEL_QUERIES + 4


def tolerance(*dtypes: torch.dtype) -> float:
    """Largest |logit difference| allowed against DynamicCache. The tiny models' logits stay below 1, where one
    rounding of the coarsest dtype involved moves them by at most ``eps / 2``: kvhub accumulates attention in fp32
    while the stock 16-bit kernels round their intermediates, and the difference travels through every layer
    (measured: 2 ulps at most over 40 steps), so 4 ulps (``2 * eps``) of the coarsest dtype. In fp32 only the
    summation order differs (measured 2e-7): 1e-5. The bugs this matrix exists for move logits by 0.1 to 0.5."""
    return max(max(2 * torch.finfo(d).eps for d in dtypes), 1e-5)


def model_setup(arch: str, mask: str, dtype: torch.dtype):
    """The tiny model with attention implementation ``mask`` in ``dtype``, and bases calibrated in fp32 (a preset is
    calibrated once, whatever dtype the model later runs in)."""
    model = tiny_model(arch)
    bases = tiny_bases(model)
    model.set_attn_implementation(mask)
    return model.to(dtype), bases


def token_batch(length: int, padded: bool, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of ``length`` token ids and their attention mask; ``padded``: the second row is shorter, padded on
    the left (pad id 0, mask 0) as a tokenizer pads a batch for generation."""
    ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :PADS], mask[1, :PADS] = 0, 0
    return ids, mask


def run_chunks(model, cache, ids, mask, cuts, compressed: bool) -> torch.Tensor:
    """Logits of feeding ``ids[:, a:b]`` for consecutive ``cuts`` into ``cache`` (float32, concatenated)."""
    outs = []
    with torch.no_grad(), compressed_attention(model) if compressed else nullcontext():
        for a, b in zip(cuts, cuts[1:]):
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], cache=cache, use_cache=True)
            outs.append(out.logits.float())
    return torch.cat(outs, 1)


def assert_logits_match(ref, got, mask, tol) -> None:
    """Logits at real (unpadded) positions agree within ``tol``; the first position off is named."""
    real = mask.bool()
    diff = (ref - got).abs().amax(-1).masked_fill(~real, 0).nan_to_num(float("inf"))
    worst = diff.max().item()
    assert worst <= tol, f"logits differ by {worst:.3g} > {tol:.3g}, first at position {(diff > tol).nonzero()[0].tolist()}"


@pytest.mark.parametrize("cell", MODEL_CELLS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_lossless_codec_matches_dynamic_cache(cell, monkeypatch):
    """Prefill, decode steps, a chunk the fused kernels take and one they do not: DynamicCache's logits, with the
    forced backend serving every step and the long chunk falling back."""
    force_backend(monkeypatch, cell["backend"])
    dtype = DTYPES[cell["dtype"]]
    model, bases = model_setup(cell["arch"], cell["mask"], dtype)
    steps = STEPS[cell["backend"]]
    decoded = PREFILL + steps + SHORT_CHUNK
    ids, mask = token_batch(decoded + LONG_CHUNK, cell["padded"])
    cuts = [0, *range(PREFILL, PREFILL + steps + 1), decoded]
    exact = torch.float32 if cell["exact"] == "fp32" else None
    ref = run_chunks(model, DynamicCache(config=model.config), ids, mask, [*cuts, ids.shape[1]], compressed=False)
    cache = CompressedCache(model.config, lossless(model), bases, exact)
    with recording() as served:
        got = run_chunks(model, cache, ids[:, :decoded], mask, cuts, compressed=True)
    with recording() as long_chunk:
        got_long = run_chunks(model, cache, ids, mask, [decoded, ids.shape[1]], compressed=True)
    exact_dtype = exact or (dtype if dtype.itemsize == 2 else torch.float16)
    assert_logits_match(ref, torch.cat([got, got_long], 1), mask, tolerance(dtype, exact_dtype))
    assert_served(served, cell["backend"])
    assert served.calls[cell["backend"]] >= steps
    assert_fell_back(long_chunk, cell["backend"])


GENERATE_CELLS = [  # (arch, mask, padded, backend): fp32, where beams pick the same tokens by the same margins
    ("llama", "sdpa", True, "native"),
    ("gemma2", "eager", True, "torch"),
    ("mistral", FLASH_LIKE, False, "triton"),
]


@pytest.mark.parametrize("arch,mask,padded,backend", GENERATE_CELLS)
def test_beam_search_matches_dynamic_cache(arch, mask, padded, backend, monkeypatch):
    """``generate`` with 3 beams reorders the cache at every step: the same sequences and beam scores."""
    force_backend(monkeypatch, backend)
    model, bases = model_setup(arch, mask, torch.float32)
    ids, attention_mask = token_batch(30, padded, seed=4)
    kw = dict(attention_mask=attention_mask, max_new_tokens=5 if backend == "triton" else 12, num_beams=3,
              do_sample=False, return_dict_in_generate=True, output_scores=True)
    ref = model.generate(ids, **kw)
    with recording() as rec, compressed_attention(model):
        got = model.generate(ids, cache=CompressedCache(model.config, lossless(model), bases, torch.float32), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    torch.testing.assert_close(got.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-5)
    assert_served(rec, backend)


@pytest.mark.parametrize("arch,mask,padded,backend", [("llama", FLASH_LIKE, True, "native"), ("gemma2", "eager", False, "torch")])
def test_crop_then_continue_matches_dynamic_cache(arch, mask, padded, backend, monkeypatch):
    """``crop(-3)`` after decode steps (the cut reaches into tokens already compressed: window 4, flush block 4),
    then decode on with other tokens: DynamicCache cropped the same way gives the same logits. Short enough that
    Gemma-2's sliding layers have forgotten nothing (DynamicCache cannot crop a layer that has)."""
    force_backend(monkeypatch, backend)
    model, bases = model_setup(arch, mask, torch.float32)
    ids, attention_mask = token_batch(22, padded, seed=6)
    other, other_mask = token_batch(27, padded, seed=7)  # the same rows' padding, other tokens after the cut
    logits = {}
    for name, cache in (("ref", DynamicCache(config=model.config)),
                        ("kvhub", CompressedCache(model.config, lossless(model), bases, torch.float32))):
        with recording() if name == "kvhub" else nullcontext() as rec:
            run_chunks(model, cache, ids, attention_mask, [0, 14, *range(15, 23)], compressed=name == "kvhub")
            cache.crop(-3)
            assert cache.get_seq_length() == 19
            logits[name] = run_chunks(model, cache, other, other_mask, list(range(19, 28)), compressed=name == "kvhub")
    assert_logits_match(logits["ref"], logits["kvhub"], other_mask[:, 19:], tolerance(torch.float32))
    assert_served(rec, backend)


# ---------------------------------------------------------------------------------------------------------------
# Layer level: lossy codecs against a float64 reference decoded from the stored codes
# ---------------------------------------------------------------------------------------------------------------

def stream(segments, **kw) -> StreamCodec:
    return StreamCodec(tuple(Segment(*s) for s in segments), **kw)


# head_dim 16; segments cover 2/4/8/16 bits, a dropped tail, uniform and Lloyd-Max levels, vector codes, fp16 and
# log8 scales, absmax ("token"), RMS and static ("channel") scales, PCA and identity projections.
LOSSY = {
    "uniform-token-fp16": (stream([(4, 16), (4, 8), (4, 4), (4, 2)]),
                           stream([(8, 4), (4, 2), (4, 0)])),
    "lloydmax-rms-log8": (stream([(4, 16), (8, 4), (4, 2)], scale="rms", quantizer="lloyd-max", scale_format="log8"),
                          stream([(8, 4), (4, 2), (4, 0)], scale="rms", quantizer="lloyd-max", scale_format="log8")),
    "channel": (stream([(8, 8), (8, 4)], scale="channel"),
                stream([(8, 4), (4, 2), (4, 0)], scale="channel", quantizer="lloyd-max")),
    "identity": (stream([(16, 8)], projection="identity", scale_format="log8"),
                 stream([(16, 4)], projection="identity", scale="rms")),
    "uniform-log8-mixed": (stream([(8, 8), (8, 2)], scale="rms", scale_format="log8"),
                           stream([(4, 16), (12, 4)], scale_format="log8")),
    "vq": (stream([(4, 16), (8, 4), (4, 2)], scale="rms", quantizer="vq", scale_format="log8"),
           stream([(8, 4), (4, 2), (4, 0)], scale="channel", quantizer="vq")),
    # a code per bit width: absmax 4-bit keys with an RMS 2-bit tail (vector codes, then scalar ones so the fused
    # kernels read segments of two statistics); values the other way round
    "by-bits-vq": (stream([(4, 16), (8, 4), (4, 2)], scale_format="log8", by_bits=(BitsCode(2, "rms", "vq"),)),
                   stream([(8, 4), (4, 2), (4, 0)], scale="rms", quantizer="vq",
                          by_bits=(BitsCode(4, "token", "uniform"),))),
    "by-bits-scalar": (stream([(4, 16), (8, 4), (4, 2)], scale_format="log8", by_bits=(BitsCode(2, "rms", "lloyd-max"),)),
                       stream([(8, 4), (4, 2), (4, 0)], scale="rms", quantizer="lloyd-max",
                              by_bits=(BitsCode(4, "token", "uniform"),))),
    # the tuner's keys rung with RMS tails (kvhub.tuning.stream_ladders): 8-bit leading components, absmax 4-bit
    # ones and a 2-bit RMS tail as vector codes, all in one stream
    "tails-rung": (stream([(2, 8), (10, 4), (4, 2)], scale_format="log8", by_bits=(BitsCode(2, "rms", "vq"),)),
                   stream([(8, 4), (8, 2)], scale="rms", quantizer="vq")),
}
# The fused kernels read scalar codes only; a call on vector codes must fall back to the PyTorch backend.
SCALAR_ONLY = {"vq", "by-bits-vq", "tails-rung"}
KV_HEADS, Q_HEADS, DIM, BATCH, HISTORY_TOKENS = 2, 4, 16, 2, 60
SCALING, SOFTCAP = 0.31, 20.0
QUERY_LENGTHS = (1, 4, MAX_KERNEL_QUERIES + 4)
MASK_KINDS = ("none", "2d", "4d")  # flash's None, flash's 2-D padding, an eager-style additive 4-D mask


def layer_cells() -> list[tuple]:
    """Every codec through every backend at every query length; the mask kind rotates so that each codec meets
    each kind and each query length meets each kind; softcap on half the cells."""
    cells = []
    for (ci, codec), (bi, backend), (qi, q_len) in itertools.product(
            enumerate(LOSSY), enumerate(BACKENDS), enumerate(QUERY_LENGTHS)):
        cells.append((codec, backend, q_len, MASK_KINDS[(ci + qi) % 3], SOFTCAP if (ci + bi + qi) % 2 else None))
    return cells


def attend(layer, query, keys, values, mask, scaling, softcap):
    """kvhub's attention over a layer's compressed history and the exact tokens ``update`` returned, as
    ``[B, M, Hq, d]`` float64."""
    fn = getattr(kvhub.attention, "attend", None) or kvhub.attention._attend_compressed
    out = fn(layer, query, keys, values, mask, scaling, softcap)
    return (out[0] if isinstance(out, tuple) else out).double()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of a ``bits``-bit segment from its stored bytes: ``8 / bits`` consecutive components per byte,
    the first in the lowest bits."""
    per = 8 // bits
    codes = [(packed.long() >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return torch.stack(codes, -1).flatten(-2)


def loaded_scales(stored: torch.Tensor, fmt: str, reference: torch.Tensor) -> torch.Tensor:
    """Per-token scales as the decoders must use them, float64: fp16 as stored; log8 code ``c`` is
    ``reference * 2**((c - 128) / 16)``, clamped to fp16's largest finite value and rounded to fp16."""
    if fmt == "fp16":
        return stored.double()
    scale = reference[None, :, None, :] * torch.exp2((stored.double() - 128) / 16)
    return scale.clamp(max=torch.finfo(torch.float16).max).half().double()


def decoded_history(layer, name: str, length: int) -> torch.Tensor:
    """``[B, H, length, d]`` float64: the first ``length`` stored tokens of stream ``name``, decoded from the bytes
    (levels of the quantizer times the per-token or the calibrated per-component scale, 16-bit data as stored, then
    ``z @ U^T + mean``)."""
    stored = layer.streams[name]
    codec, basis = layer.codec.stream(name), layer.bases[name]
    variance = basis.variance[..., : codec.rank].double() if basis is not None else None
    per_token = SCALES[codec.scale].per_token
    bounds, start = [], 0
    for seg in codec.kept:
        bounds.append((seg, start, start + seg.size))
        start += seg.size
    quantized = [(a, b) for seg, a, b in bounds if seg.bits < 16]
    scales = None
    if per_token:
        reference = (torch.stack([variance[:, a:b].mean(-1).sqrt() for a, b in quantized], -1) if variance is not None
                     else torch.ones(KV_HEADS, len(quantized), dtype=torch.float64))
        scales = loaded_scales(stored.scales.view(0, length), codec.scale_format, reference)
    parts, group = [], 0
    for i, (seg, a, b) in enumerate(bounds):
        data = stored.codes[i].view(0, length)
        if seg.bits == 16:
            parts.append(data.double())
            continue
        scale_name, quantizer = codec.code_of(seg.bits)  # the stream's code, or by_bits' for this width
        if quantizer == "vq":  # each byte indexes a codeword of its 8 / bits consecutive components
            z = VQ_BOOKS[f"bits{seg.bits}"].double()[data.long()].flatten(-2)
        else:
            z = QUANTIZERS[quantizer].levels(seg.bits, SCALES[scale_name].statistic).double()[unpack_codes(data, seg.bits)]
        if per_token:
            z = z * scales[..., group : group + 1]
            group += 1
        else:
            z = z * variance[:, None, a:b].sqrt()
        parts.append(z)
    z = torch.cat(parts, -1)
    if basis is None:
        return z
    u = basis.basis[..., : codec.rank].double()
    return torch.einsum("bhtr,hdr->bhtd", z, u) + basis.mean.double()[:, None]


def reference_attention(query, keys, values, visible, softcap):
    """Plain float64 softmax attention ``[B, M, Hq, d]``: ``visible`` [B|1, 1|Hq, M, T] bool, query head ``h`` reads
    KV head ``h // group``."""
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = query.double() @ k.transpose(-1, -2) * SCALING
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1)
    return (probs @ v).transpose(1, 2)


def random_bases(gen: torch.Generator) -> dict:
    return {name: random_basis(KV_HEADS, DIM, gen) for name in ("keys", "values")}


def filled_layer(layer_codec: LayerCodec, full: dict, gen: torch.Generator, v_history=None) -> CompressedLayer:
    """A full-attention ``CompressedLayer`` (sink 2, window 4, flush block 8) on the full-rank bases ``full`` (cut to
    each stream's rank, as a preset stores them), fed a ``HISTORY_TOKENS`` prefill (one call: with no history yet it
    returns the states for the model's own kernel, so no attention call is owed): K/V drawn with the bases'
    statistics (values ``v_history`` when given)."""
    bases = {name: full[name].truncated(layer_codec.stream(name).rank)
             if layer_codec.stream(name).projection == "pca" else None for name in full}
    layer = CompressedLayer(layer_codec, bases["keys"], bases["values"], flush_block=8, fast_path=lambda: True)
    k = basis_samples(full["keys"], BATCH, HISTORY_TOKENS, gen)
    v = basis_samples(full["values"], BATCH, HISTORY_TOKENS, gen) if v_history is None else v_history
    layer.update(k, v)
    return layer


def attend_and_reference(layer, full, gen, q_len, mask_kind, softcap):
    """kvhub's output and the float64 reference for ``q_len`` new tokens after the layer's history, under a mask
    of ``mask_kind``; the second row's first 3 columns are padding in the 2-D and 4-D masks."""
    history = layer.streams["keys"].length
    assert history > 0, "the prefill left no compressed history"
    k_new = basis_samples(full["keys"], BATCH, q_len, gen)
    v_new = basis_samples(full["values"], BATCH, q_len, gen)
    query = torch.randn(BATCH, Q_HEADS, q_len, DIM, generator=gen)
    held = {}
    for name, new in (("keys", k_new), ("values", v_new)):
        sink, recent = ((layer.sink_keys, layer.recent_keys) if name == "keys" else (layer.sink_values, layer.recent_values))
        held[name] = torch.cat([sink.double(), decoded_history(layer, name, history), recent.double(), new.double()], -2)
    total = held["keys"].shape[-2]
    causal = torch.ones(q_len, total, dtype=torch.bool).tril_(total - q_len)[None, None]
    padding = torch.ones(BATCH, total, dtype=torch.bool)
    padding[1, :3] = False
    mask = None
    visible = causal
    if mask_kind != "none":
        visible = causal & padding[:, None, None, :]
        mask = padding.long() if mask_kind == "2d" else torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
    keys, values = layer.update(k_new, v_new)
    got = attend(layer, query, keys, values, mask, SCALING, softcap)
    return got, reference_attention(query, held["keys"], held["values"], visible, softcap)


def assert_close_to_reference(got, ref) -> None:
    """Within 1e-4 of the output's scale: what fp32 accumulation over ~70 tokens and fp32 decoding leave, and far
    below what a wrong level, scale, bit order or mask moves (a quantization step, 1e-2 and more)."""
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-4 * scale, f"max |kvhub - float64 reference| = {err:.3g}, output scale {scale:.3g}"


@pytest.mark.parametrize("codec,backend,q_len,mask_kind,softcap", layer_cells())
def test_lossy_layer_matches_float64_reference(codec, backend, q_len, mask_kind, softcap, monkeypatch):
    force_backend(monkeypatch, backend)
    keys, values = LOSSY[codec]
    layer_codec = LayerCodec(keys, values, sink=2, window=4)
    gen = torch.Generator().manual_seed(list(LOSSY).index(codec))
    full = random_bases(gen)
    layer = filled_layer(layer_codec, full, gen)
    with recording() as rec:
        got, ref = attend_and_reference(layer, full, gen, q_len, mask_kind, softcap)
    assert_close_to_reference(got, ref)
    if q_len > MAX_KERNEL_QUERIES or codec in SCALAR_ONLY:
        assert_fell_back(rec, backend)
    else:
        assert_served(rec, backend)


# ---------------------------------------------------------------------------------------------------------------
# Repros of issue #21's bugs
# ---------------------------------------------------------------------------------------------------------------

def lossless_decode_matches_dynamic_cache(monkeypatch, backend, arch, kernel, prefill, seed):
    """A ``prefill``-token chunk then one token per step up to 50, lossless codec on ``backend``, against
    DynamicCache on the same model and kernel; asserts ``backend`` served every compressed call."""
    force_backend(monkeypatch, backend)
    model, bases = model_setup(arch, kernel, torch.float32)
    ids, mask = token_batch(50, padded=False, seed=seed)
    cuts = [0, prefill, *range(prefill + 1, 51)]
    ref = run_chunks(model, DynamicCache(config=model.config), ids, mask, cuts, compressed=False)
    with recording() as rec:
        got = run_chunks(model, CompressedCache(model.config, lossless(model), bases, torch.float32), ids, mask, cuts,
                         compressed=True)
    assert_logits_match(ref, got, mask, tolerance(torch.float32))
    assert_served(rec, backend)


def test_sliding_window_under_flash_mask_matches_dynamic_cache(monkeypatch):
    """Mistral (every layer sliding, window 24) under the flash-attention mask function, no padding: the mask is
    None, so only the layer can hide the tokens that left the window but are still held (issue #21: logits off by
    0.14 from position 24 on)."""
    lossless_decode_matches_dynamic_cache(monkeypatch, "torch", "mistral", FLASH_LIKE, 20, seed=2)


def test_fp32_exact_segments_on_c_kernels_match_dynamic_cache(monkeypatch):
    """16-bit segments stored as fp32 (``exact_dtype=torch.float32``, the documented lossless mode) decoded by the C
    kernels (issue #21: read as fp16, NaN)."""
    lossless_decode_matches_dynamic_cache(monkeypatch, "native", "llama", "sdpa", 30, seed=3)


def test_log8_scales_load_clamped_to_fp16_range():
    """A reference above ~267 puts the top codes past fp16's range (issue #21: loaded as inf); they saturate."""
    reference = torch.tensor([[300.0, 1.0]])
    stored = torch.tensor([0, 128, 200, 251, 255], dtype=torch.uint8)[None, None, :, None].expand(1, 1, 5, 2)
    loaded = SCALE_FORMATS["log8"].load(stored.contiguous(), reference)
    assert torch.isfinite(loaded).all(), loaded
    expected = loaded_scales(stored, "log8", reference.double())
    torch.testing.assert_close(loaded.double(), expected, rtol=2**-10, atol=0)  # 1 fp16 ulp: rounding order
    assert loaded[0, 0, -1, 0].item() == torch.finfo(torch.float16).max


@pytest.mark.parametrize("backend", BACKENDS)
def test_log8_outlier_token_decodes_finite(backend, monkeypatch):
    """Values whose first segment has a calibrated deviation of 316 (variance 1e5), log8 absmax scales, and one
    token whose largest coefficient (65400) is near fp16's limit: its scale rounds up past 65504 (issue #21: inf,
    then NaN attention); clamped, attention stays finite and equals the reference's saturated decoding."""
    force_backend(monkeypatch, backend)
    layer_codec = LayerCodec(stream([(8, 8), (8, 4)]), stream([(8, 4), (8, 4)], scale_format="log8"), sink=2, window=4)
    gen = torch.Generator().manual_seed(11)
    full = random_bases(gen)
    full["values"].variance[:, :8] = 1e5
    v = basis_samples(full["values"], BATCH, HISTORY_TOKENS, gen)
    outlier = torch.zeros(DIM)
    outlier[0] = 65400.0
    v[:, :, 10] = full["values"].basis @ outlier + full["values"].mean  # a stored token (sink 2, window 4)
    layer = filled_layer(layer_codec, full, gen, v_history=v)
    with recording() as rec:
        got, ref = attend_and_reference(layer, full, gen, 1, "none", None)
    assert torch.isfinite(got).all()
    assert_close_to_reference(got, ref)
    assert_served(rec, backend)

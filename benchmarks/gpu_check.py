"""Decode-step time and GPU memory of kvhub against DynamicCache + SDPA on a Llama-3-8B-shaped model, in bf16.

Run by ``benchmarks/gpu_check.sh`` (which installs and runs the ``triton`` tests first). Two measurements per
(context, batch), each against a baseline timed in the same run:

* ``model_step``: one decode step of the whole model (random weights, the real widths: 32 layers, hidden 4096,
  32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256) with a DynamicCache under SDPA, then with a kvhub
  cache under ``attn_implementation="kvhub"``, both filled with random K/V through their own ``update`` (a real
  prefill of 32k x 8 tokens would dominate the run). The preset is fitted by ``kvhub.calibration`` on random token
  windows through this model and uses the bundled SmolLM2 preset's layout (K 4-bit absmax; V half 4-bit, half
  2-bit, RMS scales; 4 sink tokens). Which attention that step runs is whatever ``kvhub/attention.py`` calls:
  ``fused_kernel_calls_per_step`` counts the fused kernel's calls in one step.
* ``attention_only``: one layer's decode attention on the same random K/V: transformers' SDPA path on the bf16
  cache against ``kvhub.kernels.decode_attention`` on the compressed streams, over a few launch configurations,
  with the largest error of the kernel against SDPA on the decoded K/V.

Times are medians of CUDA-event timings after warm-up; before each timed attention call the L2 cache is flushed,
as between layers of a real step. Peak memory is ``torch.cuda.max_memory_allocated`` above the model's weights.
``--tiny`` runs every part on CPU with a tiny shape (the kernels in Triton's interpreter): a test of this script,
its numbers mean nothing.

    python benchmarks/gpu_check.py --out DIR [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json (default: $OUT)")
ARGS.add_argument("--tiny", action="store_true", help="every part on CPU with a tiny shape")
ARGS.add_argument("--tests-log", help="log of the triton tests run before (gpu_check.sh): its summary goes in the JSON")
ARGS.add_argument("--tests-status", type=int, help="their exit status")

import torch  # noqa: E402  (torch does not import triton; the interpreter must be chosen before anything does)

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVHUB_KERNELS", "triton")  # so --tiny takes the kernel path wherever a GPU would

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from unittest import mock  # noqa: E402

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from kvhub import kernels  # noqa: E402
from kvhub.calibration import calibrate  # noqa: E402
from kvhub.codec import CacheCodec, LayerCodec, ModelShape, Segment, StreamCodec  # noqa: E402
from kvhub.preset import KVPreset  # noqa: E402
from kvhub.stream import CompressedStream  # noqa: E402

LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256)
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=256)
FULL_RUN = dict(contexts=(8192, 32768), batches=(1, 8), warmup=3, steps=10, reps=20, fill_chunk=8192,
                configs=[dict(block_tokens=bt, num_warps=w, num_stages=s) for bt in (32, 64, 128) for w in (4, 8)
                         for s in (2, 3)])
TINY_RUN = dict(contexts=(80, 150), batches=(1, 2), warmup=0, steps=2, reps=1, fill_chunk=64,
                configs=[dict(block_tokens=32, num_warps=4, num_stages=3), dict(block_tokens=64, num_warps=4, num_stages=2)])
SINK = 4


def codec_for(shape: ModelShape) -> CacheCodec:
    """The bundled SmolLM2 preset's layout at this head_dim: K one 4-bit absmax segment; V half 4-bit, half 2-bit
    with RMS scales; 4 sink tokens, no recent window, flushed every 16 tokens."""
    d = shape.head_dim
    keys = StreamCodec((Segment(d, 4),), "pca", "token")
    values = StreamCodec((Segment(d // 2, 4), Segment(d // 2, 2)), "pca", "rms")
    return CacheCodec((LayerCodec(keys, values, sink=SINK, window=0),) * shape.num_layers, flush_block=16)


class Clock:
    """Elapsed milliseconds of a call: CUDA events on a GPU (after flushing L2), wall time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn, flush_l2: bool = False) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        if flush_l2:
            self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median(self, fn, warmup: int, reps: int, flush_l2: bool = False) -> float:
        for _ in range(warmup):
            self(fn, flush_l2)
        return statistics.median(self(fn, flush_l2) for _ in range(reps))


def peak_gib(device: torch.device, floor: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - floor) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def random_kv(shape: ModelShape, batch: int, tokens: int, dtype, device, gen):
    size = (batch, shape.num_kv_heads, tokens, shape.head_dim)
    return (torch.randn(size, generator=gen, device=device, dtype=dtype),
            torch.randn(size, generator=gen, device=device, dtype=dtype))


def fill(cache, shape: ModelShape, batch: int, context: int, chunk: int, dtype, device) -> None:
    """Random K/V through the cache's own ``update``, in chunks, as a chunked prefill would store them."""
    gen = torch.Generator(device=device).manual_seed(1)
    for start in range(0, context, chunk):
        for i in range(shape.num_layers):
            cache.update(*random_kv(shape, batch, min(chunk, context - start), dtype, device, gen), i)


def count_kernel_calls():
    """Wrap the fused kernel's entry so a decode step's calls can be counted (kvhub.kernels looks it up per call)."""
    from kvhub.kernels import triton_decode

    inner, calls = triton_decode.decode_attention, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    triton_decode.decode_attention = counted
    return calls


@torch.no_grad()
def model_step(model, preset, shape, context, batch, run, device, clock, calls) -> dict:
    """DynamicCache + SDPA, then kvhub as attention.py runs it (``KVHUB_KERNELS`` as set); when that step called
    the fused kernel, the same kvhub cache once more with ``KVHUB_KERNELS=torch``, the PyTorch path."""
    dtype = next(model.parameters()).dtype
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    row = {"context": context, "batch": batch}

    def timed_steps(cache, floor) -> dict:
        step = lambda: model(input_ids=tok, cache=cache, use_cache=True)  # noqa: E731
        for _ in range(run["warmup"]):
            step()
        calls[0] = 0
        times = [clock(step) for _ in range(run["steps"])]
        return {"step_ms": statistics.median(times), "steps": len(times), "peak_gib_above_weights": peak_gib(device, floor),
                "fused_kernel_calls_per_step": calls[0] / len(times)}

    floor = reset_peak(device)
    model.set_attn_implementation("sdpa")
    cache = DynamicCache(config=model.config)
    fill(cache, shape, batch, context, run["fill_chunk"], dtype, device)
    row["dynamic_sdpa"] = timed_steps(cache, floor)
    row["dynamic_sdpa"]["cache_bytes"] = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    del cache

    floor = reset_peak(device)
    cache = preset.build_cache(model, allow_name_mismatch=True)  # also switches to attn_implementation="kvhub"
    fill(cache, shape, batch, context, run["fill_chunk"], dtype, device)
    row["kvhub"] = timed_steps(cache, floor)
    row["kvhub"]["cache_bytes"] = cache.nbytes()["total"]
    if row["kvhub"]["fused_kernel_calls_per_step"]:
        with mock.patch.dict(os.environ, {kernels.ENV: "torch"}):
            row["kvhub_torch_path"] = timed_steps(cache, floor)
    del cache
    row["kvhub_over_dynamic_step"] = row["kvhub"]["step_ms"] / row["dynamic_sdpa"]["step_ms"]
    return row


@torch.no_grad()
def attention_only(preset, shape, q_heads, context, batch, run, device, clock) -> dict:
    """One layer at ``context`` tokens plus the new one: SDPA over bf16 K/V vs the fused kernel over the codes."""
    dtype, dim = torch.bfloat16, shape.head_dim
    gen = torch.Generator(device=device).manual_seed(2)
    keys, values = random_kv(shape, batch, context + 1, dtype, device, gen)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, device=device, dtype=dtype)
    scaling = dim**-0.5
    layer = preset.codec.layers[0]
    streams = {}
    for name, data in (("keys", keys), ("values", values)):
        s = CompressedStream(layer.stream(name), preset.bases.get((0, name)), device, dtype)
        for start in range(SINK, context, run["fill_chunk"]):  # tokens SINK..context-1 compressed
            s.append(data[:, :, start : min(start + run["fill_chunk"], context)])
        streams[name] = s
    exact = [torch.cat([t[:, :, :SINK], t[:, :, context:]], 2) for t in (keys, values)]  # sink + the new token
    history = context - SINK
    module = SimpleNamespace(num_key_value_groups=q_heads // shape.num_kv_heads, is_causal=True)

    def sdpa(k=keys, v=values):
        return sdpa_attention_forward(module, query, k, v, None, dropout=0.0, scaling=scaling)[0]

    def fused(**config):
        return kernels.decode_attention(query, streams["keys"], streams["values"], history, *exact, None, None, scaling,
                                        None, **config)

    row = {"context": context, "batch": batch}
    row["sdpa_ms"] = clock.median(sdpa, run["warmup"], run["reps"], flush_l2=True)
    row["sdpa_bytes"] = keys.nbytes + values.nbytes
    row["kernel_bytes"] = sum(sum(s.nbytes().values()) for s in streams.values()) + sum(t.nbytes for t in exact)
    row["configs"] = []
    for config in run["configs"]:
        ms = clock.median(lambda: fused(**config), run["warmup"], run["reps"], flush_l2=True)  # noqa: B023
        row["configs"].append({**config, "kernel_ms": ms})
    best = min(row["configs"], key=lambda c: c["kernel_ms"])
    row["best_config"] = {k: best[k] for k in ("block_tokens", "num_warps", "num_stages")}
    row["kernel_ms"] = best["kernel_ms"]
    row["kernel_over_sdpa"] = row["kernel_ms"] / row["sdpa_ms"]
    if clock.cuda:
        row["sdpa_gb_per_s"] = row["sdpa_bytes"] / row["sdpa_ms"] / 1e6
        row["kernel_gb_per_s"] = row["kernel_bytes"] / row["kernel_ms"] / 1e6
    # The kernel against SDPA on what the codes decode to: the same attention, so only rounding may differ.
    decoded = [torch.cat([e[:, :, :SINK], s.decode(torch.float32), e[:, :, SINK:]], 2).to(dtype)
               for e, s in zip(exact, (streams["keys"], streams["values"]))]
    ref = sdpa(*decoded).float().transpose(1, 2)
    got = fused(**row["best_config"]).float()
    row["kernel_vs_decoded_sdpa_max_rel_err"] = ((got - ref).abs().max() / ref.abs().max()).item()
    return row


def main() -> None:
    args = ARGS.parse_args()
    run = TINY_RUN if args.tiny else FULL_RUN
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("gpu_check.py needs a CUDA GPU (or --tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(0)
    config = LlamaConfig(**(TINY if args.tiny else LLAMA3_8B), max_position_embeddings=65536)
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    shape = ModelShape.from_config(config)
    gen = torch.Generator().manual_seed(3)
    windows = [torch.randint(0, config.vocab_size, (1, 256 if not args.tiny else 48), generator=gen) for _ in range(4)]
    bases, stats = calibrate(model, windows, sink=SINK, progress=False)
    preset = KVPreset.create(config, codec_for(shape), bases, {"corpus": "random token ids", "corpus_sha256": "0" * 64,
                             "tokens": stats.tokens, "seq_len": stats.seq_len, "sink": SINK}, "random/llama-3-8b-shaped")
    clock = Clock(device)
    calls = count_kernel_calls() if kernels.triton_available() else [0]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if kernels.triton_available() else None,
        "kernels_backend": kernels.backend(device),
        "tiny": args.tiny,
        "triton_tests": None if args.tests_log is None else {
            "exit_status": args.tests_status,
            "summary": (Path(args.tests_log).read_text().strip().splitlines() or [""])[-1]},
        "model": {k: getattr(config, k) for k in LLAMA3_8B},
        "codec": preset.codec.layers[0].to_dict(),
        "goal": "kvhub decode step <= 0.9x DynamicCache + SDPA at 32k tokens, batch 8, bf16",
        "model_step": [],
        "attention_only": [],
    }
    for context in run["contexts"]:
        for batch in run["batches"]:
            result["attention_only"].append(
                attention_only(preset, shape, config.num_attention_heads, context, batch, run, device, clock))
            print(json.dumps(result["attention_only"][-1]), flush=True)
            result["model_step"].append(model_step(model, preset, shape, context, batch, run, device, clock, calls))
            print(json.dumps(result["model_step"][-1]), flush=True)
    result["seconds"] = time.time() - started
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'gpu_check.json'} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()

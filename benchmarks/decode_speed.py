"""Decode-step time and KV memory: kvhub vs DynamicCache vs transformers' QuantizedCache (quanto int4).

One run measures every method on the same model, context and batch, and reports step-time *ratios* against
DynamicCache measured in that run. Caches are filled with synthetic K/V through their own ``update`` (in 512-token
chunks, so each method stores them exactly as it would after a chunked prefill); then the model decodes real steps
through them. Memory: the bytes each cache holds after the fill (read off its tensors), and the peak RSS of a real
chunked 8k-token generate in a fresh process.

    python benchmarks/decode_speed.py                # SmolLM2 + a 7B-shaped random model, 1k/4k/8k, batch 1 and 4
    python benchmarks/decode_speed.py --device cuda --models 7b --contexts 8192,16384,32768 --dtype bfloat16
    python benchmarks/decode_speed.py --presets benchmarks/presets/smollm2-3pct-worst,benchmarks/presets/smollm2-3pct-prerope \
        --contexts 1024,4096 --batches 1 --peak-context 0 --out benchmarks/results/decode_speed_prerope.json
                                                     # presets side by side (keys after and before RoPE)
    python benchmarks/decode_speed.py --models smollm2 --fill text --presets benchmarks/presets/smollm2-3pct-vq,\
        benchmarks/presets/smollm2-3pct-vq-sinks --contexts 1024,4096 --batches 1 --peak-context 0 \
        --out benchmarks/results/decode_speed_sinks.json
                                                     # filled by the model reading real text, not synthetic K/V: what
                                                     # a preset keeping secondary sinks exact flags depends on the text
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

from kvhub import KVPreset, load_model
from kvhub.attention import compressed_attention, enable
from kvhub.bases import Bases, StreamBasis
from kvhub.cache import CompressedCache
from kvhub.codec import CacheCodec, ModelShape, Segment, StreamCodec

ROOT = Path(__file__).resolve().parents[1]
# the books-tuned one-percent preset, bundled until 2026-12-07: decode_speed.json, user_paths.json and gpu_check.py
# time it, as the preset whose codes the fused kernels read (the bundled one decodes on PyTorch: --presets times it)
PRESET = ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"
FILL_CHUNK = 512


def seven_b_shaped(dtype, device):
    """Attention shaped like Qwen2.5-7B (28 layers, 4 KV heads, head_dim 128, GQA 7:1); hidden and MLP narrowed so
    the weights fit 2 CPU cores' memory and time. The KV cache, the subject here, has the real shape."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=3584, intermediate_size=1024, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, head_dim=128, max_position_embeddings=65536)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def random_bases(shape: ModelShape) -> Bases:
    """Orthonormal bases for a random-weight model (its K/V have no structure to fit; timing only)."""
    gen = torch.Generator().manual_seed(0)
    out = Bases()
    for i in range(shape.num_layers):
        for name in ("keys", "values"):
            q, _ = torch.linalg.qr(torch.randn(shape.num_kv_heads, shape.head_dim, shape.head_dim, generator=gen))
            out[(i, name)] = StreamBasis(torch.zeros(shape.num_kv_heads, shape.head_dim), q,
                                         torch.ones(shape.num_kv_heads, shape.head_dim))
    return out


def scaled_codec(preset: KVPreset, shape: ModelShape) -> CacheCodec:
    """The preset's first-layer layout, its segments scaled to ``shape``'s head_dim (wider or narrower), repeated over
    its layers; level set and scale format kept, so the shipped formats are what another shape is timed with."""
    layer = preset.codec.layers[0]

    def stretch(s: StreamCodec) -> StreamCodec:
        segments = tuple(Segment(g.size * shape.head_dim // preset.shape.head_dim, g.bits) for g in s.segments)
        return replace(s, segments=segments)

    one = replace(layer, keys=stretch(layer.keys), values=stretch(layer.values))
    return CacheCodec((one,) * shape.num_layers, preset.codec.flush_block, preset.codec.keys_before_rope)


def make_caches(model, presets: dict[str, KVPreset]) -> dict:
    """DynamicCache, quanto int4 and a kvhub cache per preset (named ``kvhub`` when there is one preset)."""
    shape = ModelShape.from_config(model.config)
    makers = {
        "DynamicCache": lambda: DynamicCache(config=model.config),
        "QuantizedCache quanto int4": lambda: QuantizedCache(backend="quanto", config=model.config, nbits=4),
    }
    for name, preset in presets.items():
        if preset.shape == shape:
            codec, bases = preset.codec, preset.bases
        else:  # the 7B-shaped random model: the SmolLM2 preset's layout on random bases
            codec, bases = scaled_codec(preset, shape), random_bases(shape)
        makers[name] = lambda codec=codec, bases=bases: CompressedCache(model.config, codec, bases)
    return makers


def fill(cache, shape: ModelShape, batch: int, context: int, dtype, device) -> None:
    gen = torch.Generator(device="cpu").manual_seed(1)
    for start in range(0, context, FILL_CHUNK):
        n = min(FILL_CHUNK, context - start)
        for i in range(shape.num_layers):
            k = torch.randn(batch, shape.num_kv_heads, n, shape.head_dim, generator=gen).to(device, dtype)
            v = torch.randn(batch, shape.num_kv_heads, n, shape.head_dim, generator=gen).to(device, dtype)
            cache.update(k, v, i)


TEXT = ROOT / "corpora" / "evaluation" / "python_docs_library.txt"  # --fill text: the protocol's worst corpus of late


def fill_text(model, cache, ids: torch.Tensor, batch: int) -> None:
    """Fill ``cache`` as a chunked prefill of real text does: the model reads ``ids`` [1, context] (the same text in
    every row) in ``FILL_CHUNK``-token chunks, kvhub caches through their compressed attention."""
    with torch.no_grad(), compressed_attention(model):
        for start in range(0, ids.shape[-1], FILL_CHUNK):
            model(input_ids=ids[:, start : start + FILL_CHUNK].expand(batch, -1), cache=cache, use_cache=True)


def held_bytes(cache) -> int:
    if isinstance(cache, CompressedCache):
        return cache.reserved_nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, name, None)
            if t is None:
                continue
            if hasattr(t, "_data"):  # quanto QTensor: codes, scales, zero points
                total += sum(x.nbytes for x in (t._data, t._scale, t._shift) if isinstance(x, torch.Tensor))
                continue
            total += t.nbytes
    return total


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def interleaved_step_times(model, caches: dict, batch: int, steps: int, device) -> dict[str, float]:
    """Median decode-step time per method, the methods taking turns step by step so that machine noise (a shared
    VM drifts by 20-30% over a minute) hits them alike. The first round warms up and is dropped."""
    tok = torch.randint(0, model.config.vocab_size, (batch, 1), device=device)
    times: dict[str, list[float]] = {m: [] for m in caches}
    for _ in range(steps + 1):
        for method, cache in caches.items():
            sync(device)
            t0 = time.perf_counter()
            with compressed_attention(model):  # other caches get the model's own kernel (SDPA) unchanged
                model(input_ids=tok, cache=cache, use_cache=True)
            sync(device)
            times[method].append(time.perf_counter() - t0)
    return {m: statistics.median(t[1:]) for m, t in times.items()}


def peak_rss_child(method: str, context: int) -> None:
    """Run in a fresh process: chunked prefill of ``context`` tokens + 16 generated, print the RSS increase."""
    model, _ = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    makers = make_caches(model, {"kvhub": KVPreset.from_pretrained(str(PRESET))})
    if method == "kvhub":
        enable(model)
    cache = makers[method]()
    ids = torch.randint(0, model.config.vocab_size, (1, context))
    with torch.no_grad():
        model(input_ids=ids[:, :8], cache=makers[method](), use_cache=True)  # warm up
        with RssSampler() as rss:
            for start in range(0, context - 1, FILL_CHUNK):
                model(input_ids=ids[:, start : min(start + FILL_CHUNK, context - 1)], cache=cache, use_cache=True)
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=16, do_sample=False)
    print(json.dumps({"peak_rss_increase_bytes": rss.peak - rss.start, "cache_bytes": held_bytes(cache)}))


class RssSampler:
    """Peak resident memory over a block, sampled every 2 ms from /proc (ru_maxrss only ever remembers the model
    load, which peaks higher than any cache here)."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()


def git_commit() -> str:
    """The commit a result was measured at (short hash), or "unknown" outside a checkout."""
    run = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False)
    return run.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,7b")
    ap.add_argument("--contexts", default="1024,4096,8192")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--presets", default=None,
                    help="comma-separated preset folders, each timed as 'kvhub: <folder name>' (default: "
                         "benchmarks/presets/smollm2-1pct-books, the bundled preset when decode_speed.json was "
                         "measured, as 'kvhub')")
    ap.add_argument("--fill", choices=("synthetic", "text"), default="synthetic",
                    help="fill the caches with synthetic K/V through their update (default), or by the real model "
                         f"reading {TEXT.name} (smollm2 only)")
    ap.add_argument("--peak-context", type=int, default=8192, help="0 to skip the peak-RSS generate")
    ap.add_argument("--peak-only", action="store_true", help="only the peak-RSS part, merged into --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_speed.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return peak_rss_child(args.child[0], int(args.child[1]))

    dtype = getattr(torch, args.dtype)
    if args.presets:
        presets = {f"kvhub: {Path(p).name}": KVPreset.from_pretrained(p) for p in args.presets.split(",")}
    else:
        presets = {"kvhub": KVPreset.from_pretrained(str(PRESET))}
    rows = []
    for name in [] if args.peak_only else args.models.split(","):
        if name == "smollm2":
            model, tokenizer = load_model("HuggingFaceTB/SmolLM2-135M-Instruct", dtype=args.dtype, device=args.device)
            text = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt")["input_ids"].to(args.device)
        elif args.fill == "text":
            raise SystemExit("--fill text needs a real model: --models smollm2")
        else:
            model = seven_b_shaped(dtype, args.device)
        shape = ModelShape.from_config(model.config)
        makers = make_caches(model, presets)
        for context in map(int, args.contexts.split(",")):
            for batch in map(int, args.batches.split(",")):
                row = {"model": name, "context": context, "batch": batch, "methods": {}}
                caches = {}
                for method, make in makers.items():
                    caches[method] = make()
                    if args.fill == "text":
                        fill_text(model, caches[method], text[:, :context], batch)
                    else:
                        fill(caches[method], shape, batch, context, dtype, args.device)
                    row["methods"][method] = {"cache_bytes": held_bytes(caches[method])}
                for method, t in interleaved_step_times(model, caches, batch, args.steps, args.device).items():
                    row["methods"][method]["step_s"] = t
                del caches
                base = row["methods"]["DynamicCache"]
                for m in row["methods"].values():
                    m["step_ratio_vs_dynamic"] = m["step_s"] / base["step_s"]
                    m["bytes_ratio_vs_dynamic"] = m["cache_bytes"] / base["cache_bytes"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
    peak = {}
    if args.peak_context and args.device == "cpu":
        for method in ("DynamicCache", "QuantizedCache quanto int4", "kvhub"):
            out = subprocess.run([sys.executable, __file__, "--child", method, str(args.peak_context)],
                                 capture_output=True, text=True, check=True)
            peak[method] = json.loads(out.stdout.strip().splitlines()[-1])
            print(method, peak[method], flush=True)
    if args.peak_only:
        result = json.loads(Path(args.out).read_text())
        result["peak_generate"] = {"context": args.peak_context, "model": "smollm2", "methods": peak}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"updated {args.out}")
        return
    result = {
        "hardware": f"{platform.machine()} {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                    f"{torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name(0),
        "dtype": args.dtype,
        "fill": args.fill if args.fill == "synthetic" else f"text: {TEXT.relative_to(ROOT)}",
        "command": "python " + " ".join(sys.argv),
        "commit": git_commit(),
        "rows": rows,
        "peak_generate": {"context": args.peak_context, "model": "smollm2", "methods": peak},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

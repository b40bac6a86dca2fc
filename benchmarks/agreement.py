"""Greedy-continuation agreement with DynamicCache and bytes at 2048 tokens, on SmolLM2 and real evaluation text.

For each evaluation corpus a 2048-token passage is prefilled through the cache in 128-token chunks, then 32 tokens
are generated greedily; reported: how many leading tokens equal DynamicCache's, how many positions agree overall,
and the compression the cache held.

    python benchmarks/agreement.py        # writes benchmarks/results/agreement.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvhub import CacheCodec, CompressedCache, KVPreset, ModelShape, calibrate, load_model
from kvhub.attention import enable
from kvhub.corpora import CORPORA
from kvhub.eval import hardware
from kvhub.eval.agreement import greedy_agreement
from kvhub.text import read_texts, token_windows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32


def main() -> None:
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    enable(model)
    shape = ModelShape.from_config(model.config)
    calib_text = read_texts([CORPORA / "calibration"])[0][1]
    inherited = calibrate(model, token_windows(tok, calib_text, 1024, 1, where="spread"), sink=0, progress=False)[0]
    preset = KVPreset.from_pretrained(ROOT / "benchmarks" / "presets" / "smollm2-1pct-books")
    setups = {
        "(a) inherited: V-only PCA rank 48 int8, K fp16, 1024-token basis":
            lambda: CompressedCache(model.config, CacheCodec.uniform(shape, 16, 8, value_rank=48, sink=0, window=0,
                                                                     compress_keys=False), inherited),
        "(b) kvhub 1% preset (K 4-bit, V 4/2-bit PCA, sink 4)": lambda: preset.build_cache(model),
    }
    rows = {}
    for name, make in setups.items():
        rows[name] = {}
        for corpus, text in read_texts([CORPORA / "evaluation"]):
            ids = token_windows(tok, text, 2048 - NEW_TOKENS, 1)[0]
            made = []  # the caches greedy_agreement builds: the first holds the free-running continuation
            agreed = greedy_agreement(model, ids, lambda: made.append(make()) or made[-1], NEW_TOKENS)
            cache = made[0]
            rows[name][corpus] = {
                "leading_equal": agreed.leading_equal,
                "positions_equal": agreed.positions_equal,
                "forced_equal": agreed.forced_equal,
                "generated": agreed.generated,
                "compression": round(cache.compression_ratio(), 3),
                "tokens_held": cache.get_seq_length(),
            }
            print(name, corpus, rows[name][corpus], flush=True)
    out = {"hardware": hardware(), "command": "python " + " ".join(sys.argv), "commit": git_commit(),
           "new_tokens": NEW_TOKENS, "rows": rows}
    path = ROOT / "benchmarks" / "results" / "agreement.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""What storing the bases in fp16 (preset format 1.1) costs: the books-tuned SmolLM2 preset (the bundled one then,
stored in fp32, format 1.0) with its basis columns rounded to fp16 in memory, against the same preset as stored, on one 2048-token evaluation
window per corpus (the middle of each text, as ``kvhub eval`` takes it), prefilled in 128-token chunks; DynamicCache
is the baseline. Also the largest orthonormality error of the rounded bases.

    python benchmarks/fp16_bases.py --corpora corpora/evaluation/austen_emma.txt   # the recorded run
    python benchmarks/fp16_bases.py [--corpora FILE_OR_FOLDER] [--windows 1]
    # writes benchmarks/results/fp16_bases.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvhub import CompressedCache, KVPreset, load_model
from kvhub.attention import enable
from kvhub.bases import orthonormality_error
from kvhub.eval import hardware
from kvhub.eval.ppl import perplexity
from kvhub.text import read_texts, token_windows

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpora", default=str(ROOT / "corpora" / "evaluation"))
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--window-tokens", type=int, default=2048)
    args = ap.parse_args()
    t0 = time.time()
    preset = KVPreset.load_folder(PRESET)
    fp32 = preset.bases
    fp16 = fp32.rounded(torch.float16)
    model, tok = load_model(preset.base_model["id"])
    enable(model)
    rows = {}
    for name, text in read_texts([args.corpora]):
        windows = token_windows(tok, text, args.window_tokens, args.windows)
        base = perplexity(model, windows, DynamicCache).ppl
        ppl32 = perplexity(model, windows, lambda: CompressedCache(model.config, preset.codec, fp32)).ppl
        ppl16 = perplexity(model, windows, lambda: CompressedCache(model.config, preset.codec, fp16)).ppl
        rows[name] = {"base": base, "fp32_bases": ppl32, "fp16_bases": ppl16,
                      "delta_pct_fp32": 100 * (ppl32 / base - 1), "delta_pct_fp16": 100 * (ppl16 / base - 1)}
        print(f"{name:<22} base {base:.4f}  fp32 bases {ppl32:.4f} ({rows[name]['delta_pct_fp32']:+.3f}%)  "
              f"fp16 bases {ppl16:.4f} ({rows[name]['delta_pct_fp16']:+.3f}%)", flush=True)
    result = {
        "preset": str(PRESET.relative_to(ROOT)), "windows": args.windows, "window_tokens": args.window_tokens,
        "chunk": 128, "corpora": rows,
        "orthonormality_error": {"fp32": max(orthonormality_error(b.basis) for b in fp32.values()),
                                 "fp16": max(orthonormality_error(b.basis) for b in fp16.values())},
        "basis_bytes": {"fp32": sum(b.basis.numel() * 4 for b in fp32.values()),
                        "fp16": sum(b.basis.numel() * 2 for b in fp16.values())},
        "hardware": hardware(), "seconds": round(time.time() - t0, 1),
    }
    out = ROOT / "benchmarks" / "results" / "fp16_bases.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Bytes of the bundled SmolLM2 preset's cache at 2048 tokens, batch 1 and 4: the three figures kvhub reports.

Real evaluation text (one 2048-token window per sequence, from Emma) is prefilled through the cache in 128-token
chunks, as the perplexity protocol does; then the cache's own counts are read (kvhub.footprint): per sequence
(codes + scales + exact tokens held), shared bases (the preset's, once per model and device), allocated (what the
buffers reserve), and the ratios against an fp16 K+V cache of the same tokens.

    python benchmarks/bytes.py        # writes benchmarks/results/bytes.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kvhub import KVPreset, load_model
from kvhub.corpora import CORPORA
from kvhub.eval import hardware
from kvhub.footprint import DEFINITIONS, Footprint
from kvhub.text import read_texts, token_windows

ROOT = Path(__file__).resolve().parents[1]
TOKENS, CHUNK, BATCHES = 2048, 128, (1, 4)


@torch.no_grad()
def main() -> None:
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    preset = KVPreset.from_pretrained(ROOT / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct")
    text = dict(read_texts([CORPORA / "evaluation"]))["austen_emma"]
    windows = token_windows(tok, text, TOKENS, max(BATCHES))
    rows = []
    for batch in BATCHES:
        ids = torch.cat(windows[:batch])
        cache = preset.build_cache(model)
        for start in range(0, TOKENS, CHUNK):
            model(input_ids=ids[:, start : start + CHUNK], cache=cache, use_cache=True)
        f = Footprint.of_cache(cache, batch)
        rows.append({"tokens": f.tokens, "batch": batch, "fp16": f.fp16, "per_sequence": f.per_sequence,
                     "shared_bases": f.shared_bases, "allocated": f.allocated, "ratio": f.ratio,
                     "ratio_with_bases": f.ratio_with_bases, "ratio_allocated": f.fp16 / f.allocated})
        print("\n".join(f.lines()), flush=True)
    out = {"hardware": hardware(), "command": "python " + " ".join(sys.argv), "preset": "bundled SmolLM2 1% preset",
           "definitions": DEFINITIONS, "rows": rows}
    path = ROOT / "benchmarks" / "results" / "bytes.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

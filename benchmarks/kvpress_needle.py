"""kvpress on the needle test, at the compression ratio of kvhub's 1% preset.

kvpress pins ``transformers<5.3``, so it runs in its own venv and reads the SmolLM2 checkpoint kvhub exported:

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 kvpress "transformers<5.3"
    .venv-kvpress/bin/python benchmarks/kvpress_needle.py      # writes benchmarks/results/kvpress_needle.json

Same cells, keys, needle, question and answer prefix as kvhub's needle grid (kvhub/eval/needle.py). kvpress
compresses the context during prefill (token eviction) and keeps the question uncompressed, as its pipeline does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from kvhub.eval.needle import ANSWER_PREFIX, CONTEXTS, DEPTHS, NEEDLE, QUESTION, passkey  # noqa: E402
from kvhub.corpora import CORPORA  # noqa: E402
from kvhub.models import benchmark_model_dir  # noqa: E402

from kvpress import ExpectedAttentionPress, SnapKVPress  # noqa: E402


def context_text(tokenizer, haystack_ids, context: int, depth: float, key: str, overhead: int) -> str:
    needle = tokenizer.encode(" " + NEEDLE.format(key=key) + " ", add_special_tokens=False)
    budget = context - overhead - len(needle)
    cut = int(budget * depth)
    return (tokenizer.decode(haystack_ids[:cut]) + tokenizer.decode(needle) + tokenizer.decode(haystack_ids[cut:budget]))


def main() -> None:
    preset = json.loads((ROOT / "benchmarks" / "presets" / "smollm2-1pct-books" / "kvhub_preset.json").read_text())
    target = preset["metrics"]["compression"]["total"]
    ratio = 1 - 1 / target
    folder = benchmark_model_dir()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    hay_text = (CORPORA / "evaluation" / "austen_persuasion.txt").read_text()
    hay = tok.encode(hay_text, add_special_tokens=False)
    overhead = len(tok.apply_chat_template([{"role": "user", "content": "\n\n" + QUESTION}], add_generation_prompt=True,
                                           tokenize=True)) + len(tok.encode(ANSWER_PREFIX, add_special_tokens=False))
    presses = {"no press (baseline)": None, f"SnapKVPress({ratio:.3f})": SnapKVPress(compression_ratio=ratio),
               f"ExpectedAttentionPress({ratio:.3f})": ExpectedAttentionPress(compression_ratio=ratio)}
    rows = {}
    for name, press in presses.items():
        grid = []
        for context in CONTEXTS:
            hits = []
            for depth in DEPTHS:
                key = passkey(context, depth)
                text = context_text(tok, hay, context, depth, key, overhead)
                answer = pipe(text, question=QUESTION, answer_prefix=ANSWER_PREFIX, press=press, max_new_tokens=8)["answer"]
                found = re.search(r"\d{5}", answer.replace(" ", ""))
                hits.append(int(bool(found) and found.group(0) == key))
            grid.append(hits)
        rows[name] = {"needle": grid, "accuracy": sum(map(sum, grid)) / sum(map(len, grid))}
        print(name, " / ".join(f"{sum(r)}/{len(r)}" for r in grid), flush=True)
    out = {"kvhub_preset_compression": target, "press_compression_ratio": ratio, "contexts": list(CONTEXTS),
           "depths": list(DEPTHS), "rows": rows, "note": "kvpress keeps 1-ratio of the context tokens in full "
           "precision; the question is not compressed. Cells, keys and prompt text match kvhub's needle grid."}
    path = ROOT / "benchmarks" / "results" / "kvpress_needle.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

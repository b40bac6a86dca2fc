"""What `kvhub eval` costs on this machine: the quick run measured whole, the full run derived from measured units.

The full protocol (3 files x 3 windows x 2048 tokens through both caches, and a needle grid of 3 lengths x 5 depths
through both) takes tens of minutes on 2 CPU cores, so it is not run whole here. Measured:

* ``quick``: `kvhub eval <books-tuned preset> --needle --quick` as the CLI runs it (:data:`kvhub.eval.QUICK`), its
  perplexity part and its needle part timed separately; the model load is timed apart and not included.
* ``full``: the units the full run is made of, each once: one 2048-token window through DynamicCache and through the
  preset (the full run has 9), and one needle cell at each length (depth 0.5) through a fresh DynamicCache and
  through the preset (the full run has 5 depths per length). The full run's time is derived as
  9 x window + 5 x (cell at 1k + cell at 2k + cell at 4k): an upper bound, since the full grid's DynamicCache cells
  share their haystack prefill (kvhub/eval/needle.py) and these cells do not.

The machine's load average is recorded before and after, as other jobs share the CPU.

    python benchmarks/eval_cost.py        # writes benchmarks/results/eval_cost.json
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvhub import KVPreset, load_model
from kvhub.corpora import CORPORA
from kvhub.eval import QUICK, EvalConfig, evaluate, hardware
from kvhub.eval.needle import ask, build_prompt, needle_grid, passkey
from kvhub.eval.ppl import window_nll
from kvhub.text import read_texts, token_windows

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_cost.json"
PRESET = ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"
EVALUATION = CORPORA / "evaluation"


def timed(f):
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


@torch.no_grad()
def main() -> None:
    load_before, commit = os.getloadavg(), git("rev-parse", "--short", "HEAD")
    load_seconds, (model, tok) = timed(lambda: load_model("HuggingFaceTB/SmolLM2-135M-Instruct", device="cpu"))
    preset = KVPreset.from_pretrained(str(PRESET))
    make = lambda: preset.build_cache(model)  # noqa: E731
    base = lambda: DynamicCache(config=model.config)  # noqa: E731
    texts = read_texts([EVALUATION])
    hay = dict(texts)["austen_persuasion"]

    quick = EvalConfig([str(EVALUATION)], needle=True, progress=False, **QUICK)
    ppl_only = EvalConfig([str(EVALUATION)], progress=False, **{**QUICK, "contexts": (), "depths": ()})
    quick_ppl, _ = timed(lambda: evaluate(model, tok, make, ppl_only))
    quick_needle, _ = timed(lambda: [needle_grid(model, tok, hay, f, quick.contexts, quick.depths) for f in (base, make)])

    full = EvalConfig([str(EVALUATION)], needle=True, progress=False)
    ids = token_windows(tok, texts[0][1], full.window_tokens, 1)[0]
    window = sum(timed(lambda f=f: window_nll(model, ids, f(), full.chunk))[0] for f in (base, make))
    haystack = tok(hay, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    cells = {}
    for context in full.contexts:
        prompt = build_prompt(tok, haystack, context, 0.5, passkey(context, 0.5))
        cells[str(context)] = sum(timed(lambda f=f: ask(model, tok, prompt, f()))[0] for f in (base, make))
    files = len(texts)
    derived_ppl = files * full.windows * window
    derived_needle = len(full.depths) * sum(cells.values())
    load_after = os.getloadavg()

    result = {
        "hardware": hardware(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15_min": {"before": [round(x, 2) for x in load_before],
                                    "after": [round(x, 2) for x in load_after]},
        "note": "measured on a machine shared with other jobs (see the load average): times are this run's, not a "
                "quiet machine's",
        "commit": commit,
        "uncommitted_changes_under_kvhub": bool(git("status", "--porcelain", "--", "kvhub")),
        "command": "python benchmarks/eval_cost.py",
        "model_load_seconds": round(load_seconds, 1),
        "quick": {
            "what": "measured whole: the work of kvhub eval <books-tuned preset> --needle --quick (evaluate on the quick "
                    "windows, then the two needle grids), model load excluded",
            "config": {"windows": quick.windows, "window_tokens": quick.window_tokens,
                       "needle_contexts": list(quick.contexts), "needle_depths": list(quick.depths)},
            "work": quick.work(files),
            "seconds": {"perplexity": round(quick_ppl, 1), "needle": round(quick_needle, 1),
                        "total": round(quick_ppl + quick_needle, 1)},
        },
        "full": {
            "what": "derived from units measured once each: 9 x (one 2048-token window through both caches) + 5 x "
                    "(one needle cell at 1k + at 2k + at 4k, depth 0.5, each through a fresh DynamicCache and the "
                    "preset); an upper bound, as the full grid's DynamicCache cells share their haystack prefill",
            "config": {"windows": full.windows, "window_tokens": full.window_tokens,
                       "needle_contexts": list(full.contexts), "needle_depths": list(full.depths)},
            "work": full.work(files),
            "measured_units_seconds": {"window_through_both_caches": round(window, 1),
                                       "needle_cell_through_both_caches": {k: round(v, 1) for k, v in cells.items()}},
            "derived_seconds": {"perplexity": round(derived_ppl, 1), "needle": round(derived_needle, 1),
                                "total": round(derived_ppl + derived_needle, 1)},
        },
    }
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

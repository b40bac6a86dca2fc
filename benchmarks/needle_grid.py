"""A preset's needle grid next to DynamicCache's, on its own.

A tune run with ``--no-needle`` measures perplexity only: the needle grid costs more than the whole perplexity
protocol on 2 CPU cores (benchmarks/results/eval_cost.json). This runs the grid ``kvhub eval --needle`` runs (every
context length and depth of kvhub/eval/needle.py, Persuasion as the haystack) through DynamicCache and through the
preset's cache, and records both grids of hits and the preset's config digest, so a claim on a preset's grid can be
checked against the very file it was measured on.

    python benchmarks/needle_grid.py benchmarks/presets/smollm2-1pct-fresh-windows [--contexts 1024,2048]
    # writes benchmarks/results/needle_smollm2-1pct-fresh-windows.json

``--contexts`` runs fewer prompt lengths than the protocol's (the 4,096-token cells cost about as much as the
others together on 2 CPU cores); the file records which ran.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from kvhub import KVPreset, load_model
from kvhub.corpora import CORPORA
from kvhub.eval import hardware
from kvhub.eval.needle import CONTEXTS, DEPTHS, needle_grid
from kvhub.preset_files import CONFIG_NAME, sha256_file

ROOT = Path(__file__).resolve().parents[1]


def main(folder: Path, contexts: tuple[int, ...]) -> None:
    t0 = time.time()
    torch.set_grad_enabled(False)
    preset = KVPreset.from_pretrained(str(folder))
    model, tok = load_model(preset.base_model["id"])
    haystack = (CORPORA / "evaluation" / "austen_persuasion.txt").read_text(encoding="utf-8")
    grids = {}
    for name, make in [("baseline", lambda: DynamicCache(config=model.config)),
                       ("compressed", lambda: preset.build_cache(model))]:
        grid = needle_grid(model, tok, haystack, make, contexts, DEPTHS)
        grids[name] = grid.hits
        print(f"{name}: {grid.row_summary()} ({time.time() - t0:.0f} s)", flush=True)
    out = ROOT / "benchmarks" / "results" / f"needle_{folder.name}.json"
    out.write_text(json.dumps({
        "what": "needle grid (kvhub/eval/needle.py) of the preset next to DynamicCache's",
        "preset": str(folder.resolve().relative_to(ROOT)),
        "preset_config_sha256": sha256_file(folder / CONFIG_NAME),
        "context_lengths": list(contexts), "protocol_context_lengths": list(CONTEXTS), "depths": list(DEPTHS), **grids,
        "hardware": hardware(), "seconds": round(time.time() - t0, 1),
        "command": f"python benchmarks/needle_grid.py {folder.resolve().relative_to(ROOT)}"
                   + ("" if contexts == CONTEXTS else f" --contexts {','.join(map(str, contexts))}"),
    }, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path)
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    args = parser.parse_args()
    main(args.preset, tuple(int(c) for c in args.contexts.split(",")))

"""Refit a preset's bases on other calibration text, keeping its codec (optionally with Lloyd-Max values): what
widening the calibration corpus buys at exactly the same bytes, without a new search.

Calibration windows are chosen as ``kvhub tune`` chooses them (the first 85% of each file, 8 windows of 1024
tokens spread over it), so the result is comparable with a tuned preset.

    python benchmarks/recalibrate.py --calib corpora/calibration --calib corpora/extra/calibration \\
        --quantizer lloyd-max --out benchmarks/presets/smollm2-1pct-widened-lloydmax
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from kvhub import KVPreset, calibrate, load_model
from kvhub.models import BENCHMARK_MODEL_ID, benchmark_provenance
from kvhub.text import corpus_sha256
from kvhub.tuning import TuneConfig, split_calibration

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=str(ROOT / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"))
    ap.add_argument("--calib", action="append", required=True, help="calibration file or folder (repeatable)")
    ap.add_argument("--quantizer", choices=["uniform", "lloyd-max"], default="uniform",
                    help="level set of the values' segments (keys keep theirs)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.time()
    source = KVPreset.from_pretrained(args.preset)
    codec = source.codec
    codec = replace(codec, layers=tuple(replace(layer, values=replace(layer.values, quantizer=args.quantizer))
                                        for layer in codec.layers))
    model, tok = load_model(BENCHMARK_MODEL_ID)
    fit, _ = split_calibration(tok, args.calib, TuneConfig(BENCHMARK_MODEL_ID, args.calib))
    bases, stats = calibrate(model, fit, sink=codec.layers[0].sink, progress=False)
    calibration = {"corpus": ", ".join(sorted({p.rstrip("/").split("/")[-1] for p in args.calib})),
                   "corpus_sha256": corpus_sha256(args.calib), "tokens": stats.tokens, "seq_len": stats.seq_len,
                   "sink": stats.sink, "kvhub_version": __import__("kvhub").__version__,
                   "tuning": {"method": "no search: the codec of --preset, bases refitted", "codec_from": str(Path(args.preset).name), "quantizer": args.quantizer,
                             "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                             "seconds": round(time.time() - t0, 1)}}
    preset = KVPreset.create(model.config, codec, bases, calibration, BENCHMARK_MODEL_ID,
                             provenance=benchmark_provenance(), license="apache-2.0")
    preset.save_pretrained(args.out, overwrite=True)
    print(f"calibrated on {stats.tokens} tokens in {time.time() - t0:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()

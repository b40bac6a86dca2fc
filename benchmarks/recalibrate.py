"""Refit a preset's bases on other calibration text, keeping its codec (optionally with Lloyd-Max values, or another
scale format): what widening the calibration corpus buys at exactly the same bytes, without a new search. With
``--keep-bases`` nothing is refitted: the preset's own bases with the codec changed (e.g. ``--scale-format log8``).

Calibration windows are chosen as ``kvhub tune`` chooses them (the first 85% of each file, 8 windows of 1024
tokens spread over it), so the result is comparable with a tuned preset.

    python benchmarks/recalibrate.py --calib corpora/calibration \\
        --quantizer lloyd-max --out benchmarks/presets/smollm2-1pct-widened-lloydmax
    python benchmarks/recalibrate.py --keep-bases --scale-format log8 --out benchmarks/presets/smollm2-1pct-log8
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
    ap.add_argument("--preset", default=str(ROOT / "benchmarks" / "presets" / "smollm2-1pct-books"))
    ap.add_argument("--calib", action="append", help="calibration file or folder (repeatable)")
    ap.add_argument("--keep-bases", action="store_true", help="refit nothing: keep the preset's bases and calibration")
    ap.add_argument("--quantizer", choices=["uniform", "lloyd-max"], default=None,
                    help="level set of the values' segments (keys keep theirs; default: the preset's)")
    ap.add_argument("--scale-format", choices=["fp16", "log8"], default=None,
                    help="how every stream stores its per-token scales (default: the preset's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if bool(args.calib) == args.keep_bases:
        ap.error("pass --calib (to refit the bases) or --keep-bases, not both")
    t0 = time.time()
    source = KVPreset.from_pretrained(args.preset)
    codec = replace(source.codec, layers=tuple(_changed(layer, args) for layer in source.codec.layers))
    change = {"codec_from": str(Path(args.preset).name), "quantizer": args.quantizer, "scale_format": args.scale_format,
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    if args.keep_bases:  # the stored bases are already cut and rotated for this layout: no KVPreset.create
        calibration = dict(source.config["calibration"])
        calibration["tuning"] = {**calibration.get("tuning", {}), "changed_after_tuning": change}
        config = {**source.config, "codec": codec.to_dict(), "calibration": calibration, "metrics": None, "files": []}
        KVPreset(config, source.bases, basis_dtype=source.basis_dtype).save_pretrained(args.out, overwrite=True)
        print(f"wrote {args.out} (bases of {args.preset})")
        return
    model, tok = load_model(BENCHMARK_MODEL_ID)
    fit, _ = split_calibration(tok, args.calib, TuneConfig(BENCHMARK_MODEL_ID, args.calib))
    bases, stats = calibrate(model, fit, sink=codec.layers[0].sink, progress=False)
    calibration = {"corpus": ", ".join(sorted({p.rstrip("/").split("/")[-1] for p in args.calib})),
                   "corpus_sha256": corpus_sha256(args.calib), "tokens": stats.tokens, "seq_len": stats.seq_len,
                   "sink": stats.sink, "kvhub_version": __import__("kvhub").__version__,
                   "tuning": {"method": "no search: the codec of --preset, bases refitted", **change,
                             "seconds": round(time.time() - t0, 1)}}
    preset = KVPreset.create(model.config, codec, bases, calibration, BENCHMARK_MODEL_ID,
                             provenance=benchmark_provenance(), license="apache-2.0")
    preset.save_pretrained(args.out, overwrite=True)
    print(f"calibrated on {stats.tokens} tokens in {time.time() - t0:.0f} s; wrote {args.out}")


def _changed(layer, args):
    """The layer with the requested level set on its values and scale format on both streams."""
    values = layer.values if args.quantizer is None else replace(layer.values, quantizer=args.quantizer)
    if args.scale_format is None:
        return replace(layer, values=values)
    return replace(layer, keys=replace(layer.keys, scale_format=args.scale_format),
                   values=replace(values, scale_format=args.scale_format))


if __name__ == "__main__":
    main()

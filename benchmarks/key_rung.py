"""One rung the tuner's ladder lacks, measured on the whole evaluation protocol: the worst-domain preset's level with
its keys' top eighth of components at 8 bits instead of the top quarter (benchmarks/results/frontier-4.md).

Bases are fitted as ``kvhub tune`` fits them (the first 85% of every calibration file, 8 windows of 1024 tokens each),
the codec is benchmarks/presets/smollm2-1pct-worst's with only the keys' segments changed, and the evaluation is
``kvhub eval``'s (3 x 2048-token windows per corpus, DynamicCache in the same run).

    python benchmarks/key_rung.py        # writes benchmarks/results/key_rung.json (about 10 minutes on 2 cores)
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvhub import CacheCodec, CompressedCache, KVPreset, ModelShape, calibrate, load_model
from kvhub.codec import Segment
from kvhub.corpora import CORPORA
from kvhub.eval import EvalConfig, evaluate, hardware, metrics_block
from kvhub.models import BENCHMARK_MODEL_ID
from kvhub.tuning import TuneConfig, split_calibration

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "benchmarks" / "presets" / "smollm2-1pct-worst"


def main() -> None:
    t0 = time.time()
    torch.set_grad_enabled(False)
    model, tok = load_model(BENCHMARK_MODEL_ID)
    preset = KVPreset.from_pretrained(str(PRESET))
    shape = ModelShape.from_config(model.config)
    d = shape.head_dim
    keys = (Segment(d // 8, 8), Segment(d - d // 8, 4))
    codec = CacheCodec(tuple(replace(layer, keys=replace(layer.keys, segments=keys)) for layer in preset.codec.layers),
                       flush_block=preset.codec.flush_block)
    calib = [str(CORPORA / "calibration")]
    fit, _ = split_calibration(tok, calib, TuneConfig(BENCHMARK_MODEL_ID, calib))
    bases, _ = calibrate(model, fit, sink=preset.codec.layers[0].sink, progress=False)
    rotated = bases.rotated_for(codec, shape)
    cfg = EvalConfig([str(CORPORA / "evaluation")], progress=False)
    result = evaluate(model, tok, lambda: CompressedCache(model.config, codec, rotated), cfg)
    metrics = metrics_block(result, cfg, "python benchmarks/key_rung.py")
    out = {"what": __doc__.splitlines()[0], "keys_segments": [[s.size, s.bits] for s in keys],
           "values_segments": [[s.size, s.bits] for s in codec.layers[0].values.segments],
           "key_bits_per_token_and_head": codec.layers[0].keys.bits_per_token(),
           "hardware": hardware(), "seconds": round(time.time() - t0), "metrics": metrics}
    path = ROOT / "benchmarks" / "results" / "key_rung.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    p = metrics["perplexity"]
    print(f"{metrics['compression']['total']:.2f}x, worst {p['worst_delta_pct']:+.2f}% ({p['worst_corpus']}), "
          f"mean {p['mean_delta_pct']:+.2f}%; wrote {path}")


if __name__ == "__main__":
    main()

"""How close to Gaussian the coefficients a preset quantizes are, and what Lloyd-Max levels buy on them.

One forward pass of 1024 tokens per evaluation corpus through SmolLM2 records every layer's keys and values (after
the sink); each stream is projected on the books-tuned preset's bases and each quantized segment is encoded with
uniform and with Lloyd-Max levels under an RMS scale (what the values use), at the segment's own bits. Reported per
corpus and stream: relative MSE of the coefficients (error energy / coefficient energy) for both, and the excess
kurtosis of the RMS-normalized coefficients (0 for a Gaussian; Lloyd-Max levels for a Gaussian are only optimal
near 0). The preset's own quantizer (uniform absmax for keys) is listed beside.

    python benchmarks/quantizer_mse.py     # writes benchmarks/results/quantizer_mse.json
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers.cache_utils import Cache

from kvhub import KVPreset, load_model
from kvhub.codec import STREAMS
from kvhub.eval import hardware
from kvhub.passthrough import PassThroughLayer
from kvhub.stream import CompressedStream
from kvhub.text import read_texts, token_windows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from frontier import EVALUATION  # noqa: E402  (one place that says where the evaluation corpora are)

SINK = 4


class _Recorder(PassThroughLayer):
    def __init__(self) -> None:
        super().__init__()
        self.kv = None

    def process(self, key_states, value_states):
        self.kv = (key_states[:, :, SINK:], value_states[:, :, SINK:])
        return key_states, value_states


def rel_mse(stream_codec, basis, x: torch.Tensor) -> float:
    coder = CompressedStream(stream_codec, basis, x.device)
    coder.append(x)
    z = coder.project(x)
    return ((coder.coefficients() - z).pow(2).sum() / z.pow(2).sum()).item()


@torch.no_grad()
def main() -> None:
    t0 = time.time()
    model, tok = load_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    preset = KVPreset.from_pretrained(ROOT / "benchmarks" / "presets" / "smollm2-1pct-books")
    out = {}
    for name, text in read_texts([d for d in EVALUATION if d.is_dir()]):
        ids = token_windows(tok, text, 1024, 1)[0]
        layers = [_Recorder() for _ in range(model.config.num_hidden_layers)]
        model(input_ids=ids, cache=Cache(layers=layers), use_cache=True)
        row = {}
        for s, stream in enumerate(STREAMS):
            acc = {"preset": 0.0, "uniform-rms": 0.0, "lloyd-max-rms": 0.0, "kurtosis": 0.0}
            for i, layer in enumerate(layers):
                codec, basis = preset.codec.layers[i].stream(stream), preset.bases[(i, stream)]
                x = layer.kv[s].float()
                acc["preset"] += rel_mse(codec, basis, x)
                acc["uniform-rms"] += rel_mse(replace(codec, scale="rms", quantizer="uniform"), basis, x)
                acc["lloyd-max-rms"] += rel_mse(replace(codec, scale="rms", quantizer="lloyd-max"), basis, x)
                z = CompressedStream(codec, basis, x.device).project(x)
                kurt = []
                for a, b in CompressedStream(codec, basis, x.device).bounds:
                    u = z[..., a:b] / z[..., a:b].pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
                    kurt.append(u.pow(4).mean().item() - 3)
                acc["kurtosis"] += sum(kurt) / len(kurt)
            row[stream] = {k: round(v / len(layers), 5) for k, v in acc.items()}
        out[name] = row
        print(name, json.dumps(row), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "hardware": hardware(), "seconds": round(time.time() - t0),
              "what": "mean over layers of relative coefficient MSE under the books-tuned preset's layout; kurtosis of "
                      "RMS-normalized coefficients per segment (Gaussian: 0)", "corpora": out}
    (ROOT / "benchmarks" / "results" / "quantizer_mse.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

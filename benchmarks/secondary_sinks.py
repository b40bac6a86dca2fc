"""Secondary sinks: where the compressed past's attention goes, and what keeping those tokens exact would buy.

Measured before building (frontier-4.md, "Secondary sinks, measured"). Two parts:

1. **Where attention goes.** One 1,536-token window per evaluation corpus through the benchmark model with eager
   attention: per layer, the share of the attention that queries send to the *compressed* past (not the 4 exact
   sink tokens, not their own 128-token chunk) which lands on the top 1% of those tokens; and how much of it a rule
   a cache can apply when it codes a token, with no future queries, catches: *a token whose value vector is shorter
   than ``tau`` times its layer and head's median* (the median measured on calibration text).
2. **What exact secondary sinks would buy.** Each preset's codes measured on the evaluation protocol (7 corpora x 3
   windows x 2,048 tokens, chunks of 128) by a stand-in for a cache that keeps flagged tokens exact: a DynamicCache
   whose past is, at every chunk, the preset's own stored codes decoded (:class:`kvhub.stream.CompressedStream`,
   the engine's encoder and decoder), with the sink tokens and the flagged tokens (keys, values or both) put back
   exact, and the chunk itself exact, as the engine attends. The row with nothing flagged is the check on the
   stand-in: it is compared with the preset's own recorded metrics (the engine on the same windows; the engine also
   keeps its tokens not yet flushed exact, which the stand-in codes). Bytes: what a
   side table of the flagged tokens would add (fp16 vectors and a 4-byte position per flagged token and head, the
   codes kept in place), against the preset's measured ratio.

3. **Does it open a more compressed rung?** With ``--ladder-level N``: the tuner's ladder level ``N`` with
   vector-coded values and keys coded before RoPE, measured as the tuner measures a trial (the tuning split, bases
   fitted as ``kvhub tune`` fits them, three seeds of the segments' rotation), by the stand-in with nothing flagged
   and with the keys and values of flagged tokens exact, beside the engine's own trial at the first seed. With
   ``--evaluation`` too: the same on the evaluation protocol (held-out documents), at the first seed only.

    python benchmarks/secondary_sinks.py                   # parts 1 and 2: secondary_sinks.json (~42 min on 2 cores)
    python benchmarks/secondary_sinks.py --ladder-level 2  # part 3: secondary_sinks_level2.json (~16 min)
    python benchmarks/secondary_sinks.py --ladder-level 1 --evaluation  # secondary_sinks_level1_evaluation.json
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

from kvhub import CacheCodec, KVPreset, ModelShape, calibrate, load_model
from kvhub.bases import Bases
from kvhub.corpora import CORPORA
from kvhub.eval import hardware
from kvhub.eval.ppl import perplexity
from kvhub.models import BENCHMARK_MODEL_ID
from kvhub.protocol import worst_of
from kvhub.rope import RotaryFrame
from kvhub.stream import CompressedStream
from kvhub.text import read_texts, token_windows
from kvhub.tuning import (TuneConfig, codec_from_rungs, measure_trial, split_calibration, stream_ladders,
                          uniform_rungs)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "secondary_sinks.json"
SEEDS = (0, 1, 2)
# "bundled 1% preset": the label secondary_sinks.json records for the books-tuned preset, bundled when it ran
PRESETS = {"bundled 1% preset": ROOT / "benchmarks" / "presets" / "smollm2-1pct-books",
           "3% preset, vector-coded values": ROOT / "benchmarks" / "presets" / "smollm2-3pct-vq"}
CHUNK, WINDOW_TOKENS, WINDOWS = 128, 2048, 3  # the evaluation protocol (kvhub.eval.EvalConfig)
SINK = 4  # the presets' exact sink tokens
ATTENTION_TOKENS = 1536  # part 1's window: eager attention weights of every layer must fit in memory
TAUS = (0.3, 0.4)
SIDES = {"keys and values": ("keys", "values"), "values only": ("values",), "keys only": ("keys",)}
POSITION_BYTES = 4


@contextmanager
def value_norms(model):
    """While inside: every forward pass's value-vector lengths, ``{layer: [[tokens, kv heads], ...]}``."""
    heads, d = model.config.num_key_value_heads, ModelShape.from_config(model.config).head_dim
    norms: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.self_attn.v_proj.register_forward_hook(
        lambda m, a, o, i=i: norms.setdefault(i, []).append(o[0].view(-1, heads, d).norm(dim=-1)))
        for i, layer in enumerate(model.model.layers)]
    try:
        yield norms
    finally:
        for h in hooks:
            h.remove()


def value_norm_medians(model, windows: list[torch.Tensor]) -> torch.Tensor:
    """[layers, kv_heads]: the median length of a value vector per layer and head over ``windows`` (calibration
    text), what the flagging rule is relative to."""
    with value_norms(model) as norms:
        for ids in windows:
            model(ids)
    return torch.stack([torch.cat(norms[i]).median(0).values for i in range(len(norms))])


def attention_shares(model, ids: torch.Tensor, medians: torch.Tensor, sink: int,
                     taus: tuple[float, ...]) -> dict[str, dict[str, list[float]]]:
    """Per threshold and layer: the top 1% of compressed-past tokens' share of the attention sent to the compressed
    past (the same under every threshold), the share the value-norm rule catches, and the fraction of token-heads
    it flags (module docstring, part 1)."""
    with value_norms(model) as norms:
        attentions = model(ids, output_attentions=True).attentions
    heads = model.config.num_key_value_heads
    t = ids.shape[-1]
    q, k = torch.arange(t)[:, None], torch.arange(t)[None, :]
    past = (k >= sink) & (k < q - CHUNK)
    top = max(1, t // 100)
    out = {f"tau {tau}": {"top1pct_share": [], "rule_share": [], "rule_flagged": []} for tau in taus}
    for i, a in enumerate(attentions):
        received = (a[0] * past)[:, 2 * CHUNK:].sum(1)  # [query heads, keys]: what each past token receives
        total = received.sum(-1)
        top_share = float((received.topk(top, -1).values.sum(-1) / total).mean())
        group = received.shape[0] // heads
        for tau in taus:
            flag = norms[i][0] < tau * medians[i]  # [tokens, kv heads]
            flag[:sink] = False
            caught = (received * flag.T.repeat_interleave(group, 0)).sum(-1)
            row = out[f"tau {tau}"]
            row["top1pct_share"].append(top_share)
            row["rule_share"].append(float((caught / total).mean()))
            row["rule_flagged"].append(float(flag[sink:].float().mean()))
    return out


class ExactSinksStandIn(DynamicCache):
    """A DynamicCache whose past is the preset's codes decoded at every chunk, the sinks and the tokens flagged by
    the value-norm rule (on ``sides``) exact, and the incoming chunk exact (module docstring, part 2). ``tau`` 0
    flags nothing: the preset as the engine runs it."""

    def __init__(self, model, codec: CacheCodec, bases: Bases, medians: torch.Tensor, tau: float, sides: tuple[str, ...]):
        super().__init__(config=model.config)
        self.codec, self.bases, self.medians, self.tau, self.sides = codec, bases, medians, tau, sides
        self.rope = RotaryFrame.from_config(model.config) if self.codec.keys_before_rope else None
        self.streams: dict[int, tuple[CompressedStream, CompressedStream]] = {}
        self.flags: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        codec = self.codec.layers[layer_idx]
        if layer_idx not in self.streams:
            self.streams[layer_idx] = (
                CompressedStream(codec.keys, self.bases[(layer_idx, "keys")], keys.device, rope=self.rope),
                CompressedStream(codec.values, self.bases[(layer_idx, "values")], values.device))
        ks, vs = self.streams[layer_idx]
        start, n = ks.length, key_states.shape[2]
        ks.append(key_states, torch.arange(start, start + n, device=keys.device)[None].expand(keys.shape[0], -1))
        vs.append(value_states)
        flag = value_states.norm(dim=-1) < self.tau * self.medians[layer_idx].to(values.device)[None, :, None]
        self.flags[layer_idx] = flag if start == 0 else torch.cat([self.flags[layer_idx], flag], -1)
        if start == 0:
            return keys, values
        sink = torch.zeros_like(self.flags[layer_idx][..., :start])
        sink[..., : codec.sink] = True
        flagged = self.flags[layer_idx][..., :start] | sink
        out = []
        for name, stream, exact in (("keys", ks, keys), ("values", vs, values)):
            keep = (flagged if name in self.sides else sink)[..., None]
            past = torch.where(keep, exact[..., :start, :], stream.decode(exact.dtype, 0, start))
            out.append(torch.cat([past, exact[..., start:, :]], 2))
        return tuple(out)

    def flagged_fraction(self) -> tuple[int, int]:
        """(flagged token-heads past the sinks, token-heads past the sinks) over every layer."""
        sink = self.codec.layers[0].sink
        flags = [f[..., sink:] for f in self.flags.values()]
        return sum(int(f.sum()) for f in flags), sum(f.numel() for f in flags)


def stand_in_deltas(model, codec: CacheCodec, bases: Bases, medians: torch.Tensor, tau: float,
                    sides: tuple[str, ...], windows: dict[str, list[torch.Tensor]],
                    base: dict[str, float]) -> tuple[dict[str, float], int, int]:
    """Each domain's PPL delta % through :class:`ExactSinksStandIn`, and (flagged, all) token-heads past the sinks."""
    made: list[ExactSinksStandIn] = []

    def make() -> ExactSinksStandIn:
        made.append(ExactSinksStandIn(model, codec, bases, medians, tau, sides))
        return made[-1]

    by = {d: 100 * (perplexity(model, w, make, CHUNK).ppl / base[d] - 1) for d, w in windows.items()}
    flagged, total = (sum(x) for x in zip(*(m.flagged_fraction() for m in made)))
    return by, flagged, total


def evaluation_windows(tok) -> dict[str, list[torch.Tensor]]:
    """The evaluation protocol's windows of every evaluation corpus (as ``kvhub eval`` reads them)."""
    return {name: token_windows(tok, text, WINDOW_TOKENS, WINDOWS) for name, text in read_texts([str(CORPORA / "evaluation")])}


def side_table_ratio(ratio: float, fraction: float, head_dim: int, sides: int) -> float:
    """``ratio`` against fp16 once a side table holds ``fraction`` of the token-heads exact on ``sides`` streams."""
    side_bytes = sides * 2 * head_dim + POSITION_BYTES if sides else 0
    return 4 * head_dim / (4 * head_dim / ratio + fraction * side_bytes)


def ladder(model, tok, level: int, medians: torch.Tensor, seeds: tuple[int, ...] = SEEDS,
           windows: dict[str, list[torch.Tensor]] | None = None) -> dict:
    """Part 3 (module docstring): ladder level ``level`` over ``seeds`` on the tuning split, or on ``windows``
    (the evaluation protocol's, with ``--evaluation``)."""
    shape = ModelShape.from_config(model.config)
    calib = [str(CORPORA / "calibration")]
    fit, held = split_calibration(tok, calib, TuneConfig(BENCHMARK_MODEL_ID, calib))
    held = held if windows is None else windows
    bases, _ = calibrate(model, fit, sink=SINK, progress=False, keys_before_rope=True)
    codec = codec_from_rungs(stream_ladders(shape.head_dim, "vq"), uniform_rungs(level, shape.num_layers),
                             shape.num_layers, SINK, 0, 16, keys_before_rope=True)
    base = {d: perplexity(model, w, lambda: DynamicCache(config=model.config), CHUNK).ppl for d, w in held.items()}
    engine = measure_trial(model, f"level {level}", codec, bases, held, base, seeds[0])
    runs: dict[str, list[dict]] = {"none": [], "keys and values": []}
    flagged = total = 0
    for seed in seeds:
        rotated = bases.rotated_for(codec, shape, seed)
        for exact, tau in (("none", 0.0), ("keys and values", TAUS[0])):
            by, f, t = stand_in_deltas(model, codec, rotated, medians, tau, SIDES[exact] if tau else (), held, base)
            runs[exact].append(by)
            if tau:
                flagged, total = flagged + f, total + t
            print(f"level {level} seed {seed} exact {exact}: worst {worst_of(runs[exact][-1])[1]:+.2f}%", flush=True)
    rows = []
    for exact, by_seed in runs.items():
        mean = {d: sum(r[d] for r in by_seed) / len(by_seed) for d in held}
        worst = worst_of(mean)
        fraction = flagged / total if exact != "none" else 0.0
        rows.append({"exact": exact, "tau": TAUS[0] if exact != "none" else 0.0, "seeds": list(seeds),
                     "by_seed": [{d: round(v, 4) for d, v in r.items()} for r in by_seed],
                     "worst_domain": worst[0], "worst_delta_pct": round(worst[1], 4),
                     "mean_delta_pct": round(sum(mean.values()) / len(mean), 4),
                     "flagged_token_heads_pct": round(100 * fraction, 4),
                     "compression_with_side_table": round(side_table_ratio(engine.ratio, fraction, shape.head_dim,
                                                                           2 if fraction else 0), 4)})
    return {"level": level, "compression": round(engine.ratio, 4),
            "engine_first_seed": {d: round(v, 4) for d, v in engine.by_domain.items()}, "baseline_ppl": base,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ladder-level", type=int, help="part 3 only: this ladder level on the tuning split")
    parser.add_argument("--evaluation", action="store_true",
                        help="with --ladder-level: on the evaluation protocol instead, at the first seed only")
    args = parser.parse_args()
    t0 = time.time()
    torch.set_grad_enabled(False)
    model, tok = load_model(BENCHMARK_MODEL_ID)
    calibration = [w for _, text in read_texts([str(CORPORA / "calibration")])
                   for w in token_windows(tok, text, WINDOW_TOKENS, 1)]
    medians = value_norm_medians(model, calibration)
    if args.ladder_level is not None:
        where = "the evaluation protocol" if args.evaluation else "the tuning split"
        out = {"what": f"secondary sinks kept exact at a ladder level, on {where} (secondary_sinks.py part 3)",
               "model": BENCHMARK_MODEL_ID, "command": f"python benchmarks/secondary_sinks.py --ladder-level "
               f"{args.ladder_level}" + (" --evaluation" if args.evaluation else ""), "hardware": hardware(),
               **(ladder(model, tok, args.ladder_level, medians, SEEDS[:1], evaluation_windows(tok)) if args.evaluation
                  else ladder(model, tok, args.ladder_level, medians))}
        out["seconds"] = round(time.time() - t0)
        path = OUT.with_name(f"secondary_sinks_level{args.ladder_level}{'_evaluation' if args.evaluation else ''}.json")
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")
        return
    windows = evaluation_windows(tok)

    implementation, model.config._attn_implementation = model.config._attn_implementation, "eager"  # part 1 only
    shares = {name: attention_shares(model, w[0][:, :ATTENTION_TOKENS], medians, SINK, TAUS)
              for name, w in windows.items()}
    model.config._attn_implementation = implementation
    print(f"part 1 done ({time.time() - t0:.0f}s)", flush=True)

    base = {name: perplexity(model, w, lambda: DynamicCache(config=model.config), CHUNK).ppl
            for name, w in windows.items()}
    rows = []
    for label, folder in PRESETS.items():
        preset = KVPreset.from_pretrained(folder)
        metrics = preset.metrics
        ratio = metrics["compression"]["total"]
        head_dim = preset.shape.head_dim
        runs = [("none", 0.0, ())] + [(side, tau, SIDES[side]) for tau in TAUS[:1] for side in SIDES] + \
               [("keys and values", tau, SIDES["keys and values"]) for tau in TAUS[1:]]
        for side, tau, sides in runs:
            by, flagged, total = stand_in_deltas(model, preset.codec, preset.bases, medians, tau, sides, windows, base)
            fraction = flagged / total
            with_table = side_table_ratio(ratio, fraction, head_dim, len(sides))
            worst = worst_of(by)
            row = {"preset": label, "exact": side, "tau": tau, "by_corpus": {k: round(v, 4) for k, v in by.items()},
                   "worst_corpus": worst[0], "worst_delta_pct": round(worst[1], 4),
                   "mean_delta_pct": round(sum(by.values()) / len(by), 4),
                   "flagged_token_heads_pct": round(100 * fraction, 4), "compression": ratio,
                   "compression_with_side_table": round(with_table, 4)}
            if not sides:
                row["recorded"] = {"worst_corpus": metrics["perplexity"]["worst_corpus"],
                                   "worst_delta_pct": metrics["perplexity"]["worst_delta_pct"],
                                   "mean_delta_pct": metrics["perplexity"]["mean_delta_pct"]}
            rows.append(row)
            print(f"{label:32s} exact {side:16s} tau {tau}: worst {row['worst_delta_pct']:+.2f}% ({worst[0]}) mean "
                  f"{row['mean_delta_pct']:+.2f}%, flagged {row['flagged_token_heads_pct']:.2f}%, "
                  f"{row['compression_with_side_table']:.2f}x ({time.time() - t0:.0f}s)", flush=True)
    out = {"what": __doc__.splitlines()[0], "model": BENCHMARK_MODEL_ID,
           "command": "python benchmarks/secondary_sinks.py", "hardware": hardware(), "seconds": round(time.time() - t0),
           "protocol": {"windows": WINDOWS, "window_tokens": WINDOW_TOKENS, "chunk": CHUNK},
           "value_norm_medians": [[round(float(x), 4) for x in row] for row in medians],
           "attention": shares, "baseline_ppl": base, "rows": rows}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Keys compressed before RoPE, measured against the post-RoPE keys kvhub compresses today (frontier-4.md).

A cache sees keys after RoPE has rotated each pair of channels by an angle that grows with the position. The keys'
large, steady channels (KIVI and KVQuant: key outliers are per channel) then point a different way at every position,
so their mean no longer holds them: a PCA of post-RoPE keys spends variance, components and bits on the rotation.
Before RoPE, the mean takes them out exactly and the spectrum is steeper: on SmolLM2's calibration split the keys'
total variance halves (``spectrum`` in the results). Compressing the pre-RoPE key ``R_n^-1 k`` and applying ``R_n``
after decoding costs a decoder that rebuilds each key (attention can no longer run on the codes of a fixed basis:
``q . R_n B c`` turns the basis with the position), so it is measured here before anything is built.

The measurement uses the engine's own streams (:class:`kvhub.stream.CompressedStream`: projection, log8 scales,
Lloyd-Max levels, packed codes, the rotated segments a preset stores) inside a cache layer that keeps each chunk's
past as decoded from those codes and its own chunk exact, as ``kvhub eval`` reads a window. With keys taken as they
come (``post-rope``) it is the engine's arithmetic on another attention path, and is checked against the engine itself
(:class:`kvhub.CompressedCache`) at the bundled preset's level in the same run, for the first seed. With ``pre-rope`` the same layer
un-rotates each key by its position before encoding and rotates the decoded key back; the un-rotation is checked
against the model's own ``k_proj`` output. Bases are fitted as ``kvhub tune`` fits them (the first 85% of every
calibration file, 8 windows of 1024 tokens), and every setting is measured as the tuner measures a trial: one held-out
2048-token window of every calibration file, the worst of the nine domains.

    python benchmarks/prerope_keys.py     # writes benchmarks/results/prerope_keys.json (~55 min on 2 cores)
    python benchmarks/prerope_keys.py --protocol evaluation --settings '3,3;2,1'   # kvhub eval's windows (~45 min)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from kvhub import CompressedCache, ModelShape, load_model
from kvhub.bases import Bases
from kvhub.calibration import _Moments, _RecordingLayer
from kvhub.codec import STREAMS, CacheCodec
from kvhub.corpora import CORPORA
from kvhub.eval import EvalConfig, delta_pct, hardware
from kvhub.eval.ppl import perplexity
from kvhub.models import BENCHMARK_MODEL_ID
from kvhub.protocol import worst_of
from kvhub.storage import exact_dtype_for
from kvhub.stream import CompressedStream
from kvhub.text import read_texts, token_windows
from kvhub.tuning import LEVELS, TuneConfig, codec_from_rungs, split_calibration, stream_ladders

ROOT = Path(__file__).resolve().parents[1]
SINK = 4
# (keys rung, values rung) of the tuner's ladders (kvhub.tuning.stream_ladders), from the key rung (level 9) down past
# the bundled preset's level (6) and the levels where the three-percent tune failed (3, 2), plus key rungs the ladder
# never pairs with these values
DEFAULT_SETTINGS = ((4, 5), (3, 3), (2, 4), (2, 3), (2, 1), (2, 0))
# Seeds of the random rotation in each equal-bit segment (kvhub.bases.rotate_segments): equally good codecs whose
# quantization noise falls on other tokens. One window's delta moves by up to points between them (each row's
# largest_seed_spread_pct: an error in one chunk changes the next chunks' keys, and so every later code), so a
# comparison of two settings is a comparison of their means over seeds.
SEEDS = (0, 1, 2)


def rope(model, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``(cos, sin)`` [T, d] at ``positions``."""
    cos, sin = model.model.rotary_emb(like, positions[None])
    return cos[0], sin[0]


def turn(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``R_n x`` (or ``R_n^-1 x``) for x [B, H, T, d], as transformers' ``apply_rotary_pos_emb`` rotates keys."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos - rotated * sin if inverse else x * cos + rotated * sin


class _TwoRecorders(_RecordingLayer):
    """Calibration's recording layer for the keys and values as cached, plus the moments of the same keys un-rotated
    (``unrotated``; the values have no RoPE, so one record of them serves both)."""

    def __init__(self, model, sink: int) -> None:
        super().__init__(sink)
        self.model, self.unrotated = model, None

    def process(self, key_states, value_states):
        positions = torch.arange(key_states.shape[-2], device=key_states.device)
        cos, sin = rope(self.model, positions, key_states)
        keys = turn(key_states.float(), cos, sin, inverse=True)[:, :, self.sink :]
        if self.unrotated is None:
            self.unrotated = _Moments(keys.shape[1], keys.shape[-1], keys.device)
        self.unrotated.add(keys)
        return super().process(key_states, value_states)


@torch.no_grad()
def calibrate_both(model, windows) -> tuple[Bases, Bases]:
    """``(post, pre)``: kvhub's bases, and the same with each layer's keys fitted on the un-rotated keys."""
    shape = ModelShape.from_config(model.config)
    layers = [_TwoRecorders(model, SINK) for _ in range(shape.num_layers)]
    for ids in windows:
        model(input_ids=ids, cache=Cache(layers=layers), use_cache=True)
    post, pre = Bases(), Bases()
    for i, layer in enumerate(layers):
        for name in STREAMS:
            post[(i, name)] = pre[(i, name)] = layer.moments[name].basis()
        pre[(i, "keys")] = layer.unrotated.basis()
    return post, pre


@torch.no_grad()
def unrotation_error(model, ids: torch.Tensor) -> float:
    """Largest relative difference between the cached keys un-rotated and the ``k_proj`` output they came from."""
    shape = ModelShape.from_config(model.config)
    seen = []
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, out: seen.append(out))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True)
    hook.remove()
    keys = cache.layers[0].keys.float()
    cos, sin = rope(model, torch.arange(keys.shape[-2]), keys)
    raw = seen[0].view(1, -1, shape.num_kv_heads, shape.head_dim).transpose(1, 2).float()
    return ((turn(keys, cos, sin, inverse=True) - raw).abs().max() / raw.abs().max()).item()


class DecodedPastLayer(DynamicLayer):
    """Each chunk attends to its own tokens exactly and to the past as decoded from the engine's codes (the codec's
    ``sink`` first tokens exact in the cache's exact dtype, as a CompressedCache holds them; every later token coded,
    as with ``window=0``); ``model`` set: keys are coded un-rotated and rotated back after decoding."""

    def __init__(self, codec, bases: dict, model=None) -> None:
        super().__init__()
        self.codec, self.bases, self.model = codec, bases, model
        self.seen = 0

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.exact = exact_dtype_for(key_states.dtype)
            self.streams = {n: CompressedStream(self.codec.stream(n), self.bases[n], key_states.device, self.exact)
                            for n in STREAMS}
        out = torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)
        take = max(0, min(self.codec.sink - self.seen, key_states.shape[-2]))
        stored = []
        for name, x in (("keys", key_states), ("values", value_states)):
            x = x.to(self.exact)  # what a CompressedCache holds and encodes
            head, rest = x[:, :, :take].to(key_states.dtype), x[:, :, take:]
            if rest.shape[-2]:
                stream, start = self.streams[name], self.streams[name].length
                turned = name == "keys" and self.model is not None
                if turned:
                    positions = torch.arange(self.seen + take, self.seen + x.shape[-2], device=x.device)
                    cos, sin = rope(self.model, positions, rest.float())
                    rest = turn(rest.float(), cos, sin, inverse=True)
                stream.append(rest)
                rest = stream.decode(torch.float32, start)
                rest = (turn(rest, cos, sin) if turned else rest).to(key_states.dtype)
            stored.append(torch.cat([head, rest], -2))
        self.keys, self.values = torch.cat([self.keys, stored[0]], -2), torch.cat([self.values, stored[1]], -2)
        self.seen += key_states.shape[-2]
        return out


def decoded_past_cache(model, codec: CacheCodec, bases: Bases, prerope: bool) -> Cache:
    layers = [DecodedPastLayer(lc, {n: bases[(i, n)] for n in STREAMS}, model if prerope else None)
              for i, lc in enumerate(codec.layers)]
    return Cache(layers=layers)


def held_ratio(model, codec: CacheCodec, bases: Bases, tokens: int) -> float:
    """The engine's compression ratio (bytes held against fp16) for one window of ``tokens``, as a trial reports it:
    bytes per token are the codec's, the same for every key handling."""
    shape = ModelShape.from_config(model.config)
    cache = CompressedCache(model.config, codec, bases)
    for i in range(shape.num_layers):
        cache.update(*torch.randn(2, 1, shape.num_kv_heads, tokens, shape.head_dim).unbind(), i)
    return cache.compression_ratio()


def spectrum(post: Bases, pre: Bases, shape: ModelShape) -> dict:
    """The keys' calibrated variance summed over layers and heads, and the share of it in the top eighth of the
    components (what the key rung codes at 8 bits), post- and pre-RoPE."""
    out = {}
    for name, bases in (("post-rope", post), ("pre-rope", pre)):
        var = torch.stack([bases[(i, "keys")].variance.double() for i in range(shape.num_layers)])
        out[name] = {"total_variance": round(var.sum().item(), 2),
                     "top_eighth_share": round((var[..., : shape.head_dim // 8].sum() / var.sum()).item(), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=";".join(f"{k},{v}" for k, v in DEFAULT_SETTINGS),
                    help="'keys rung,values rung' pairs of the tuner's ladders, ';'-separated")
    ap.add_argument("--protocol", choices=("tuning", "evaluation"), default="tuning",
                    help="tuning: one held-out window of every calibration file, as the tuner measures a trial; "
                         "evaluation: kvhub eval's windows of every evaluation corpus")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/prerope_keys[_evaluation].json")
    args = ap.parse_args()
    suffix = "" if args.protocol == "tuning" else "_" + args.protocol
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / f"prerope_keys{suffix}.json")
    t0 = time.time()
    torch.set_grad_enabled(False)
    model, tok = load_model(BENCHMARK_MODEL_ID)
    shape = ModelShape.from_config(model.config)
    calib = [str(CORPORA / "calibration")]
    cfg = TuneConfig(BENCHMARK_MODEL_ID, calib)
    fit, held = split_calibration(tok, calib, cfg)
    if args.protocol == "evaluation":
        protocol = EvalConfig([str(CORPORA / "evaluation")])
        held = {name: token_windows(tok, text, protocol.window_tokens, protocol.windows)
                for name, text in read_texts(protocol.ppl_files)}
    unrotation = unrotation_error(model, fit[0])
    print(f"un-rotated cached keys against k_proj: max relative difference {unrotation:.2e}", flush=True)
    post, pre = calibrate_both(model, fit)
    baseline = {d: perplexity(model, w, lambda: DynamicCache(config=model.config)) for d, w in held.items()}
    ladders = stream_ladders(shape.head_dim, "lloyd-max", cfg.scale_format)
    rows = []

    def measure(rungs: tuple[int, int], codec: CacheCodec, ratio: float, keys: str, seeds, make) -> None:
        """One row: every domain's delta for each rotation seed, and their mean over the seeds."""
        per_seed = {seed: {d: round(delta_pct(perplexity(model, w, lambda: make(seed)), baseline[d]), 4)
                           for d, w in held.items()} for seed in seeds}
        by = {d: sum(s[d] for s in per_seed.values()) / len(seeds) for d in held}
        worst, delta = worst_of(by)
        spread = {d: max(s[d] for s in per_seed.values()) - min(s[d] for s in per_seed.values()) for d in held}
        row = {"keys_rung": rungs[0], "values_rung": rungs[1],
               "level": LEVELS.index(rungs) if rungs in LEVELS else None, "keys": keys,
               "key_segments": [[s.size, s.bits] for s in codec.layers[0].keys.segments],
               "value_segments": [[s.size, s.bits] for s in codec.layers[0].values.segments],
               "compression": round(ratio, 4), "seeds": list(seeds), "worst_domain": worst,
               "worst_delta_pct": round(delta, 4), "mean_delta_pct": round(sum(by.values()) / len(by), 4),
               "largest_seed_spread_pct": round(max(spread.values()), 4),
               "by_domain": {d: round(x, 4) for d, x in by.items()},
               "by_seed": {str(seed): d for seed, d in per_seed.items()}}
        rows.append(row)
        print(f"K{rungs[0]} V{rungs[1]} {keys:>10s}: {ratio:.2f}x worst {delta:+.2f}% ({worst}) mean "
              f"{row['mean_delta_pct']:+.2f}%, seeds {list(seeds)}, largest spread {max(spread.values()):.2f}", flush=True)

    for setting in args.settings.split(";"):
        rungs = tuple(int(x) for x in setting.split(","))
        keys_of = {(i, "keys"): rungs[0] for i in range(shape.num_layers)}
        codec = codec_from_rungs(ladders, {**keys_of, **{(i, "values"): rungs[1] for i in range(shape.num_layers)}},
                                 shape.num_layers, SINK, 0, 16)
        engine_bases = post.rotated_for(codec, shape)  # seed 0, made once: every window's cache shares its plans
        ratio = held_ratio(model, codec, engine_bases, cfg.tune_window_tokens)
        if rungs == LEVELS[6]:  # the harness against the engine, at the bundled preset's level
            measure(rungs, codec, ratio, "engine", (0,), lambda seed: CompressedCache(model.config, codec, engine_bases))
        for keys, bases in (("post-rope", post), ("pre-rope", pre)):
            rotated = {seed: bases.rotated_for(codec, shape, seed) for seed in SEEDS}
            measure(rungs, codec, ratio, keys, SEEDS,
                    lambda seed: decoded_past_cache(model, codec, rotated[seed], keys == "pre-rope"))
    command = "python benchmarks/prerope_keys.py" + (f" --protocol {args.protocol}" if suffix else "")
    if args.settings != ap.get_default("settings"):
        command += f" --settings '{args.settings}'"
    out = {"what": __doc__.splitlines()[0], "unrotation_max_relative_error": unrotation,
           "spectrum": spectrum(post, pre, shape), "tuning_windows": {d: len(w) for d, w in held.items()},
           "window_tokens": next(iter(held.values()))[0].shape[-1], "calibration_tokens": sum(w.shape[-1] for w in fit),
           "hardware": hardware(), "seconds": round(time.time() - t0), "command": command, "rows": rows}
    out_path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

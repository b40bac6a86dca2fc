"""Frontier 2.0 directions, measured on SmolLM2-135M-Instruct: what each would buy before it is built.

1. ``damage``: per layer, the relative error of the attention output after ``W_o`` (real queries, causal softmax,
   GQA) when only that layer's keys or values are coded, averaged over the 30 layers; one 1024-token window of
   Emma and of the Python library reference. Layouts are coded on the plain PCA basis and on a basis weighted by
   what attention does with the error: keys by the query covariance E[q q^T] of the heads that read them (the score
   error q.e), values by sum_h W_o,h^T W_o,h (the output error). Each segment is rotated as in the engine; keys
   use per-token absmax scales, values RMS scales.
2. ``cross_layer``: the share of each layer's centred K (V) variance that a least-squares linear prediction from the
   previous layer's K (V) explains on evaluation text (fitted on calibration text): the most that coding only the
   residual can save is ``0.5 * log2(1 / (1 - R^2))`` bits per component.
3. ``rate_distortion``: bits per component a Gaussian source with each head's calibrated PCA spectrum needs, under
   reverse water-filling, to reach the bundled preset's measured coefficient MSE (keys 0.0101, values 0.036 of the
   mean variance, ``quantizer_mse.json``): the bound any scalar or vector code of these coefficients is measured
   against.
4. ``screen`` (``--screen``): chunked perplexity of codec variants on one 2048-token window per evaluation corpus
   (5 corpora; the full protocol is ``frontier.py``): scale formats and static scales, Lloyd-Max values, and a
   per-layer allocation ranked by the damage of (1).

    python benchmarks/directions.py [--screen]     # writes benchmarks/results/directions.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvhub import CacheCodec, CompressedCache, LayerCodec, ModelShape, StreamCodec, calibrate, load_model
from kvhub.attention import enable
from kvhub.bases import segment_rotation
from kvhub.codec import Segment
from kvhub.corpora import CORPORA
from kvhub.eval import hardware
from kvhub.eval.ppl import window_nll
from kvhub.models import BENCHMARK_MODEL_ID
from kvhub.quantizers.uniform import GAUSSIAN_STEP
from kvhub.text import read_texts, token_windows
from kvhub.tuning import TuneConfig, split_calibration

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from frontier import EVALUATION  # noqa: E402

SINK = 4
PRESET_MSE = {"keys": 0.0101, "values": 0.036}  # quantizer_mse.json, the bundled layout on the books
KEY_LAYOUTS = {"K64x4": [(64, 4)], "K48x4+16x2": [(48, 4), (16, 2)], "K32x4+32x2": [(32, 4), (32, 2)],
               "K8x8+24x4+32x2": [(8, 8), (24, 4), (32, 2)], "K8x8+40x4+16x2": [(8, 8), (40, 4), (16, 2)],
               "K16x8+48x4": [(16, 8), (48, 4)]}
VALUE_LAYOUTS = {"V32x4+32x2": [(32, 4), (32, 2)], "V16x4+48x2": [(16, 4), (48, 2)], "V64x2": [(64, 2)]}
_RECORD: dict[int, tuple[torch.Tensor, ...]] = {}


def _recording_attention(module, q, k, v, mask, **kw):
    _RECORD[module.layer_idx] = (q.detach()[0].double(), k.detach()[0].double(), v.detach()[0].double())
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


AttentionInterface.register("kvhub_record", _recording_attention)


@torch.no_grad()
def record(model, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, ...]]:
    """Per layer post-RoPE (q [Hq, T, d], k [H, T, d], v [H, T, d]) of one forward pass."""
    _RECORD.clear()
    model.set_attn_implementation("kvhub_record")
    try:
        model(input_ids=ids)
    finally:
        model.set_attn_implementation("sdpa")
    return dict(_RECORD)


def _sqrtm(c: torch.Tensor, reg: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """C^(1/2) and C^(-1/2) per head, eigenvalues floored at ``reg`` times their mean (queries never probe some
    directions; without a floor the inverse would amplify the coding error there without bound)."""
    e, v = torch.linalg.eigh(c)
    e = e.clamp_min(0) + reg * e.mean(-1, keepdim=True)
    return (v * e.sqrt()[:, None]) @ v.transpose(1, 2), (v * e.rsqrt()[:, None]) @ v.transpose(1, 2)


def coder(x: torch.Tensor, layout, weight: torch.Tensor | None):
    """(mean, encoder [H, d, d], decoder [H, d, d]) of a PCA basis of ``x`` [H, N, d], in the space whitened by
    ``weight`` (None: plain PCA), each quantized segment rotated as the engine rotates it."""
    d = x.shape[-1]
    mean = x.mean(1)
    xc = x - mean[:, None]
    cov = xc.transpose(1, 2) @ xc / x.shape[1]
    w, w_inv = (torch.eye(d, dtype=x.dtype).expand_as(cov),) * 2 if weight is None else _sqrtm(weight)
    u = torch.linalg.eigh(w @ cov @ w)[1].flip(-1).clone()
    start = 0
    for size, bits in layout:
        if bits < 16:
            u[..., start : start + size] = u[..., start : start + size] @ segment_rotation(size, 0)
        start += size
    return mean, u.transpose(1, 2) @ w, w_inv @ u


def code(x: torch.Tensor, made, layout, statistic: str) -> torch.Tensor:
    """``x`` [H, T, d] through ``made`` (:func:`coder`) with uniform codes, per-token absmax or RMS scales."""
    mean, enc, dec = made
    z = torch.einsum("hrd,htd->htr", enc, x - mean[:, None])
    out, start = torch.zeros_like(z), 0
    for size, bits in layout:
        part = z[..., start : start + size]
        half = 2 ** (bits - 1) - 0.5
        if statistic == "absmax":
            step = part.abs().amax(-1, keepdim=True).clamp_min(1e-8) / half
        else:
            step = part.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8) * GAUSSIAN_STEP[bits]
        out[..., start : start + size] = (torch.round(part / step + half).clamp(0, 2**bits - 1) - half) * step
        start += size
    return torch.einsum("hdr,htr->htd", dec, out) + mean[:, None]


def attention_output(q, k, v, w_o) -> torch.Tensor:
    group = q.shape[0] // k.shape[0]
    o = torch.nn.functional.scaled_dot_product_attention(q[None], k.repeat_interleave(group, 0)[None],
                                                         v.repeat_interleave(group, 0)[None], is_causal=True)[0]
    return o.transpose(0, 1).reshape(q.shape[1], -1) @ w_o.T


def damage_table(model, calib: list[dict], evals: dict[str, dict]) -> dict:
    """Mean over layers of the relative attention-output error, per layout, basis and corpus."""
    shape = ModelShape.from_config(model.config)
    out: dict[str, list[float]] = {}
    for i in range(shape.num_layers):
        q = torch.cat([r[i][0][:, SINK:] for r in calib], 1)
        k, v = (torch.cat([r[i][s][:, SINK:] for r in calib], 1) for s in (1, 2))
        d = shape.head_dim
        qg = q.view(shape.num_kv_heads, -1, d)  # the query heads that read each KV head, stacked
        w_o = model.model.layers[i].self_attn.o_proj.weight.double()
        w_heads = w_o.view(w_o.shape[0], q.shape[0], d).permute(1, 0, 2)  # [query heads, hidden, d]
        weights = {"keys": qg.transpose(1, 2) @ qg / qg.shape[1],
                   "values": (w_heads.transpose(1, 2) @ w_heads).view(shape.num_kv_heads, -1, d, d).sum(1)}
        for stream, layouts, x, stat in (("keys", KEY_LAYOUTS, k, "absmax"), ("values", VALUE_LAYOUTS, v, "deviation")):
            for name, layout in layouts.items():
                for basis, weight in (("pca", None), ("weighted", weights[stream])):
                    made = coder(x, layout, weight)
                    for corpus, rec in evals.items():
                        qe, ke, ve = rec[i]
                        exact = attention_output(qe, ke, ve, w_o)
                        coded = code(ke[:, SINK:] if stream == "keys" else ve[:, SINK:], made, layout, stat)
                        ke2, ve2 = ke.clone(), ve.clone()
                        (ke2 if stream == "keys" else ve2)[:, SINK:] = coded
                        err = (attention_output(qe, ke2, ve2, w_o) - exact).pow(2).sum() / exact.pow(2).sum()
                        out.setdefault(f"{name}|{basis}|{corpus}", []).append(err.item())
    return {key: round(sum(v) / len(v), 5) for key, v in out.items()}


def cross_layer(calib: list[dict], evals: dict[str, dict], layers: int) -> dict:
    """R^2 of predicting layer i's K (V) from layer i-1's, per stream, mean over layers and heads."""
    out = {}
    for s, stream in ((1, "keys"), (2, "values")):
        r2 = {c: [] for c in evals}
        for i in range(1, layers):
            x = torch.cat([r[i - 1][s][:, SINK:] for r in calib], 1)
            y = torch.cat([r[i][s][:, SINK:] for r in calib], 1)
            mx, my = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
            a = torch.linalg.lstsq(x - mx, y - my).solution  # [H, d, d]
            for corpus, rec in evals.items():
                xe, ye = rec[i - 1][s][:, SINK:], rec[i][s][:, SINK:]
                resid = (ye - my) - (xe - mx) @ a
                r2[corpus].append(1 - (resid.pow(2).sum() / (ye - ye.mean(1, keepdim=True)).pow(2).sum()).item())
        out[stream] = {c: round(sum(v) / len(v), 4) for c, v in r2.items()}
    return out


def rate_distortion(calib: list[dict], layers: int) -> dict:
    """Bits per component reverse water-filling needs for the preset's relative MSE, mean over layers and heads."""
    out = {}
    for s, stream in ((1, "keys"), (2, "values")):
        bits = []
        for i in range(layers):
            x = torch.cat([r[i][s][:, SINK:] for r in calib], 1)
            xc = x - x.mean(1, keepdim=True)
            for ev in torch.linalg.eigvalsh(xc.transpose(1, 2) @ xc / x.shape[1]).clamp_min(1e-12):
                target = PRESET_MSE[stream] * ev.sum()
                lo, hi = 0.0, ev.max().item()
                for _ in range(60):  # the water level theta with sum(min(theta, eigenvalue)) = target
                    theta = (lo + hi) / 2
                    if ev.clamp(max=theta).sum() < target:
                        lo = theta
                    else:
                        hi = theta
                bits.append(0.5 * torch.log2(ev / hi).clamp_min(0).sum().item() / ev.numel())
        out[stream] = round(sum(bits) / len(bits), 3)
    return out


def screen(model, tok, bases: dict) -> dict:
    """PPL delta % per corpus (one middle 2048-token window each) and bytes ratio, per codec variant."""
    enable(model)
    shape = ModelShape.from_config(model.config)
    windows = {name: token_windows(tok, text, 2048, 1)[0] for name, text in read_texts([d for d in EVALUATION if d.is_dir()])}
    base = {n: window_nll(model, ids, DynamicCache(config=model.config)).ppl for n, ids in windows.items()}

    def seg(*plan, **kw):
        return StreamCodec(tuple(Segment(a, b) for a, b in plan), "pca", **kw)

    k4, v42 = seg((64, 4), scale="token"), seg((32, 4), (32, 2), scale="rms")
    k8, v8 = replace(k4, scale_format="log8"), replace(v42, scale_format="log8")
    v8lm = replace(v8, quantizer="lloyd-max")
    down_v, down_k = seg((16, 4), (48, 2), scale="rms", quantizer="lloyd-max", scale_format="log8"), \
        replace(seg((48, 4), (16, 2), scale="token"), scale_format="log8")
    ranked = json.loads((ROOT / "benchmarks" / "results" / "directions.json").read_text())["damage_per_layer"]
    low_v = set(sorted(range(shape.num_layers), key=lambda i: ranked["values"][i])[:15])
    low_k = set(sorted(range(shape.num_layers), key=lambda i: ranked["keys"][i])[:10])

    def per_layer(fn):
        return CacheCodec(tuple(LayerCodec(*fn(i), sink=SINK, window=0) for i in range(shape.num_layers)))

    variants = {
        "bundled layout, fp16 scales": ("books", per_layer(lambda i: (k4, v42))),
        "log8 scales": ("books", per_layer(lambda i: (k8, v8))),
        "log8 scales, Lloyd-Max V": ("books", per_layer(lambda i: (k8, v8lm))),
        "static (channel) V scales": ("books", per_layer(lambda i: (k4, replace(v42, scale="channel")))),
        "static (channel) K scales": ("books", per_layer(lambda i: (replace(k4, scale="channel"), v42))),
        "log8, Lloyd-Max V, widened calibration": ("wide", per_layer(lambda i: (k8, v8lm))),
        "  + V 16x4+48x2 on the 15 layers of least value damage": ("wide", per_layer(lambda i: (k8, down_v if i in low_v else v8lm))),
        "  + K 48x4+16x2 on the 10 layers of least key damage": ("wide", per_layer(lambda i: (down_k if i in low_k else k8, v8lm))),
    }
    out = {}
    fp16 = 2 * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * 2048
    for name, (calibration, codec) in variants.items():
        rotated = bases[calibration].rotated_for(codec, shape)
        row, held = {}, 0
        for corpus, ids in windows.items():
            cache = CompressedCache(model.config, codec, rotated)
            row[corpus] = round(100 * (window_nll(model, ids, cache).ppl / base[corpus] - 1), 3)
            held = cache.nbytes()["total"]
        out[name] = {"calibration": calibration, "ratio": round(fp16 / held, 3), "delta_pct": row}
        print(f"{name:<58} {out[name]['ratio']:.3f}x " + " ".join(f"{v:+.2f}" for v in row.values()), flush=True)
    return out


def per_layer_damage(model, calib: list[dict], evals: dict[str, dict]) -> dict:
    """Per layer, how much the damage of (1) grows from the bundled layout to one rung cheaper (PCA basis, summed
    over the evaluation windows): the ranking the per-layer allocation of the screen uses."""
    shape = ModelShape.from_config(model.config)
    out = {"keys": [], "values": []}
    for i in range(shape.num_layers):
        w_o = model.model.layers[i].self_attn.o_proj.weight.double()
        for s, stream, (cheap, dear), stat in ((1, "keys", ([(48, 4), (16, 2)], [(64, 4)]), "absmax"),
                                              (2, "values", ([(16, 4), (48, 2)], [(32, 4), (32, 2)]), "deviation")):
            x = torch.cat([r[i][s][:, SINK:] for r in calib], 1)
            coders = {id(layout): coder(x, layout, None) for layout in (cheap, dear)}  # fitted once, not per corpus
            grow = 0.0
            for rec in evals.values():
                exact = attention_output(*rec[i], w_o)
                for sign, layout in ((1, cheap), (-1, dear)):
                    kv = [rec[i][1].clone(), rec[i][2].clone()]
                    kv[s - 1][:, SINK:] = code(kv[s - 1][:, SINK:], coders[id(layout)], layout, stat)
                    err = attention_output(rec[i][0], *kv, w_o) - exact
                    grow += sign * (err.pow(2).sum() / exact.pow(2).sum()).item()
            out[stream].append(round(grow, 6))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--screen", action="store_true", help="also run the perplexity screen (needs the damage file)")
    args = ap.parse_args()
    t0 = time.time()
    torch.set_grad_enabled(False)
    model, tok = load_model(BENCHMARK_MODEL_ID)
    path = ROOT / "benchmarks" / "results" / "directions.json"
    if args.screen:
        result = json.loads(path.read_text())
        bases = {}
        books = sorted(p for p in (CORPORA / "calibration").glob("*.txt") if p.stem.startswith(("austen", "kjv")))
        for tag, paths in (("books", books), ("wide", [CORPORA / "calibration"])):  # wide: every domain
            fit, _ = split_calibration(tok, [str(p) for p in paths], TuneConfig(BENCHMARK_MODEL_ID, [str(p) for p in paths]))
            bases[tag] = calibrate(model, fit, sink=SINK, progress=False)[0]
        result["screen"] = screen(model, tok, bases)
        result["screen_seconds"] = round(time.time() - t0)
    else:
        calib_text = read_texts([CORPORA / "calibration"])
        calib = [record(model, ids) for _, text in calib_text for ids in token_windows(tok, text, 1024, 2, where="spread")][:8]
        evals = {name: record(model, token_windows(tok, text, 1024, 1)[0])
                 for name, text in read_texts([d for d in EVALUATION if d.is_dir()]) if name in ("austen_emma", "python_docs_library")}
        layers = model.config.num_hidden_layers
        result = {"command": "python benchmarks/directions.py", "hardware": hardware(),
                  "what": __doc__.split("\n\n")[1].strip(),
                  "damage": damage_table(model, calib, evals), "damage_per_layer": per_layer_damage(model, calib, evals),
                  "cross_layer_r2": cross_layer(calib, evals, layers), "rate_distortion_bits": rate_distortion(calib, layers),
                  "bits_per_token": {name: sum(n * b for n, b in lay) + 16 * len(lay)
                                     for name, lay in {**KEY_LAYOUTS, **VALUE_LAYOUTS}.items()}}
        result["seconds"] = round(time.time() - t0)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

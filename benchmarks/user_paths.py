"""The paths users take, measured against DynamicCache in the same run (ratios, never absolute targets).

* ``peak``: peak RSS increase of one ``model.generate`` on an 8k-token prompt in a single call (SmolLM2, the
  books-tuned preset of ``decode_speed.PRESET``, whose codes the fused kernels read), a fresh process per method.
* ``short``: decode step at 1k tokens, batch 1 (a short chat), caches filled by a real single-shot prefill.
* ``real4k``: decode step at 4k tokens, batch 4, caches filled by a real single-shot prefill of evaluation text.
* ``sliding``: decode step at 8k tokens, batch 4, on a Mistral-shaped model whose every layer slides (window 4096,
  32 heads, 8 KV heads, head_dim 128; 8 layers and a narrow MLP so 2 CPU cores can run it: the subject is the
  attention layer), kvhub's compressed sliding layers against DynamicCache's sliding layers.
* ``bytes``: per sequence, what a cache built from that preset allocates (every tensor reachable from its
  layers, walked, shared preset tensors excluded) against ``nbytes()`` and against fp16, at 2k and 8k tokens.

    python benchmarks/user_paths.py                 # everything, ~15 min on 2 cores
    python benchmarks/user_paths.py --only short,peak
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import PRESET, ROOT, RssSampler, git_commit, interleaved_step_times, make_caches, random_bases, scaled_codec  # noqa: E402

from kvhub import CompressedCache, KVPreset, ModelShape, compressed_attention, load_model  # noqa: E402
from kvhub.cache import FP16_BYTES, shared_storages, walked_nbytes  # noqa: E402
from kvhub.text import read_texts, token_windows  # noqa: E402

EVALUATION = ROOT / "corpora" / "evaluation"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
STEPS = 15


def text_ids(tok, tokens: int, batch: int) -> torch.Tensor:
    texts = [t for _, t in read_texts([EVALUATION])]
    return torch.cat([token_windows(tok, texts[i % len(texts)], tokens, 1 + i // len(texts))[i // len(texts)]
                      for i in range(batch)])


@torch.no_grad()
def prefilled(model, makers: dict, ids: torch.Tensor) -> dict:
    caches = {}
    for name, make in makers.items():
        caches[name] = make()
        with compressed_attention(model):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=caches[name], use_cache=True)
    return caches


def step_row(model, caches: dict, batch: int, context: int) -> dict:
    times = interleaved_step_times(model, caches, batch, STEPS, "cpu")
    return {"context": context, "batch": batch, "step_s": times,
            "ratio_vs_dynamic": {m: t / times["DynamicCache"] for m, t in times.items()}}


def short_and_real(model, tok, preset: KVPreset, context: int, batch: int) -> dict:
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config), "kvhub": lambda: preset.build_cache(model)}
    return step_row(model, prefilled(model, makers, text_ids(tok, context, batch)), batch, context)


def mistral_shaped() -> MistralForCausalLM:
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=8,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, sliding_window=4096,
                        max_position_embeddings=32768)
    return MistralForCausalLM(cfg).eval()


def sliding(preset: KVPreset, context: int = 8192, batch: int = 4) -> dict:
    model = mistral_shaped()
    shape = ModelShape.from_config(model.config)
    codec, bases = scaled_codec(preset, shape), random_bases(shape)
    makers = {"DynamicCache": lambda: DynamicCache(config=model.config),
              "kvhub": lambda: CompressedCache(model.config, codec, bases)}
    ids = torch.randint(0, model.config.vocab_size, (batch, context))
    caches = {}
    for name, make in makers.items():  # chunked prefill: 8k x batch 4 through 32 heads in one call would not fit
        caches[name] = make()
        with torch.no_grad(), compressed_attention(model):
            for start in range(0, context, 1024):
                model(input_ids=ids[:, start : start + 1024], cache=caches[name], use_cache=True)
    row = step_row(model, caches, batch, context)
    row["held_tokens"] = {"DynamicCache": caches["DynamicCache"].layers[0].keys.shape[-2],
                          "kvhub": caches["kvhub"].layers[0].held_tokens()}
    return row


def bytes_rows(model, tok, preset: KVPreset) -> list[dict]:
    rows = []
    shape = ModelShape.from_config(model.config)
    for context in (2048, 8192):
        ids = text_ids(tok, context, 1)
        cache = preset.build_cache(model)
        with torch.no_grad(), compressed_attention(model):
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=33, do_sample=False)
        shared = set(shared_storages(cache.bases))
        allocated, held = walked_nbytes(cache, shared), cache.nbytes()["total"]
        tokens = cache.get_seq_length()
        fp16 = tokens * 2 * FP16_BYTES * shape.num_layers * shape.num_kv_heads * shape.head_dim
        rows.append({"tokens": tokens, "held_nbytes": held, "allocated_walked": allocated,
                     "allocated_over_held": allocated / held, "fp16_bytes": fp16,
                     "ratio_vs_fp16_held": fp16 / held, "ratio_vs_fp16_allocated": fp16 / allocated,
                     "shared_bases_bytes": cache.bases_nbytes()})
    return rows


def peak_child(method: str, context: int) -> None:
    model, tok = load_model(MODEL_ID)
    preset = KVPreset.from_pretrained(str(PRESET))
    ids = text_ids(tok, context, 1)
    make = {"DynamicCache": lambda: DynamicCache(config=model.config), "kvhub": lambda: preset.build_cache(model)}[method]
    with torch.no_grad(), compressed_attention(model):
        model.generate(ids[:, :16], attention_mask=torch.ones_like(ids[:, :16]), cache=make(), max_new_tokens=2)  # warm-up
        cache = make()
        with RssSampler() as rss:
            model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=16, do_sample=False)
    print(json.dumps({"peak_rss_increase_bytes": rss.peak - rss.start}))


def peak(context: int = 8192) -> dict:
    out = {}
    for method in ("DynamicCache", "kvhub"):
        run = subprocess.run([sys.executable, __file__, "--child", method, str(context)], capture_output=True, text=True,
                             check=True)
        out[method] = json.loads(run.stdout.strip().splitlines()[-1])
    out["ratio_vs_dynamic"] = out["kvhub"]["peak_rss_increase_bytes"] / out["DynamicCache"]["peak_rss_increase_bytes"]
    return {"context": context, **out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="peak,short,real4k,sliding,bytes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "user_paths.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return peak_child(args.child[0], int(args.child[1]))
    parts = args.only.split(",")
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    result.update({"hardware": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
                   "dtype": "float32", "command": "python " + " ".join(sys.argv), "commit": git_commit()})
    preset = KVPreset.from_pretrained(str(PRESET))
    if "peak" in parts:
        result["peak_generate_8k"] = peak()
        print(json.dumps(result["peak_generate_8k"]), flush=True)
    if {"short", "real4k", "bytes"} & set(parts):
        model, tok = load_model(MODEL_ID)
        if "short" in parts:
            result["decode_1k_batch1"] = short_and_real(model, tok, preset, 1024, 1)
            print(json.dumps(result["decode_1k_batch1"]), flush=True)
        if "real4k" in parts:
            result["decode_4k_batch4_real_prefill"] = short_and_real(model, tok, preset, 4096, 4)
            print(json.dumps(result["decode_4k_batch4_real_prefill"]), flush=True)
        if "bytes" in parts:
            result["allocated_per_sequence"] = bytes_rows(model, tok, preset)
            print(json.dumps(result["allocated_per_sequence"]), flush=True)
        del model
    if "sliding" in parts:
        result["sliding_8k_batch4"] = sliding(preset)
        print(json.dumps(result["sliding_8k_batch4"]), flush=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()

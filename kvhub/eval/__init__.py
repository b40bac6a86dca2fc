"""Evaluation of a compressed cache against the uncompressed baseline in the same run: perplexity under
compression, needle retrieval, and the bytes the cache really held. Produces the ``metrics`` block of a preset."""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import Cache

from .. import __version__
from ..footprint import Footprint
from ..protocol import worst_of
from ..text import corpus_sha256, read_texts, token_windows
from .needle import CONTEXTS, DEPTHS, NeedleGrid, needle_grid
from .ppl import PerplexityResult, window_nll


@dataclass
class EvalConfig:
    """What to measure; the defaults are the protocol of docs/field.md."""

    ppl_files: list[str]
    windows: int = 3
    window_tokens: int = 2048
    chunk: int = 128
    needle: bool = False
    haystack: str | None = None  # default: the Persuasion file among ppl_files
    contexts: tuple[int, ...] = CONTEXTS
    depths: tuple[float, ...] = DEPTHS
    progress: bool = True

    def work(self, files: int) -> dict[str, int]:
        """What a run on ``files`` evaluation files does, each measurement through both caches: perplexity windows
        and their tokens, needle cells and their prompt tokens (the baseline's shared prefixes counted in full)."""
        cells = len(self.contexts) * len(self.depths) if self.needle else 0
        return {"ppl_windows": files * self.windows, "ppl_tokens": 2 * files * self.windows * self.window_tokens,
                "needle_cells": cells, "needle_tokens": 2 * len(self.depths) * sum(self.contexts) if self.needle else 0}

    def plan(self, files: int) -> str:
        """One line saying what the run will cost, before it starts."""
        w = self.work(files)
        line = (f"this run: perplexity on {files} file(s) x {self.windows} window(s) x {self.window_tokens:,} tokens, "
                f"each through DynamicCache and the preset ({w['ppl_tokens']:,} tokens)")
        if self.needle:
            line += (f"; needle grid {len(self.contexts)} length(s) x {len(self.depths)} depth(s), each through both "
                     f"({2 * w['needle_cells']} prompts, up to {w['needle_tokens']:,} tokens)")
        return line


# ``kvhub eval --quick``: one short window per file and three needle cells at 1k, about a ninth of the full protocol's
# tokens, to check a preset works and see its order of magnitude before the full run.
QUICK = {"windows": 1, "window_tokens": 1024, "contexts": (1024,), "depths": (0.1, 0.5, 0.9)}


@dataclass
class EvalResult:
    ppl: dict[str, dict[str, float]] = field(default_factory=dict)
    needle: NeedleGrid | None = None
    needle_baseline: NeedleGrid | None = None
    bytes: dict[str, int] = field(default_factory=dict)
    compression: dict[str, float] = field(default_factory=dict)
    footprint: Footprint | None = None  # per-sequence, shared-bases and allocated bytes of the last window

    @property
    def mean_delta_pct(self) -> float:
        return sum(r["delta_pct"] for r in self.ppl.values()) / len(self.ppl)

    @property
    def worst(self) -> tuple[str, float]:
        """The corpus (domain) that lost the most, and its delta: the number a preset's promise is held to."""
        return worst_of({name: row["delta_pct"] for name, row in self.ppl.items()})


def delta_pct(compressed: PerplexityResult, base: PerplexityResult) -> float:
    """Perplexity change in percent of the same tokens read through two caches."""
    return 100 * (math.exp((compressed.nll_sum - base.nll_sum) / base.tokens) - 1)


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean over windows (None for one window: no spread to estimate)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{platform.machine()} CPU x{torch.get_num_threads()} threads, torch {torch.__version__}"


def _haystack(cfg: EvalConfig) -> str:
    if cfg.haystack:
        return Path(cfg.haystack).read_text(encoding="utf-8")
    for name, text in read_texts(cfg.ppl_files):
        if "persuasion" in name:
            return text
    raise ValueError("no haystack: pass --haystack or include austen_persuasion.txt among the perplexity files")


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    make_cache: Callable[[], Cache],
    cfg: EvalConfig,
    baseline: Callable[[], Cache] | None = None,
    log: Callable[[str], None] | None = None,
) -> EvalResult:
    """Measure ``make_cache`` against ``baseline`` (default: DynamicCache) with identical inputs and chunking.
    ``log`` gets what the run will cost before it starts (:meth:`EvalConfig.plan`), and after the first window
    through both caches, how long the whole run should take at that pace."""
    baseline = baseline or (lambda: DynamicCache(config=model.config))
    result = EvalResult()
    texts = read_texts(cfg.ppl_files)
    last_cache: Cache | None = None
    work = cfg.work(len(texts))
    if log:
        log(cfg.plan(len(texts)))
    started, pairs = time.perf_counter(), 0
    with tqdm(total=work["ppl_windows"] * 2, desc="perplexity", unit="window", disable=not cfg.progress) as bar:
        for name, text in texts:
            sums = {"base": PerplexityResult(0.0, 0), "compressed": PerplexityResult(0.0, 0)}
            per_window: list[float] = []
            for ids in token_windows(tokenizer, text, cfg.window_tokens, cfg.windows):
                pair = {}
                for key, factory in (("base", baseline), ("compressed", make_cache)):
                    cache = factory()
                    pair[key] = r = window_nll(model, ids, cache, cfg.chunk)
                    sums[key] = sums[key] + r
                    if key == "compressed":
                        last_cache, last_batch = cache, ids.shape[0]
                    bar.update()
                per_window.append(delta_pct(pair["compressed"], pair["base"]))
                pairs += 1
                if log and pairs == 1:
                    took = time.perf_counter() - started
                    pace = took / (2 * ids.shape[-1])
                    whole = pace * (work["ppl_tokens"] + work["needle_tokens"])
                    log(f"the first window through both caches took {took:.0f} s: at that pace the whole run takes "
                        f"about {f'{whole:.0f} s' if whole < 90 else f'{whole / 60:.0f} min'}")
            base, comp = sums["base"].ppl, sums["compressed"].ppl
            result.ppl[name] = {"base": base, "compressed": comp, "delta_pct": 100 * (comp / base - 1)}
            se = standard_error(per_window)
            if se is not None:
                result.ppl[name]["delta_pct_se"] = se
    if last_cache is not None and hasattr(last_cache, "nbytes"):
        result.footprint = Footprint.of_cache(last_cache, last_batch)
        result.bytes = last_cache.nbytes() | result.footprint.record()
        fp16 = last_cache.fp16_nbytes()
        per_stream = last_cache.stream_nbytes()
        result.compression = {
            "keys": fp16 / 2 / per_stream["keys"],
            "values": fp16 / 2 / per_stream["values"],
            "total": fp16 / result.bytes["total"],
        }
    if cfg.needle:
        hay = _haystack(cfg)
        cells = len(cfg.contexts) * len(cfg.depths) * 2
        with tqdm(total=cells, desc="needle", unit="cell", disable=not cfg.progress) as bar:
            result.needle_baseline = needle_grid(model, tokenizer, hay, baseline, cfg.contexts, cfg.depths, bar.update)
            result.needle = needle_grid(model, tokenizer, hay, make_cache, cfg.contexts, cfg.depths, bar.update)
    return result


def metrics_block(result: EvalResult, cfg: EvalConfig, command: str | None = None) -> dict[str, Any]:
    """The preset's ``metrics`` object (schemas/preset.schema.json)."""
    metrics: dict[str, Any] = {
        "context_length": cfg.window_tokens,
        "compression": {k: round(v, 4) for k, v in result.compression.items()},
        "bytes": result.bytes,
        "perplexity": {
            "corpora": {n: {k: round(v, 4) for k, v in row.items()} for n, row in result.ppl.items()},
            "mean_delta_pct": round(result.mean_delta_pct, 4),
            "worst_corpus": result.worst[0],
            "worst_delta_pct": round(result.worst[1], 4),
            "windows": cfg.windows,
            "window_tokens": cfg.window_tokens,
            "chunk": cfg.chunk,
        },
        "eval_corpus": ", ".join(Path(p).name for p in cfg.ppl_files),
        "eval_corpus_sha256": corpus_sha256(cfg.ppl_files),
        "hardware": hardware(),
        "date": datetime.date.today().isoformat(),
        "kvhub_version": __version__,
    }
    if result.needle is not None and result.needle_baseline is not None:
        metrics["needle"] = {
            "context_lengths": result.needle.context_lengths,
            "depths": result.needle.depths,
            "compressed": result.needle.hits,
            "baseline": result.needle_baseline.hits,
            "accuracy": round(result.needle.accuracy, 4),
            "baseline_accuracy": round(result.needle_baseline.accuracy, 4),
        }
    if command:
        metrics["command"] = command
    return metrics


__all__ = ["QUICK", "EvalConfig", "EvalResult", "delta_pct", "evaluate", "metrics_block", "standard_error",
           "token_windows"]

"""``kvhub eval``: measure a preset against the uncompressed cache on the same text in the same run."""

from __future__ import annotations

import json
import shlex
import sys

import click

from ..corpora import CORPORA, default_corpus
from .options import device_option


@click.command("eval")
@click.argument("preset")
@click.option("--model", "model_name", default=None, help="Local folder or Hub id (default: the preset's base model).")
@click.option("--ppl", "ppl_files", multiple=True, type=click.Path(exists=True),
              help=f"Evaluation text files or folders (repeatable; default: {CORPORA / 'evaluation'}, the "
                   f"checkout's corpora/evaluation).")
@click.option("--quick", is_flag=True,
              help="A quick check: 1 window of 1,024 tokens per file and, with --needle, 3 needle cells at 1,024 tokens "
                   "(about a ninth of the full protocol; options given explicitly still apply).")
@click.option("--windows", default=3, show_default=True, help="Windows per file.")
@click.option("--window-tokens", default=2048, show_default=True)
@click.option("--chunk", default=128, show_default=True, help="Tokens fed through the cache per forward pass.")
@click.option("--needle/--no-needle", default=False, help="Also run the passkey retrieval grid.")
@click.option("--context-lengths", default="1024,2048,4096", show_default=True, help="Needle prompt lengths.")
@click.option("--haystack", type=click.Path(exists=True), default=None, help="Needle haystack (default: Persuasion).")
@device_option
@click.option("--json", "json_out", type=click.Path(), default=None, help="Write the metrics JSON here.")
@click.option("--write-metrics", is_flag=True, help="Store the metrics in the preset folder's config.")
def eval_cmd(preset, model_name, ppl_files, quick, windows, window_tokens, chunk, needle, context_lengths, haystack,
             device, json_out, write_metrics) -> None:
    """Perplexity under compression (and the needle grid) of PRESET next to DynamicCache.

    Says what the run will cost before it starts, and how long it should take after its first window. The full
    protocol (the defaults) is what verification re-runs; --quick is a first look."""
    from ..eval import QUICK, EvalConfig, evaluate, metrics_block
    from ..models import load_model
    from ..preset import KVPreset

    ppl_files = ppl_files or (str(default_corpus("evaluation")),)
    contexts = tuple(int(c) for c in context_lengths.split(","))
    cfg = EvalConfig(list(ppl_files), windows, window_tokens, chunk, needle, haystack, contexts)
    if quick:
        given = click.get_current_context().get_parameter_source
        for field, value in QUICK.items():  # depths have no option: always the quick ones
            option = {"contexts": "context_lengths"}.get(field, field)
            if field == "depths" or given(option) is not click.core.ParameterSource.COMMANDLINE:
                setattr(cfg, field, value)
    p = KVPreset.from_pretrained(preset)
    model, tokenizer = load_model(model_name or p.base_model["id"], device=device)
    p.check_model(model.config)
    result = evaluate(model, tokenizer, lambda: p.build_cache(model, allow_name_mismatch=True), cfg,
                      log=lambda line: click.echo(line, err=True))
    metrics = metrics_block(result, cfg, "kvhub " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    for name, row in result.ppl.items():
        se = f" ± {row['delta_pct_se']:.3f} (s.e. over {cfg.windows} windows)" if "delta_pct_se" in row else ""
        click.echo(f"{name:<28} PPL {row['base']:.3f} -> {row['compressed']:.3f}  ({row['delta_pct']:+.3f}%{se})")
    worst, worst_delta = result.worst
    click.echo(f"{'worst domain':<28} {worst_delta:+.3f}% ({worst})")
    click.echo(f"{'mean delta':<28} {result.mean_delta_pct:+.3f}%")
    c = result.compression
    click.echo(f"compression per sequence at {cfg.window_tokens} tokens: total {c['total']:.2f}x "
               f"(keys {c['keys']:.2f}x, values {c['values']:.2f}x)")
    if result.footprint is not None:
        click.echo("\n".join(result.footprint.lines()))
    if result.needle:
        for ctx, comp, base in zip(cfg.contexts, result.needle.hits, result.needle_baseline.hits):
            click.echo(f"needle {ctx:>5}: {''.join('x' if h else '.' for h in comp)} ({sum(comp)}/{len(comp)})  "
                       f"baseline {''.join('x' if h else '.' for h in base)} ({sum(base)}/{len(base)})")
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    if write_metrics:
        if p.path is None:
            raise click.UsageError("--write-metrics needs a local preset folder")
        p.config["metrics"] = metrics
        p.save_pretrained(p.path, overwrite=True)
        click.echo(f"metrics written to {p.path}")


COMMANDS = [eval_cmd]

"""``kvhub pull``, ``kvhub list``, ``kvhub push``: presets on the Hub, resolved through the registry.

Tables are plain aligned text (rich is not a dependency); ``kvhub list --json`` is for scripts. The Hub client is
imported inside each command, so ``kvhub --help`` stays instant. Endpoint, cache, token and offline mode come
from the usual ``HF_*`` variables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..text_safety import printable

if TYPE_CHECKING:
    from ..hub_presets import PresetDownload
    from ..registry import Metrics, RegistryEntry

CLAIM_MARK = "*"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _metrics_rows(m: Metrics) -> list[tuple[str, str]]:
    rows = [
        ("context length", f"{m.context_length} tokens"),
        ("compression total / keys / values",
         f"{m.compression_total:.2f}x / {m.compression_keys:.2f}x / {m.compression_values:.2f}x"),
        ("perplexity delta", f"{m.ppl_delta_pct:+.2f}%"),
    ]
    if m.needle_accuracy is not None:
        rows.append(("needle accuracy (baseline)", f"{m.needle_accuracy:.2f} ({m.needle_baseline_accuracy:.2f})"))
    return rows


def _report(d: PresetDownload, name: str, revision: str | None) -> str:
    """What `kvhub pull` fetched: where from, which files, what was checked, the metrics, how to use it."""
    from ..preset import CONFIG_NAME

    origin = printable(f"{d.repo_id} @ {d.commit}" if d.repo_id else ("packaged with kvhub" if d.packaged else "local folder"))
    model = printable(d.config["base_model"]["id"])
    resolved = printable(f"registry entry {d.entry.model} ({d.registry})" if d.entry else f"not resolved through the registry ({d.registry})")
    checked = f"the registry and {CONFIG_NAME}" if d.registry_verified else CONFIG_NAME
    lines = [
        f"preset   {origin}",
        f"model    {model}, {resolved}",
        f"checked  sha256 of every file against {checked}",
        f"folder   {printable(d.folder)}",
        "",
        _table(("file", "size", "sha256"), [(f.name, _size(f.size), f.sha256) for f in d.files]),
        "",
    ]
    metrics = d.metrics
    if metrics is None:
        lines.append("metrics  not measured")
    else:
        lines.append("metrics, " + ("validated by the registry:" if d.registry_verified else f"from {CONFIG_NAME} (not validated):"))
        lines.append(_table(("metric", "value"), _metrics_rows(metrics)))
    rev = f", revision={revision!r}" if revision else ""
    lines += ["", printable(f"use it   KVPreset.from_pretrained({name!r}{rev}).build_cache(model)")]
    return "\n".join(lines)


@click.command()
@click.argument("model")
@click.option("--revision", help="Branch, tag or commit of the preset repo (default: the commit the registry pins).")
@click.option("--force", is_flag=True, help="Download every file again (repairs a corrupted cache).")
def pull(model: str, revision: str | None, force: bool) -> None:
    """Download and verify the preset for MODEL: a model id or alias (see `kvhub list`) or a preset repo id.

    Files go to the Hugging Face cache (HF_HOME / HF_HUB_CACHE); with HF_HUB_OFFLINE=1 only the cache is used."""
    from ..hub_presets import download_preset

    click.echo(_report(download_preset(model, revision, force_download=force), model, revision))


def _summary(entry: RegistryEntry) -> tuple[str, str, str]:
    """Compression, perplexity delta and needle cells: measured numbers, else claims marked with CLAIM_MARK."""
    if entry.metrics is not None:
        m = entry.metrics
        needle = "-" if m.needle_accuracy is None else f"{m.needle_accuracy:.2f} / {m.needle_baseline_accuracy:.2f}"
        return f"{m.compression_total:.2f}x", f"{m.ppl_delta_pct:+.2f}%", needle
    if entry.claimed is not None:
        c = entry.claimed.get("compression", {})
        parts = [f"{c['total']:.2f}x"] if "total" in c else []
        parts += [f"V {c['values']:.2f}x"] if "values" in c else []
        ppl = entry.claimed.get("ppl_delta_pct")
        return (" / ".join(parts) + CLAIM_MARK if parts else "-",
                f"{ppl:+.2f}%{CLAIM_MARK}" if ppl is not None else "-", "-")
    return "-", "-", "-"


def _published(entry: RegistryEntry) -> str:
    """yes: a Hub commit holds the validated files; no: validated, served by the copy packaged with kvhub."""
    if entry.status != "validated":
        return "-"
    return "yes" if entry.published else "no"


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the registry index as JSON.")
@click.option("--revision", help="Branch, tag or commit of the registry repo to read (default: main).")
def list_cmd(as_json: bool, revision: str | None) -> None:
    """Show the registry: each model, its preset repo, compression, perplexity delta, needle accuracy, status, and
    whether the validated preset is published on the Hub (else kvhub uses the copy it ships, when it has one)."""
    from ..registry import load_index

    index = load_index(revision)
    if as_json:
        click.echo(json.dumps({"source": index.source, "fallback": index.fallback, **index.document}, indent=2))
        return
    rows = [(e.model, e.repo_id or "-", *_summary(e), e.status, _published(e)) for e in index.entries]
    click.echo(f"registry: {printable(index.source)}\n")
    click.echo(_table(("model", "preset repo", "compression", "ppl delta", "needle", "status", "published"), rows))
    notes = []
    if any(e.metrics is not None and e.metrics.needle_accuracy is not None for e in index.entries):
        notes.append("needle: passkeys retrieved with the preset / with the uncompressed cache (DynamicCache), as a "
                     "share of the same grid of prompt lengths and depths")
    if any(e.metrics is None and e.claimed for e in index.entries):
        notes.append(f"{CLAIM_MARK} claimed by the inherited catalogue, never measured by kvhub; V: the V cache alone")
    if notes:
        click.echo("\n" + "\n".join(notes))


@click.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, help="Hub repo to publish to, e.g. org/Model-kvhub (created if missing).")
@click.option("--revision", help="Branch to commit to (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist yet).")
@click.option("-m", "--message", "commit_message", help="Commit message.")
def push(folder: Path, repo_id: str, revision: str | None, create_pr: bool, private: bool,
         commit_message: str | None) -> None:
    """Validate the preset in FOLDER and publish it, with a model card generated from its config.

    Needs a token with write access (HF_TOKEN or `hf auth login`)."""
    from ..hub_presets import push_preset

    info = push_preset(folder, repo_id, revision=revision, create_pr=create_pr, private=private,
                       commit_message=commit_message)
    click.echo(printable(f"pushed   {folder} -> {repo_id} @ {info.oid}"))
    click.echo(printable(f"commit   {info.commit_url}"))
    if info.pr_url:
        click.echo(printable(f"review   {info.pr_url} ({info.pr_revision})"))


COMMANDS = [pull, list_cmd, push]

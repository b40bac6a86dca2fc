"""``kvhub validate``, ``kvhub show``, ``kvhub import-legacy``: reading and checking presets."""

from __future__ import annotations

import json

import click

from ..text_safety import printable


def _open(preset: str, revision: str | None = None):
    """The preset named on the command line, read and checked: a folder, its kvhub_preset.json, a Hub repo id or a
    model name (resolved through the registry)."""
    from pathlib import Path

    from ..errors import PresetFormatError
    from ..preset import CONFIG_NAME, KVPreset

    path = Path(preset)
    if path.is_file():
        if path.name != CONFIG_NAME:
            raise PresetFormatError(f"{preset}: not a preset; fix: pass a preset folder or its {CONFIG_NAME}, a Hub repo "
                                    "id or a model name")
        path = path.parent
    return KVPreset.from_pretrained(path if path.is_dir() else preset, revision=revision)


PRESET_ARGUMENT = click.argument("preset", metavar="PRESET")
REVISION_OPTION = click.option("--revision", default=None, help="Branch, tag or commit when PRESET is on the Hub.")


@click.command()
@PRESET_ARGUMENT
@REVISION_OPTION
def validate(preset: str, revision: str | None) -> None:
    """Check PRESET (a folder, its kvhub_preset.json, a Hub repo id or a model name, as `kvhub show` takes): schema,
    files, checksums, tensor shapes, finiteness, orthonormal bases, and the storage codec's file when it has one."""
    p = _open(preset, revision)
    layers = len(p.codec.layers)
    storage = ""
    if p.storage is not None:  # reads and checks storage.safetensors (only a storage-form serde would otherwise)
        storage = f"; storage codec with budgets {', '.join(sorted(p.storage.budgets))}"
    click.echo(f"ok: {printable(preset)} is a valid kvhub preset for {printable(p.base_model['id'])} ({layers} layers, "
               f"{printable(p.path)}){storage}")


@click.command()
@PRESET_ARGUMENT
@REVISION_OPTION
def show(preset: str, revision: str | None) -> None:
    """Summarize PRESET (a folder, its kvhub_preset.json, a Hub repo id or a model name): model, per-layer layout,
    metrics."""
    click.echo(describe(_open(preset, revision)))


SCALES = {"token": "per-token absmax scale", "rms": "per-token RMS scale", "channel": "static per-component step"}


def _stream(s: dict) -> str:
    """A stream's layout in the table: segments, scale, how scales are stored (log8), codes (lloyd-max, vq)."""
    scale = s["scale"] + ("/log8" if s["scale_format"] == "log8" and s["scale"] != "channel" else "")
    own = f"{s['layout']} {scale}" + (f" {s['quantizer']}" if s["quantizer"] != "uniform" else "")
    return "".join([own, *(f", {c['bits']}b {c['scale']} {c['quantizer']}" for c in s["by_bits"])])


def _legend(rows: list[dict]) -> list[str]:
    """What the table's words mean, for those it uses."""
    streams = [row[name] for row in rows for name in ("keys", "values")]
    streams += [code for s in streams for code in s["by_bits"]]  # a code for some bit widths uses the same words
    used = lambda key, value: any(s.get(key) == value for s in streams)  # noqa: E731
    lines = ["  64x4b: 64 components at 4 bits each; " + "; ".join(
        f"{name}: {what}" for name, what in SCALES.items() if used("scale", name))]
    if used("scale_format", "log8"):
        lines.append("  /log8: each scale stored in one byte on a log grid (4.4% steps), else fp16")
    if used("quantizer", "lloyd-max"):
        lines.append("  lloyd-max: non-uniform levels, MSE-optimal for Gaussian coefficients, else uniform levels")
    if used("quantizer", "vq"):
        lines.append("  vq: vector codes, each byte one of 256 codewords for its 8/bits components (a Gaussian codebook)")
    return lines


def _storage(section: dict | None) -> list[str]:
    """The storage codec's budgets (KV at rest, LMCache's storage form), from the config alone."""
    if not section:
        return []
    lines = ["", f"  storage codec (KV at rest, LMCache \"form\": \"storage\"): chunks of {section['chunk_tokens']} "
                 f"tokens, first {section['exact_tokens']} exact"]
    for name, b in section["budgets"].items():
        m = b.get("metrics")
        quality = (f"PPL delta worst {m['ppl_delta_pct_worst']:+.2f}% ({printable(m['worst_corpus'])}), mean "
                   f"{m['ppl_delta_pct_mean']:+.2f}% in the reuse case" if m else "not measured")
        lines.append(f"    {printable(name)}: {b['ratio_vs_fp16_chunk']:.2f}x smaller than the fp16 chunk; {quality}")
    return lines


def describe(preset) -> str:
    """The summary ``kvhub show`` prints; every text from the config goes through :func:`printable`, so a config
    cannot send escape sequences or extra lines to the terminal."""
    b = {k: printable(v) if isinstance(v, str) else v for k, v in preset.base_model.items()}
    lines = [f"preset for {b['id']}" + (f" @ {b['revision']}" if b.get("revision") else ""),
             f"  {b['architecture']}: {b['num_hidden_layers']} layers, {b['num_key_value_heads']} KV heads, "
             f"head_dim {b['head_dim']}"]
    if b.get("provenance"):
        lines.append(f"  weights: {b['provenance']}")
    cal = preset.config["calibration"]
    lines.append(f"  calibrated on {cal['tokens']} tokens of {printable(cal['corpus'])} (sink {cal['sink']} excluded)")
    if preset.codec.keys_before_rope:
        lines.append("  keys coded before RoPE (un-turned by their positions; scored on the PyTorch backend)")
    if preset.codec.secondary_sinks:
        lines.append(f"  secondary sinks kept exact: value shorter than {preset.codec.secondary_sinks:g} of the "
                     "calibrated median (PyTorch and C backends)")
    rows = preset.codec.describe()
    lines += ["", f"  {'layer':>5}  {'keys (rank, layout)':<36} {'values (rank, layout)':<36} sink window"]
    for row in rows:
        k, v = row["keys"], row["values"]
        lines.append(f"  {row['layer']:>5}  {k['rank']:>3} {_stream(k):<32} {v['rank']:>3} {_stream(v):<32} "
                     f"{row['sink']:>4} {row['window']:>6}")
    lines += _legend(rows)
    lines += _storage(preset.config.get("storage"))
    m = preset.metrics
    lines.append("")
    if not m:
        lines.append("  metrics: not measured")
        return "\n".join(lines)
    c, p = m["compression"], m["perplexity"]
    lines.append(f"  measured at {m['context_length']} tokens on {printable(m['hardware'])} ({printable(m['date'])}, "
                 f"kvhub {printable(m['kvhub_version'])}):")
    lines.append(f"    compression vs fp16, per sequence: total {c['total']:.2f}x, keys {c['keys']:.2f}x, "
                 f"values {c['values']:.2f}x")
    if m.get("bytes"):
        from ..footprint import Footprint

        lines += Footprint.of_metrics(m, preset.bases.nbytes()).lines("    ")
    for name, row in p["corpora"].items():
        lines.append(f"    PPL {printable(name)}: {row['base']:.3f} -> {row['compressed']:.3f} ({row['delta_pct']:+.2f}%)")
    if "worst_delta_pct" in p:
        lines.append(f"    PPL delta, worst domain: {p['worst_delta_pct']:+.3f}% ({printable(p['worst_corpus'])})")
    lines.append(f"    PPL delta, mean: {p['mean_delta_pct']:+.3f}%")
    if "needle" in m:
        n = m["needle"]
        for ctx, comp, base in zip(n["context_lengths"], n["compressed"], n["baseline"]):
            lines.append(f"    needle {ctx:>5} tokens: {sum(comp)}/{len(comp)} (baseline {sum(base)}/{len(base)})")
    return "\n".join(lines)


@click.command("import-legacy")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(), default=None, help="Write the recipe JSON here instead of printing it.")
def import_legacy(path: str, out: str | None) -> None:
    """Turn an inherited-zoo preset JSON into a kvhub recipe (it carries no bases: they must be fitted)."""
    from ..errors import PresetFormatError
    from ..recipe import import_legacy_preset
    from ..safe_json import read_json_file

    legacy = read_json_file(path, path, PresetFormatError)
    if not isinstance(legacy, dict):
        raise PresetFormatError(f"{path}: not a JSON object; fix: pass an inherited-zoo preset JSON")
    recipe = import_legacy_preset(legacy, source=path)
    text = json.dumps(recipe.to_dict(), indent=2) + "\n"
    if out:
        recipe.save(out)
        click.echo(f"wrote {out}")
    else:
        click.echo(text, nl=False)
    click.echo(f"note: {recipe.notes}", err=True)


COMMANDS = [validate, show, import_legacy]

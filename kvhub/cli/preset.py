"""``kvhub validate``, ``kvhub show``, ``kvhub import-legacy``: reading and checking presets."""

from __future__ import annotations

import json

import click

from ..text_safety import printable


@click.command()
@click.argument("path", type=click.Path())
def validate(path: str) -> None:
    """Check a preset folder: schema, files, checksums, tensor shapes, finiteness, orthonormal bases."""
    from ..preset import KVPreset

    preset = KVPreset.load_folder(path)
    layers = len(preset.codec.layers)
    click.echo(f"ok: {printable(path)} is a valid kvhub preset for {printable(preset.base_model['id'])} ({layers} layers)")


@click.command()
@click.argument("model_or_path")
@click.option("--revision", default=None, help="Branch, tag or commit when MODEL_OR_PATH is on the Hub.")
def show(model_or_path: str, revision: str | None) -> None:
    """Summarize a preset (a folder, a Hub repo id or a model name): model, per-layer layout, metrics."""
    from ..preset import KVPreset

    preset = KVPreset.from_pretrained(model_or_path, revision=revision)
    click.echo(describe(preset))


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
    lines += ["", f"  {'layer':>5}  {'keys (rank, layout)':<32} {'values (rank, layout)':<32} sink window"]
    for row in preset.codec.describe():
        k, v = row["keys"], row["values"]
        lines.append(f"  {row['layer']:>5}  {k['rank']:>3} {k['layout'] + ' ' + k['scale']:<28} "
                     f"{v['rank']:>3} {v['layout'] + ' ' + v['scale']:<28} {row['sink']:>4} {row['window']:>6}")
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

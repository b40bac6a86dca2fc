"""``kvhub tune``: fit the bases and search the codec for a perplexity budget; write a complete preset."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..corpora import CORPORA, default_corpus
from .options import device_option


def _from_recipe(path: Path, model: str | None, target: float | None):
    """(model to load, model id, target, the recipe's folder) from a pending model's recipe, the options overriding it."""
    from ..errors import PresetFormatError
    from ..recipe import Recipe

    if not path.is_file():
        raise click.UsageError(f"--recipe {path}: no such file; pass presets/<org>--<name>/recipe.json")
    recipe = Recipe.load(path)
    target = target if target is not None else recipe.target_ppl_delta
    if target is None:
        raise PresetFormatError(f"{path}: fixes the codec (no target_ppl_delta), so there is nothing to tune; fix: "
                                "set target_ppl_delta in the recipe, or pass --target-ppl-delta")
    return model or recipe.model, recipe.model, target, path.parent


@click.command()
@click.option("--model", default=None,
              help="Local model folder or Hub id (with --recipe: a local folder of the recipe's model, to work "
                   "without the Hub). 'HuggingFaceTB/SmolLM2-135M-Instruct' is bundled.")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Start from a pending model's recipe, presets/<org>--<name>/recipe.json: its model and perplexity "
                   "budget, and its folder as --out.")
@click.option("--calib", "calib_files", multiple=True, type=click.Path(exists=True),
              help=f"Calibration text files or folders (repeatable; never the evaluation text). "
                   f"Default: {CORPORA / 'calibration'} (the checkout's corpora/calibration).")
@click.option("--target-ppl-delta", type=float, default=None,
              help="Perplexity budget as a fraction: 0.01 = +1% (default: the recipe's, else 0.01).")
@click.option("--out", type=click.Path(), default=None,
              help="Preset folder to write (default: the recipe's folder, else presets/<org>--<name>; when that "
                   "already holds a preset, a new folder beside it, <folder>.tuned-N).")
@click.option("--overwrite", is_flag=True,
              help="Replace the preset already in the output folder (refused without it, checked before tuning).")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(exists=True),
              help="Evaluation text to measure the winner on (repeatable).")
@click.option("--needle/--no-needle", default=True, help="Run the needle grid in the final evaluation.")
@click.option("--windows", default="0,32", show_default=True, help="Recent-window sizes to try.")
@click.option("--quantizer", type=click.Choice(["uniform", "lloyd-max", "vq"]), default="uniform", show_default=True,
              help="Codes of the values' 2/4-bit segments: uniform levels, Lloyd-Max levels (MSE-optimal scalar levels "
                   "for Gaussian coefficients), or vq (one byte codes 8/bits components jointly: less MSE at the same "
                   "bytes; decoded on the PyTorch backend only).")
@click.option("--scale-format", type=click.Choice(["log8", "fp16"]), default="log8", show_default=True,
              help="How per-token scales are stored: one byte on a log grid (log8), or fp16 (as presets made before log8 existed).")
@click.option("--keys-before-rope/--keys-after-rope", default=False, show_default=True,
              help="Code keys before RoPE: un-turned by their positions, where their channel outliers stay put "
                   "(less loss at the same bits; key scores then come from decoded keys, on the PyTorch backend).")
@click.option("--secondary-sinks", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="Keep exact, beside their codes, the token-heads whose value vector is shorter than this fraction "
                   "of its layer and head's median length on calibration text (secondary attention sinks: 0.3 "
                   "flags about 0.4% of SmolLM2's); 0 keeps none. Decoded on the PyTorch and C backends; LMCache "
                   "chunks refuse such presets.")
@click.option("--key-tails", type=click.Choice(["absmax", "rms"]), default="absmax", show_default=True,
              help="Codes of the keys' 2-bit segments: absmax scales and uniform levels, as their 4-bit segments, or "
                   "RMS scales and --quantizer's levels (about half the MSE at 2 bits; with vq, decoded on the "
                   "PyTorch backend only).")
@click.option("--confirm-seeds", default=2, show_default=True, type=click.IntRange(0, 8),
              help="Before choosing a passing trial, measure it again at this many other seeds of the segments' "
                   "rotation and keep it only if its mean passes with one standard error over the seeds to spare (0: trust one "
                   "measurement; each seed costs a trial).")
@click.option("--confirm-windows", type=click.Choice(["same", "fresh"]), default="same", show_default=True,
              help="Where --confirm-seeds' seeds are measured: on the search's one held-out window per domain (same), "
                   "or each on another held-out window of every domain (fresh: the text's noise too, not only the "
                   "codes'; needs 1 + --confirm-seeds windows of held-out text per calibration file).")
@click.option("--calib-windows-per-file", default=8, show_default=True)
@click.option("--calib-seq-len", default=1024, show_default=True, help="Tokens per calibration window.")
@click.option("--tune-window-tokens", default=2048, show_default=True,
              help="Tokens per held-out window the search measures perplexity on (one window per calibration file: "
                   "each file is a domain the target must hold on).")
@device_option
@click.option("--dtype", default="float32", show_default=True)
def tune(model, recipe_path, calib_files, target_ppl_delta, out, overwrite, eval_files, needle, windows, quantizer,
         scale_format, keys_before_rope, secondary_sinks, key_tails, confirm_seeds, confirm_windows, calib_windows_per_file, calib_seq_len, tune_window_tokens,
         device, dtype):
    """Search ranks, bits and windows per layer for the most compression within --target-ppl-delta.

    Never replaces a preset without --overwrite: by default it writes to a folder holding none."""
    from ..models import BENCHMARK_MODEL_ID, is_benchmark_model
    from ..tuning import TuneConfig, default_output, tune as run_tune

    model_id, folder = None, None
    if recipe_path is not None:
        model, model_id, target_ppl_delta, folder = _from_recipe(recipe_path, model, target_ppl_delta)
    elif model is None:
        raise click.UsageError("pass --model (a local folder or Hub id) or --recipe presets/<org>--<name>/recipe.json")
    target_ppl_delta = 0.01 if target_ppl_delta is None else target_ppl_delta
    if not calib_files:
        calib_files = (str(default_corpus("calibration")),)
        click.echo(f"calibrating on {calib_files[0]} (pass --calib to choose)")
    if not 0 < target_ppl_delta < 1:
        raise click.UsageError(f"--target-ppl-delta {target_ppl_delta} must be a fraction in (0, 1), e.g. 0.01 for +1%")
    cfg = TuneConfig(model, list(calib_files), target_ppl_delta, list(eval_files) or None, needle,
                     calib_windows_per_file, calib_seq_len=calib_seq_len, tune_window_tokens=tune_window_tokens,
                     windows=tuple(int(w) for w in windows.split(",")), quantizer=quantizer, scale_format=scale_format,
                     keys_before_rope=keys_before_rope, secondary_sinks=secondary_sinks, key_tails=key_tails,
                     confirm_seeds=confirm_seeds, confirm_windows=confirm_windows, device=device,
                     dtype=dtype, model_id=model_id)
    if out is None:
        folder = folder or Path("presets") / (BENCHMARK_MODEL_ID if is_benchmark_model(model) else model).replace("/", "--")
        out = folder if overwrite else default_output(folder)
        if out != folder:
            click.echo(f"{folder} already holds a preset, which stays; writing to {out} (--out to choose, "
                       "--overwrite to replace it)")
    run_tune(cfg, str(out), log=click.echo, command="kvhub " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
             overwrite=overwrite)


@click.command("fit-storage")
@click.argument("preset_folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", default=None, help="Local model folder or Hub id (default: the preset's base model).")
@click.option("--calib", "calib_files", multiple=True, type=click.Path(exists=True),
              help=f"Calibration text files or folders (repeatable; each file is a domain, except the ones "
                   f"kvhub.protocol groups, and every domain weighs the same). Default: {CORPORA / 'calibration'}.")
@click.option("--ratios", default="10,16", show_default=True,
              help="Budgets to allocate, as ratios to the fp16 chunk (every byte of the stored chunk counted).")
@click.option("--layers-per-group", default=0, show_default=True,
              help="Layers whose K (or V) share one transform; 0: all layers (the best measured).")
@click.option("--windows-per-file", default=16, show_default=True,
              help="Calibration windows (1280 tokens) per file.")
@device_option
@click.option("--dtype", default="float32", show_default=True)
def fit_storage(preset_folder, model, calib_files, ratios, layers_per_group, windows_per_file, device, dtype):
    """Fit the storage codec (KV at rest, LMCache's storage form) for the preset in PRESET_FOLDER and save it there.

    The preset's other files stay as they are; its config gains a storage section listing the budgets."""
    from ..preset import KVPreset
    from ..models import load_model
    from ..storage_fit import StorageFitConfig, fit_preset_storage

    try:
        ratio_list = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        raise click.UsageError(f"--ratios {ratios!r}: give numbers separated by commas, e.g. 10,16") from None
    if not ratio_list or any(not 1 < r <= 100 for r in ratio_list):
        raise click.UsageError(f"--ratios {ratios!r}: each ratio must be above 1 and at most 100")
    if not calib_files:
        calib_files = (str(default_corpus("calibration")),)
        click.echo(f"calibrating on {calib_files[0]} (pass --calib to choose)")
    preset = KVPreset.from_pretrained(preset_folder)
    loaded, tokenizer = load_model(model or preset.base_model["id"], dtype=dtype, device=device)
    preset.check_model(loaded.config, model or preset.base_model["id"])
    cfg = StorageFitConfig(ratios=ratio_list, layers_per_group=layers_per_group, windows_per_file=windows_per_file)
    preset = fit_preset_storage(preset, loaded, tokenizer, list(calib_files), cfg)
    preset.save_pretrained(preset_folder, overwrite=True)
    for name, budget in preset.config["storage"]["budgets"].items():
        click.echo(f"storage budget {name}: {budget['ratio_vs_fp16_chunk']}x smaller than the fp16 chunk "
                   f"({budget['bits_per_token']} code bits per token)")
    click.echo(f"wrote {preset_folder}")


COMMANDS = [tune, fit_storage]

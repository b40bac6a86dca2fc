"""``kvhub tune``: fit the bases and search the codec for a perplexity budget; write a complete preset."""

from __future__ import annotations

import shlex
import sys

import click

from ..corpora import CORPORA, default_corpus


@click.command()
@click.option("--model", required=True, help="Local folder, Hub id, or 'HuggingFaceTB/SmolLM2-135M-Instruct' (bundled).")
@click.option("--calib", "calib_files", multiple=True, type=click.Path(exists=True),
              help=f"Calibration text files or folders (repeatable; never the evaluation text). "
                   f"Default: {CORPORA / 'calibration'} (the checkout's corpora/calibration).")
@click.option("--target-ppl-delta", type=float, default=0.01, show_default=True,
              help="Perplexity budget as a fraction: 0.01 = +1%.")
@click.option("--out", type=click.Path(), default=None, help="Preset folder to write (default: presets/<org>--<name>).")
@click.option("--eval", "eval_files", multiple=True, type=click.Path(exists=True),
              help="Evaluation text to measure the winner on (repeatable).")
@click.option("--needle/--no-needle", default=True, help="Run the needle grid in the final evaluation.")
@click.option("--windows", default="0,32", show_default=True, help="Recent-window sizes to try.")
@click.option("--calib-windows-per-file", default=8, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, auto ...")
@click.option("--dtype", default="float32", show_default=True)
def tune(model, calib_files, target_ppl_delta, out, eval_files, needle, windows, calib_windows_per_file, device, dtype):
    """Search ranks, bits and windows per layer for the most compression within --target-ppl-delta."""
    from ..tuning import TuneConfig, tune as run_tune

    if not calib_files:
        calib_files = (str(default_corpus("calibration")),)
        click.echo(f"calibrating on {calib_files[0]} (pass --calib to choose)")
    if not 0 < target_ppl_delta < 1:
        raise click.UsageError(f"--target-ppl-delta {target_ppl_delta} must be a fraction in (0, 1), e.g. 0.01 for +1%")
    cfg = TuneConfig(model, list(calib_files), target_ppl_delta, list(eval_files) or None, needle,
                     calib_windows_per_file, windows=tuple(int(w) for w in windows.split(",")), device=device, dtype=dtype)
    out = out or f"presets/{model.replace('/', '--')}"
    run_tune(cfg, out, log=click.echo, command="kvhub " + " ".join(shlex.quote(a) for a in sys.argv[1:]))


COMMANDS = [tune]

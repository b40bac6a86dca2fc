"""``kvhub registry ...``: verify a contributed preset, publish it, and generate the model zoo from the index.

These are the commands the GitHub workflows run (.github/workflows/): ``verify`` on pull requests, ``publish`` and
``push-index`` on merge, ``check`` in CI. Paths are relative to the repository root (``--root``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from ..corpora import CORPORA, default_corpus
from .options import device_option

EVAL_ENV = "KVHUB_EVAL_CORPUS"


def _command() -> str:
    """The command line that reproduces this run, rebuilt from the parsed parameters (so it is right however the
    command was invoked, e.g. in-process by the tests): the arguments, then every option not at its default."""
    ctx = click.get_current_context()
    words = ctx.command_path.split()
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif value is None or value == param.default or value == () or param.name == "report_dir":
            continue
        elif isinstance(param, click.Option) and param.is_flag:
            words += [param.opts[0]] if value else param.secondary_opts[:1]
        else:
            words += [w for v in (value if param.multiple else (value,)) for w in (param.opts[0], str(v))]
    return " ".join(shlex.quote(w) for w in words)


def _eval_options(f):
    """The options verify and publish share: what to load, what to measure on, how close is close enough."""
    options = [
        click.option("--model", "model_name", default=None,
                     help="Local folder or Hub id to load (default: the model the preset names)."),
        click.option("--ppl", "ppl_files", multiple=True, type=click.Path(exists=True), envvar=EVAL_ENV,
                     help=f"Evaluation text files or folders the metrics were measured on (repeatable; "
                          f"default: ${EVAL_ENV}, else {CORPORA / 'evaluation'}, the checkout's corpora/evaluation)."),
        click.option("--haystack", type=click.Path(exists=True), default=None,
                     help="Needle haystack (default: the Persuasion file among --ppl)."),
        device_option,
        click.option("--tolerance-ppl", type=float, default=0.25, show_default=True,
                     help="Allowed difference of the mean PPL delta, in percentage points."),
        click.option("--tolerance-compression", type=float, default=0.02, show_default=True,
                     help="Allowed relative difference of each compression ratio (0.02 = 2%)."),
        click.option("--needle-tolerance", type=int, default=1, show_default=True,
                     help="Needle cells that may differ, only where the uncompressed baseline changed too."),
        click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Where to write report.json and report.md (default: verify-reports/<preset folder name>)."),
        click.option("--allow-weaker", is_flag=True,
                     help="Accept a preset whose claim misses its own tuning target, or measured with a weaker "
                          "protocol (fewer or shorter windows, a smaller needle grid) than the validated entry it "
                          "replaces; the report says so."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _ppl(ppl_files: tuple[str, ...]) -> list[str]:
    return list(ppl_files) if ppl_files else [str(default_corpus("evaluation"))]


def _tolerances(ppl: float, compression: float, needle: int):
    from ..registry_tools import Tolerances

    return Tolerances(ppl, compression, needle)


def _echo_report(report, paths) -> None:
    for check in report.checks:
        click.echo(f"{'pass' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    click.echo(f"report   {paths[0]}\n         {paths[1]}")


@click.group()
def registry() -> None:
    """The registry index, the model zoo generated from it, and the checks a contributed preset goes through."""


@registry.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Repository root holding registry/index.json.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write MODEL_ZOO.md and the plot under this folder instead of --root.")
def build(root: Path, out: Path | None) -> None:
    """Regenerate MODEL_ZOO.md and registry/compression_vs_quality.png from registry/index.json."""
    from ..registry_tools import RepoLayout, build_zoo

    for path in build_zoo(RepoLayout(root), RepoLayout(out) if out else None):
        click.echo(f"wrote {path}")


@registry.command()
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Repository root holding registry/index.json.")
def check(root: Path) -> None:
    """Fail if the index is invalid, MODEL_ZOO.md is stale, an entry's recipe folder is missing, or a validated
    entry's metrics lack a domain of the evaluation protocol."""
    from ..registry_tools import RepoLayout, check_domains, check_zoo

    check_zoo(RepoLayout(root))
    check_domains(RepoLayout(root))
    click.echo(f"ok: {RepoLayout(root).zoo} is what the index generates, every recipe folder exists, and every "
               "validated entry covers every evaluation domain")


@registry.command()
@click.argument("preset_dir", type=click.Path(path_type=Path))
@_eval_options
@click.option("--needle/--no-needle", default=None,
              help="Re-run the needle grid (default: when the preset claims one; --no-needle makes the check partial).")
@click.option("--storage-windows", type=click.IntRange(min=0), default=None,
              help="Re-measure the storage budgets (KV at rest) on N windows per corpus, within three standard errors "
                   "more (default: the recorded windows, to the tolerance; 0: not at all).")
def verify(preset_dir: Path, model_name, ppl_files, haystack, device, tolerance_ppl, tolerance_compression,
           needle_tolerance, report_dir, allow_weaker, needle, storage_windows) -> None:
    """Check PRESET_DIR (schema, sha256s, model) and re-measure it with the protocol its metrics record.

    Writes report.json and report.md (a pull-request comment); exits 1 when a check fails."""
    from ..registry_tools import VerificationError, verify_preset

    tolerances = _tolerances(tolerance_ppl, tolerance_compression, needle_tolerance)
    report = verify_preset(preset_dir, _ppl(ppl_files), model=model_name, needle=needle, haystack=haystack,
                           device=device, tolerances=tolerances, command=_command(), progress=sys.stderr.isatty(),
                           allow_weaker=allow_weaker, storage_windows=storage_windows)
    paths = report.write(report_dir or Path("verify-reports") / preset_dir.resolve().name)
    _echo_report(report, paths)
    if not report.passed:
        raise VerificationError(f"{preset_dir}: verification failed: {report.summary()} (report: {paths[1]})")
    partial = " (needle grid not re-run)" if report.claimed and "needle" in report.claimed and not report.needle_rerun else ""
    click.echo(f"ok: {preset_dir} matches its claimed metrics within tolerance{partial}")


@registry.command()
@click.argument("preset_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", default=None, help="Hub repo to publish to (default: the one the index plans for the model).")
@_eval_options
@click.option("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT, else huggingface.co). Token: HF_TOKEN.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Repository root holding registry/index.json and MODEL_ZOO.md.")
@click.option("--alias", "aliases", multiple=True, help="Short name to add to the model's entry (repeatable).")
@click.option("--measured-by", default=None,
              help="Provenance of the numbers (default: the GitHub Actions run URL when in one, else this command).")
@click.option("--dry-run", is_flag=True,
              help="Push to --endpoint (never the public Hub) but write the index, MODEL_ZOO.md and the plot under --out.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="With --dry-run: folder for registry/index.json, MODEL_ZOO.md, registry/compression_vs_quality.png.")
def publish(preset_dir: Path, repo_id, model_name, ppl_files, haystack, device, tolerance_ppl, tolerance_compression,
            needle_tolerance, report_dir, allow_weaker, endpoint, root, aliases, measured_by, dry_run, out) -> None:
    """Verify PRESET_DIR, push it to the Hub, and record it as validated in the index (commit, sha256s, metrics,
    provenance); then regenerate MODEL_ZOO.md. The needle grid is always re-run when the preset claims one."""
    from ..registry_tools.publish import publish_preset

    if out is not None and not dry_run:
        raise click.UsageError("--out is for --dry-run; a real publish writes the index and MODEL_ZOO.md in --root")
    report_dir = report_dir or Path("verify-reports") / preset_dir.resolve().name
    result = publish_preset(
        preset_dir, _ppl(ppl_files), repo_id=repo_id, root=root, out=out, dry_run=dry_run, endpoint=endpoint,
        model=model_name, haystack=haystack, device=device,
        tolerances=_tolerances(tolerance_ppl, tolerance_compression, needle_tolerance), aliases=aliases,
        provenance_source=measured_by, report_dir=report_dir, command=_command(), progress=sys.stderr.isatty(),
        allow_weaker=allow_weaker,
    )
    click.echo(f"verified {preset_dir} (report: {report_dir / 'report.md'})")
    click.echo(f"pushed   {result.repo_id} @ {result.commit}")
    state = "added" if result.new_entry else "updated"
    click.echo(f"index    {result.entry['model']}: entry {state}, status validated, {len(result.entry['preset']['files'])} files pinned")
    for path in result.written:
        click.echo(f"wrote    {path}")
    if dry_run:
        click.echo(f"dry run: {root} was not changed; compare with `diff -r {out} {root}`")


@registry.command("extract-pr")
@click.option("--base", required=True, help="The pull request's base commit (or ref).")
@click.option("--head", required=True, help="The pull request's head commit (or ref), fetched but not checked out.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder to write presets/<org>--<name>/ into (must not exist).")
@click.option("--repo", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The git repository holding both commits.")
def extract_pr(base: str, head: str, out: Path, repo: Path) -> None:
    """Copy the preset folders that BASE...HEAD changes out of git, as data, for `kvhub registry verify`.

    Refuses (exit 1, nothing written) a pull request that changes anything outside presets/<org>--<name>/, or
    brings links, submodules, unknown file types, oversize files or too many files. Prints one folder per line."""
    from ..registry_tools.extract_pr import extract_pr as extract

    result = extract(repo, base, head, out)
    for folder in result.folders:
        click.echo(f"extracted {out / 'presets' / folder}")
    for folder in result.removed:
        click.echo(f"removed   presets/{folder} (nothing to verify)")
    click.echo(f"ok: {len(result.folders)} preset folder(s), {result.files} file(s), {result.bytes} bytes")


@registry.command("push-index")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Repository root holding registry/index.json (or a dry run's --out folder).")
@click.option("--repo-id", default=None, help="Registry Hub repo (default: $KVHUB_REGISTRY_REPO, else kvhub/registry).")
@click.option("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT, else huggingface.co). Token: HF_TOKEN.")
def push_index(root: Path, repo_id: str | None, endpoint: str | None) -> None:
    """Upload registry/index.json to the registry Hub repo, after checking the Hub has every commit it pins."""
    from ..registry_tools import RepoLayout
    from ..registry_tools.publish import push_index as upload_index

    info = upload_index(RepoLayout(root), repo_id=repo_id, endpoint=endpoint)
    click.echo(f"pushed   {info.commit_url} ({info.oid})")


COMMANDS = [registry]

"""``kvhub registry publish`` and ``kvhub registry push-index``: from a verified preset folder to a validated
registry entry, and from the committed index to the registry Hub repo.

publish = verify (the same checks and re-measurement as ``kvhub registry verify``; nothing is pushed unless every
check passes) -> push the preset to the Hub (:func:`kvhub.hub_presets.push_preset`) -> download that commit back into an
empty cache and take the sha256 of every file the client downloads (so the index pins exactly what users get) ->
record repo id, commit, files, the re-measured metrics and their provenance, status ``validated`` -> write the
index and regenerate ``MODEL_ZOO.md`` and the plot.

A dry run does all of that, push included, but writes the index, the zoo and the plot under ``--out`` (same layout
as the repository) instead of in place, and refuses the public Hub: it pushes only to an explicit other endpoint
(a local or staging hub), so rehearsing the pipeline can never publish anything.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import HubError, RegistryError
from ..hub import PUBLIC_ENDPOINT, check_commit, endpoint_url, upload_files
from ..registry import INDEX_NAME, RegistryIndex, registry_repo
from .layout import RepoLayout, index_text, write_atomic
from .verify import Tolerances, VerificationError, VerifyReport, verify_preset
from .zoo import render_plot, render_zoo

_COMMIT = re.compile(r"[0-9a-f]{40}")
_ALIAS = re.compile(r"[a-z0-9][a-z0-9._-]*")
_PLACEHOLDER_COMMIT = "0" * 40


@dataclass
class PublishResult:
    repo_id: str
    commit: str
    entry: dict[str, Any]
    new_entry: bool
    written: list[Path]
    report: VerifyReport
    dry_run: bool


def measured_by(command: str | None) -> str:
    """The provenance of a measurement: the GitHub Actions run when running in one, else the command."""
    env = os.environ
    if env.get("GITHUB_ACTIONS") == "true" and env.get("GITHUB_RUN_ID") and env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com")
        return f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    return command or "kvhub registry publish"


def storage_metrics(section: dict[str, Any] | None) -> dict[str, Any]:
    """The index's summary of a preset's ``storage`` section: each budget that was measured (its ``metrics``)."""
    return {name: {"ratio_vs_fp16_chunk": b["ratio_vs_fp16_chunk"], "ppl_delta_pct": b["metrics"]["ppl_delta_pct_mean"],
                   "ppl_delta_pct_worst": b["metrics"]["ppl_delta_pct_worst"], "worst_corpus": b["metrics"]["worst_corpus"]}
            for name, b in (section or {}).get("budgets", {}).items() if b.get("metrics")}


def registry_metrics(metrics: dict[str, Any], storage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The index's summary (schemas/registry.schema.json ``metrics``) of a preset ``metrics`` block and, when it
    has a measured storage codec, of its ``storage`` section."""
    needle, ppl = metrics.get("needle"), metrics["perplexity"]
    at_rest = storage_metrics(storage)
    return {
        "context_length": metrics["context_length"],
        "compression": {k: metrics["compression"][k] for k in ("total", "keys", "values")},
        "ppl_delta_pct": ppl["mean_delta_pct"],
        **({"ppl_delta_pct_worst": ppl["worst_delta_pct"], "worst_corpus": ppl["worst_corpus"]}
           if "worst_delta_pct" in ppl else {}),
        **({"ppl_delta_pct_by_corpus": {name: row["delta_pct"] for name, row in ppl["corpora"].items()}}
           if "corpora" in ppl else {}),
        "needle": {"accuracy": needle["accuracy"], "baseline_accuracy": needle["baseline_accuracy"]} if needle else None,
        **({"storage": at_rest} if at_rest else {}),
    }


def record_entry(
    document: dict[str, Any],
    config: dict[str, Any],
    *,
    repo_id: str,
    commit: str,
    endpoint: str,
    files: list[dict[str, Any]],
    metrics: dict[str, Any],
    provenance: dict[str, str],
    aliases: tuple[str, ...] = (),
    date: str,
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """A copy of the index ``document`` in which the preset's model is ``validated`` and published at ``commit`` of
    ``endpoint`` (recorded, so the zoo links a commit only when it is on the public Hub).

    The model's entry is updated in place (its ``notes``, which describe why it was pending, are dropped; its
    inherited ``claimed`` numbers are kept, still labelled as claims), or appended with the model name as alias.
    Returns (document, entry, whether the entry is new); the caller validates the document.
    """
    doc = copy.deepcopy(document)
    base = config["base_model"]
    model_id = base["id"]
    entry = next((e for e in doc["entries"] if e["model"].lower() == model_id.lower()), None)
    new = entry is None
    if entry is None:
        entry = {"model": model_id, "model_revision": None, "aliases": [], "status": "pending",
                 "preset": {}, "recipe": f"presets/{model_id.replace('/', '--')}/"}
        doc["entries"].append(entry)
        taken = {n.lower() for e in doc["entries"] for n in (e["model"], *e["aliases"])}
        default = model_id.split("/")[-1].lower()
        if _ALIAS.fullmatch(default) and default not in taken:
            entry["aliases"].append(default)
    entry["aliases"] += [a for a in aliases if a not in entry["aliases"]]
    if base.get("revision") and _COMMIT.fullmatch(base["revision"]):
        entry["model_revision"] = base["revision"]
    entry["status"] = "validated"
    entry["preset"] = {"repo_id": repo_id, "revision": commit, "endpoint": endpoint, "files": files}
    entry["metrics"] = registry_metrics(metrics, config.get("storage"))
    entry["provenance"] = provenance
    entry.pop("notes", None)
    doc["updated"] = date
    return doc, entry, new


def published_files(repo_id: str, commit: str, endpoint: str | None, token: str | bool | None) -> list[dict[str, Any]]:
    """Name, size and sha256 of every file a client downloads from ``repo_id@commit``, read back from the Hub into
    an empty cache (so they are the bytes the Hub serves, checked against the config by the download)."""
    from ..hub_presets import download_preset

    with tempfile.TemporaryDirectory(prefix="kvhub-publish-") as cache:
        download = download_preset(repo_id, commit, endpoint=endpoint, token=token, cache_dir=cache)
    if download.commit != commit:
        raise RegistryError(f"{repo_id}: asked for commit {commit} but the Hub served {download.commit}; fix: retry")
    return [f.to_json() for f in download.files]


def publish_preset(
    folder: str | Path,
    ppl_files: list[str],
    *,
    repo_id: str | None = None,
    root: str | Path = ".",
    out: str | Path | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    model: str | None = None,
    haystack: str | None = None,
    device: str | None = None,
    tolerances: Tolerances = Tolerances(),
    aliases: tuple[str, ...] = (),
    provenance_source: str | None = None,
    report_dir: str | Path | None = None,
    command: str | None = None,
    progress: bool = False,
    allow_weaker: bool = False,
) -> PublishResult:
    """Verify, push, record and regenerate (see the module docstring). ``root`` is the repository holding the
    index; a dry run (``dry_run=True``) writes under ``out`` instead and needs an ``endpoint`` other than the
    public Hub. ``provenance_source`` overrides :func:`measured_by`; ``allow_weaker`` lets a preset that misses its
    own target, or was measured with a weaker protocol than the entry it replaces, through (see verify)."""
    from ..hub_presets import push_preset
    from ..preset_files import read_config

    folder = Path(folder)
    source = RepoLayout(Path(root))
    document, index = source.read_index()
    if dry_run:
        if out is None:
            raise RegistryError("--dry-run writes the index and the zoo under --out; fix: pass --out DIR")
        if endpoint_url(endpoint) == PUBLIC_ENDPOINT:
            raise RegistryError(
                f"--dry-run pushes the preset for real, so it refuses the public Hub ({PUBLIC_ENDPOINT}); fix: pass "
                "--endpoint of a local or staging hub (or HF_ENDPOINT)"
            )
    config = read_config(folder)
    entry = index.find(config["base_model"]["id"])
    repo_id = repo_id or (entry.repo_id if entry is not None else None)
    if not repo_id:
        raise RegistryError(f"{folder}: the index has no preset repo for {config['base_model']['id']}; fix: pass --repo-id")
    # The new entry must be valid (aliases free and well formed) before anything is measured or pushed.
    placeholder = {"context_length": 1, "compression": {"total": 1, "keys": 1, "values": 1},
                   "perplexity": {"mean_delta_pct": 0}}
    draft, _, _ = record_entry(document, config, repo_id=repo_id, commit=_PLACEHOLDER_COMMIT,
                               endpoint=endpoint_url(endpoint),
                               files=[{"name": "kvhub_preset.json", "sha256": "0" * 64, "size": 0}], metrics=placeholder,
                               provenance={"measured_by": "-", "hardware": "-", "kvhub_version": "-", "date": "-"},
                               aliases=aliases, date="2000-01-01")
    RegistryIndex.parse(draft, str(source.index))

    report = verify_preset(folder, ppl_files, model=model, haystack=haystack, device=device, tolerances=tolerances,
                           command=command, progress=progress, index=index, allow_weaker=allow_weaker)
    if report_dir is not None:
        report.write(report_dir)
    if not report.passed:
        where = f" (report: {Path(report_dir) / 'report.md'})" if report_dir is not None else ""
        raise VerificationError(f"{folder}: not published, verification failed{where}: {report.summary()}")
    assert report.measured is not None

    info = push_preset(folder, repo_id, token=token, endpoint=endpoint,
                       commit_message=f"kvhub {__version__}: preset for {config['base_model']['id']} (verified)")
    files = published_files(repo_id, info.oid, endpoint, token)
    measured = report.measured
    provenance = {"measured_by": provenance_source or measured_by(command), "hardware": measured["hardware"],
                  "kvhub_version": measured["kvhub_version"], "date": measured["date"]}
    updated, entry_doc, new = record_entry(document, config, repo_id=repo_id, commit=info.oid,
                                           endpoint=endpoint_url(endpoint), files=files,
                                           metrics=measured, provenance=provenance, aliases=aliases,
                                           date=measured["date"])
    RegistryIndex.parse(updated, str(source.index))
    target = RepoLayout(Path(out)) if dry_run else source
    written = [
        write_atomic(target.index, index_text(updated)),
        write_atomic(target.zoo, render_zoo(updated)),
        write_atomic(target.plot, render_plot(updated)),
    ]
    return PublishResult(repo_id, info.oid, entry_doc, new, written, report, dry_run)


def push_index(layout: RepoLayout, *, repo_id: str | None = None, endpoint: str | None = None,
               token: str | bool | None = None, message: str | None = None):
    """Upload the index under ``layout`` as ``index.json`` of the registry Hub repo (created if missing), after
    checking that the Hub has every commit it pins; returns the commit info."""
    _, index = layout.read_index()
    repo_id = repo_id or registry_repo()
    url = endpoint_url(endpoint)
    for entry in index.entries:
        if not entry.published:
            continue
        preset_repo, commit = entry.pinned()
        try:
            check_commit(preset_repo, commit, endpoint=url, token=token)
        except HubError as exc:
            raise RegistryError(
                f"{layout.index}: {entry.model} pins {preset_repo}@{commit[:12]}, which {url} cannot serve ({exc}); "
                "fix: publish the preset to this endpoint first (kvhub registry publish), or correct the entry"
            ) from exc
    return upload_files(repo_id, {INDEX_NAME: layout.index.read_bytes()}, endpoint=url, token=token,
                        message=message or f"kvhub {__version__}: registry index")

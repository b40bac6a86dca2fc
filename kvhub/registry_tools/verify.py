"""``kvhub registry verify``: re-measure a contributed preset and compare with the metrics it claims.

The checks, in order (a failure stops the ones that depend on it):

1. the folder: schema, sha256 and size of every listed file, tensor shapes, orthonormal bases (``KVPreset.load_folder``);
2. the model card is the one generated from the config (what ``kvhub push`` publishes);
3. the preset records metrics, and the evaluation text given here is the text they were measured on (sha256);
4. the claim meets the preset's own perplexity target (``calibration.tuning.target_ppl_delta``), and its protocol is
   no weaker (fewer windows, shorter windows, a smaller needle grid, or none) than the one behind the validated
   registry entry it would replace (:func:`standing_checks`); ``allow_weaker`` lets such a preset through, said so in
   the report;
5. the model loads and matches the preset (layers, KV heads, head_dim, and the name when it is a Hub id);
6. the evaluation is run again with the recorded protocol (windows, window length, chunk, needle contexts and
   depths) through :func:`kvhub.eval.evaluate`, the code ``kvhub eval`` runs, and compared with the claim:
   mean PPL delta and the claimed worst domain's delta within an absolute tolerance in percentage points (the
   target is held to the worst domain for presets tuned that way), each compression ratio within a relative
   tolerance, and the needle grid cell by cell (see :class:`Tolerances`);
7. a preset with a storage codec (KV at rest): each budget's recorded reuse-case deltas are re-measured with the
   chunk codec alone (:mod:`kvhub.eval.reuse`: the bytes LMCache would store, without the disk) on the recorded
   windows, or on ``storage_windows`` per corpus, and every corpus's delta must be within the tolerance (plus three
   combined standard errors when the windows are not the recorded ones) (:func:`storage_checks`).

The result is a :class:`VerifyReport`, written as ``report.json`` (for machines) and ``report.md`` (a pull-request
comment). Nothing here raises on a failed check: the report says what failed and how to fix it.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KVHubError, RegistryError
from ..protocol import WORST_DOMAIN
from ..registry import RegistryEntry, RegistryIndex
from ..text_safety import code_span, escape_markdown
from .layout import write_atomic


class VerificationError(RegistryError):
    """A preset whose re-measured metrics, files or model do not match what it claims."""


@dataclass(frozen=True)
class Tolerances:
    """How far a re-measurement may stray from the claim.

    ``ppl_pp``: absolute, in percentage points of the mean PPL delta (+1.00% claimed passes from +0.75% to +1.25%).
    ``compression_rel``: relative, for each of the total, keys and values ratios (0.02 = 2%).
    ``needle_cells``: cells of the compressed needle grid that may differ from the claim, and only cells where the
    uncompressed baseline itself changed between the two runs (the model is unstable there, not the preset).
    """

    ppl_pp: float = 0.25
    compression_rel: float = 0.02
    needle_cells: int = 1

    def __post_init__(self) -> None:
        if self.ppl_pp < 0 or self.compression_rel < 0 or self.needle_cells < 0:
            raise KVHubError(f"tolerances must not be negative ({self}); fix: pass values >= 0")


@dataclass
class Check:
    """One verdict of the report. ``claimed``, ``measured`` and ``tolerance`` are display strings (or None)."""

    name: str
    ok: bool
    detail: str
    claimed: str | None = None
    measured: str | None = None
    tolerance: str | None = None


@dataclass
class VerifyReport:
    preset: str
    model: str | None = None
    base_model: str | None = None
    checks: list[Check] = field(default_factory=list)
    tolerances: Tolerances = field(default_factory=Tolerances)
    claimed: dict[str, Any] | None = None
    measured: dict[str, Any] | None = None
    needle_rerun: bool = False
    command: str | None = None
    hardware: str | None = None
    kvhub_version: str = __version__
    date: str = field(default_factory=lambda: datetime.date.today().isoformat())

    @property
    def passed(self) -> bool:
        """Every check passed, and the evaluation was actually re-run and compared."""
        return self.measured is not None and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str, claimed: str | None = None, measured: str | None = None) -> bool:
        self.checks.append(Check(name, ok, detail, claimed, measured))
        return ok

    # --- output -------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "preset": self.preset,
            "base_model": self.base_model,
            "model": self.model,
            "checks": [asdict(c) for c in self.checks],
            "tolerances": asdict(self.tolerances),
            "needle_rerun": self.needle_rerun,
            "claimed": self.claimed,
            "measured": self.measured,
            "environment": {"hardware": self.hardware, "kvhub_version": self.kvhub_version, "date": self.date,
                            "command": self.command},
        }

    def to_markdown(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"### kvhub registry verify: {verdict} for {code_span(self.preset)}", ""]
        what = f"Preset for {code_span(self.base_model)}" if self.base_model else "Preset"
        model = f", model loaded from {code_span(self.model)}" if self.model else ""
        where = f", re-measured on {escape_markdown(self.hardware)}" if self.hardware else ""
        lines.append(f"{what}{model}{where} with kvhub {self.kvhub_version} on {self.date}.")
        if self.measured is not None and not self.needle_rerun and self.claimed and "needle" in self.claimed:
            lines.append("The needle grid was **not** re-run (`--no-needle`): this verification is partial.")
        lines += ["", "| check | claimed | measured | tolerance | result |", "|---|---|---|---|---|"]
        for c in self.checks:
            result = ("pass" if c.ok else "**FAIL**") + f": {_cell(c.detail)}"
            lines.append(f"| {_cell(c.name)} | {_cell(c.claimed)} | {_cell(c.measured)} | {_cell(c.tolerance)} | {result} |")
        if self.claimed and self.measured:
            lines += ["", "<details><summary>Perplexity per corpus</summary>", "",
                      "| corpus | claimed base -> compressed (delta) | measured base -> compressed (delta) |",
                      "|---|---|---|"]
            claimed_rows = self.claimed["perplexity"]["corpora"]
            for name, row in self.measured["perplexity"]["corpora"].items():
                lines.append(f"| {_cell(name)} | {_ppl_row(claimed_rows.get(name))} | {_ppl_row(row)} |")
            lines += ["", "</details>"]
            if "needle" in self.measured and "needle" in self.claimed:
                lines += ["", "<details><summary>Needle grid (x = retrieved; rows are context lengths)</summary>", "",
                          "| context | claimed | measured | claimed baseline | measured baseline |", "|---|---|---|---|---|"]
                c, m = self.claimed["needle"], self.measured["needle"]
                for i, ctx in enumerate(m["context_lengths"]):
                    lines.append(f"| {ctx} | `{_row(c['compressed'], i)}` | `{_row(m['compressed'], i)}` | "
                                 f"`{_row(c['baseline'], i)}` | `{_row(m['baseline'], i)}` |")
                lines += ["", "</details>"]
        if self.command:
            lines += ["", f"Reproduce: {code_span(self.command)}"]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> tuple[Path, Path]:
        """``report.json`` and ``report.md`` in ``folder`` (created), each written atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path = write_atomic(folder / "report.json", json.dumps(self.to_json(), indent=2) + "\n")
        md_path = write_atomic(folder / "report.md", self.to_markdown())
        return json_path, md_path

    def summary(self) -> str:
        """One line naming the failed checks, for an error message."""
        if self.passed:
            return "all checks passed"
        failed = self.failures
        if not failed:
            return "the evaluation was not re-run"
        return "; ".join(f"{c.name}: {c.detail}" for c in failed)


def _cell(text: str | None) -> str:
    return "-" if text is None else escape_markdown(text)


def _ppl_row(row: dict[str, float] | None) -> str:
    return "-" if row is None else f"{row['base']:.3f} -> {row['compressed']:.3f} ({row['delta_pct']:+.3f}%)"


def _row(grid: list[list[int]], i: int) -> str:
    return "".join("x" if hit else "." for hit in grid[i]) if i < len(grid) else "-"


# --- comparison -----------------------------------------------------------------------------------------------

def compare_metrics(claimed: dict[str, Any], measured: dict[str, Any], tol: Tolerances,
                    needle_rerun: bool = True) -> list[Check]:
    """The verdicts on ``measured`` against ``claimed`` (both ``metrics`` blocks of schemas/preset.schema.json)."""
    checks = []
    want, got = claimed["context_length"], measured["context_length"]
    checks.append(Check("context length", want == got, "same protocol" if want == got else "protocol differs",
                        f"{want} tokens", f"{got} tokens"))
    want, got = claimed["perplexity"]["mean_delta_pct"], measured["perplexity"]["mean_delta_pct"]
    off = abs(got - want)
    checks.append(Check(
        "PPL delta (mean)", off <= tol.ppl_pp + 1e-9,
        f"off by {off:.3f} pp" + ("" if off <= tol.ppl_pp + 1e-9 else f", beyond {tol.ppl_pp:g} pp"),
        f"{want:+.3f}%", f"{got:+.3f}%", f"±{tol.ppl_pp:g} pp",
    ))
    if "worst_delta_pct" in claimed["perplexity"]:
        name, want = claimed["perplexity"]["worst_corpus"], claimed["perplexity"]["worst_delta_pct"]
        row = measured["perplexity"]["corpora"].get(name)
        off = abs(row["delta_pct"] - want) if row else float("inf")
        checks.append(Check(
            "PPL delta (worst domain)", off <= tol.ppl_pp + 1e-9,
            f"{name}: off by {off:.3f} pp" + ("" if off <= tol.ppl_pp + 1e-9 else f", beyond {tol.ppl_pp:g} pp")
            if row else f"{name} was not measured",
            f"{want:+.3f}%", f"{row['delta_pct']:+.3f}%" if row else None, f"±{tol.ppl_pp:g} pp",
        ))
    for stream in ("total", "keys", "values"):
        want, got = claimed["compression"][stream], measured["compression"][stream]
        rel = abs(got - want) / want
        ok = rel <= tol.compression_rel + 1e-9
        checks.append(Check(
            f"compression ({stream})", ok,
            f"off by {100 * rel:.2f}%" + ("" if ok else f", beyond {100 * tol.compression_rel:g}%"),
            f"{want:.3f}x", f"{got:.3f}x", f"±{100 * tol.compression_rel:g}%",
        ))
    if "needle" in claimed:
        if not needle_rerun:
            checks.append(Check("needle grid", True, "not re-run (--no-needle)", _needle_str(claimed["needle"]), None))
        elif "needle" in measured:
            checks.append(compare_needle(claimed["needle"], measured["needle"], tol.needle_cells))
    elif "needle" in measured:
        checks.append(Check("needle grid", True, "measured, nothing claimed", None, _needle_str(measured["needle"])))
    return checks


def _needle_str(n: dict[str, Any]) -> str:
    return f"{n['accuracy']:.2f} (baseline {n['baseline_accuracy']:.2f})"


def compare_needle(claimed: dict[str, Any], measured: dict[str, Any], allowed: int) -> Check:
    """Cell by cell: a compressed cell may differ from the claim only where the baseline changed too (the model
    is unstable there), and at most ``allowed`` such cells."""
    shown = dict(claimed=_needle_str(claimed), measured=_needle_str(measured), tolerance=f"{allowed} unstable cell(s)")
    if (claimed["context_lengths"], claimed["depths"]) != (measured["context_lengths"], measured["depths"]):
        return Check("needle grid", False, "the grids have different context lengths or depths", **shown)
    off, unstable = [], []
    for i, ctx in enumerate(claimed["context_lengths"]):
        for j, depth in enumerate(claimed["depths"]):
            cell = f"{ctx}@{depth:g}"
            if claimed["baseline"][i][j] != measured["baseline"][i][j]:
                unstable.append(cell)
            if claimed["compressed"][i][j] != measured["compressed"][i][j]:
                off.append(cell)
    stable_off = [c for c in off if c not in unstable]
    ok = not stable_off and len(off) <= allowed
    if not off:
        detail = "every cell equal" + (f" (baseline changed in {', '.join(unstable)})" if unstable else "")
    elif stable_off:
        detail = f"cells {', '.join(stable_off)} differ where the baseline did not change"
    else:
        detail = (f"{len(off)} cell(s) differ ({', '.join(off)}), all where the baseline changed too"
                  + ("" if ok else f": more than {allowed}"))
    return Check("needle grid", ok, detail, **shown)


# --- what the preset must at least be ------------------------------------------------------------------------

ALLOW_WEAKER = "--allow-weaker"


def protocol(metrics: dict[str, Any]) -> dict[str, int]:
    """How much a ``metrics`` block measured: windows per corpus, tokens per window, needle cells and the longest
    needle context (0 without a grid). A larger number is a stronger measurement."""
    ppl, needle = metrics["perplexity"], metrics.get("needle")
    return {"windows": ppl["windows"], "window tokens": ppl["window_tokens"],
            "needle cells": len(needle["context_lengths"]) * len(needle["depths"]) if needle else 0,
            "longest needle context": max(needle["context_lengths"]) if needle else 0}


def _entry_protocol(entry: RegistryEntry) -> tuple[dict[str, int], str]:
    """The protocol behind a validated entry: from its preset's config when the copy packaged with kvhub is the one it
    pins, else what the index records (the window length, and whether a needle grid was run)."""
    from ..hub_presets import packaged_preset_folder
    from ..preset_files import CONFIG_NAME, read_config, sha256_file

    folder = packaged_preset_folder(entry.model)
    pinned = {f.name: f.sha256 for f in entry.files}
    if folder is not None and pinned.get(CONFIG_NAME) == sha256_file(folder / CONFIG_NAME):
        return protocol(read_config(folder)["metrics"]), "its preset's config"
    assert entry.metrics is not None  # validated entries carry metrics (schema)
    needle = entry.metrics.needle_accuracy is not None
    return {"window tokens": entry.metrics.context_length, "needle cells": 1 if needle else 0}, "the registry index"


def standing_checks(config: dict[str, Any], replaces: RegistryEntry | None, allow_weaker: bool = False) -> list[Check]:
    """Before anything is measured: the claim meets the preset's own target, and its protocol is at least the one
    behind the validated entry ``replaces`` (None: a new model, nothing to compare). ``allow_weaker`` passes them,
    saying so."""
    claimed = config["metrics"]
    checks = []
    allowed = f"; allowed by {ALLOW_WEAKER}"
    tuning = config["calibration"].get("tuning", {})
    target, ppl = tuning.get("target_ppl_delta"), claimed["perplexity"]
    if target is not None:
        on_worst = tuning.get("target_on") == WORST_DOMAIN
        got, want = ppl["worst_delta_pct"] if on_worst else ppl["mean_delta_pct"], 100 * target
        ok = got <= want + 1e-9
        held = "on its worst domain" if on_worst else "on the mean (tuned before targets bound the worst domain)"
        checks.append(Check("own target", ok or allow_weaker,
                            f"within the target it was tuned for, {held}" if ok else
                            f"misses the target it was tuned for{allowed}" if allow_weaker else
                            "misses the target it was tuned for; fix: tune again, or measure the protocol the target "
                            f"was met on, or pass {ALLOW_WEAKER} to accept it", f"{got:+.3f}%", None, f"at most {want:+.2f}%"))
    if replaces is not None and replaces.status == "validated":
        theirs, source = _entry_protocol(replaces)
        ours = protocol(claimed)
        weaker = [f"{k} {ours[k]} < {v}" for k, v in theirs.items() if ours[k] < v]
        shown = lambda p: ", ".join(f"{k} {v}" for k, v in p.items())  # noqa: E731
        detail = (f"no weaker than the validated entry for {replaces.model} ({source})" if not weaker else
                  f"weaker than the validated entry for {replaces.model} ({', '.join(weaker)}; from {source})"
                  + (allowed if allow_weaker else f"; fix: measure with at least its protocol (kvhub eval --windows "
                     f"--window-tokens --needle), or pass {ALLOW_WEAKER} to replace it anyway"))
        checks.append(Check("protocol", not weaker or allow_weaker, detail, shown(ours), None, f"at least {shown(theirs)}"))
    return checks


# --- the verification -----------------------------------------------------------------------------------------

def verify_preset(
    folder: str | Path,
    ppl_files: list[str],
    *,
    model: str | None = None,
    needle: bool | None = None,
    haystack: str | None = None,
    device: str | None = None,
    tolerances: Tolerances = Tolerances(),
    command: str | None = None,
    progress: bool = False,
    index: RegistryIndex | None = None,
    allow_weaker: bool = False,
    storage_windows: int | None = None,
) -> VerifyReport:
    """Check the preset in ``folder`` and re-measure it on ``ppl_files`` (see the module docstring).

    ``model`` overrides the model the config names (a local folder or another id of the same weights);
    ``needle`` None re-runs the needle grid when the preset claims one; ``index`` holds the entry the preset would
    replace (default: the index packaged with kvhub); ``allow_weaker`` accepts a preset that misses its own target
    or was measured with a weaker protocol than that entry; ``storage_windows`` re-measures the storage budgets on
    that many windows per corpus instead of the recorded ones (0: not at all, said so in the report).
    """
    from ..card import model_card
    from ..errors import PresetError
    from ..preset import KVPreset
    from ..registry import packaged_index
    from ..text import corpus_sha256

    report = VerifyReport(str(folder), tolerances=tolerances, command=command)
    folder = Path(folder)
    try:
        preset = KVPreset.load_folder(folder)
    except PresetError as exc:
        report.add("preset files", False, str(exc))
        return report
    config = preset.config
    report.base_model = config["base_model"]["id"]
    report.add("preset files", True, f"schema, sha256 of {len(config['files'])} tensor file(s), shapes and bases")

    card = folder / "README.md"
    card_ok = card.is_file() and card.read_text(encoding="utf-8") == model_card(config)
    report.add("model card", card_ok, "README.md is generated from the config" if card_ok else
               "README.md is missing or differs from the card generated from kvhub_preset.json; fix: re-save the "
               "preset with kvhub (kvhub eval --write-metrics or KVPreset.save_pretrained regenerate it)")

    claimed = config.get("metrics")
    report.claimed = claimed
    if not claimed:
        report.add("claimed metrics", False, "kvhub_preset.json records no metrics; fix: measure them with "
                   "`kvhub eval PRESET --ppl <evaluation text> --needle --write-metrics`")
        return report
    try:
        digest = corpus_sha256(ppl_files)
    except KVHubError as exc:
        report.add("evaluation text", False, str(exc))
        return report
    same = digest == claimed["eval_corpus_sha256"]
    names = ", ".join(Path(p).name for p in ppl_files)
    report.add("evaluation text", same, "same sha256 as recorded" if same else
               f"sha256 {digest[:12]}... differs from the recorded {claimed['eval_corpus_sha256'][:12]}...; fix: pass "
               "the text the metrics were measured on (--ppl)", claimed["eval_corpus"], names)
    if not same:
        return report
    replaces = (index or packaged_index()).find(config["base_model"]["id"])
    standing = standing_checks(config, replaces, allow_weaker)
    report.checks += standing
    if not all(c.ok for c in standing):
        return report

    name = model or config["base_model"]["id"]
    report.model = name
    loaded = _load_model(report, name, preset, device)
    if loaded is None:
        return report
    lm, tokenizer = loaded
    _run_evaluation(report, preset, lm, tokenizer, ppl_files, needle, haystack, progress)
    if preset.storage is not None:
        if storage_windows == 0:
            report.add("storage budgets", True, "not re-measured (--storage-windows 0)")
        else:
            report.checks += storage_checks(preset, lm, tokenizer, ppl_files, storage_windows, tolerances)
    return report


def storage_checks(preset, lm, tokenizer, ppl_files: list[str], windows: int | None, tol: Tolerances) -> list[Check]:
    """Step 7 of the module docstring: one check per storage budget that records metrics."""
    import torch

    from ..eval.reuse import codec_round_trip, reuse_delta, reuse_windows
    from ..integrations.storage_chunks import StorageChunkCodec
    from ..text import read_texts

    storage = preset.config["storage"]
    claims = {name: b["metrics"] for name, b in storage["budgets"].items() if b.get("metrics")}
    if not claims:
        return [Check("storage budgets", True, "no storage budget records metrics: nothing to re-measure")]
    texts = dict(read_texts(ppl_files))
    recorded = next(iter(claims.values()))
    counts = recorded.get("windows_by_corpus") or dict.fromkeys(recorded["ppl_delta_pct_by_corpus"],
                                                                 recorded.get("windows_per_corpus"))
    missing = sorted(set(recorded["ppl_delta_pct_by_corpus"]) - set(texts))
    if missing:
        return [Check("storage budgets", False, f"the evaluation text lacks {', '.join(missing)}, which the storage "
                      "budgets were measured on; fix: pass the evaluation text the metrics were measured on (--ppl)")]
    if "prefix_tokens" not in recorded or "continuation_tokens" not in recorded:
        return [Check("storage budgets", False, "the storage metrics do not record their prefix and continuation "
                      "lengths; fix: re-measure them (benchmarks/lmcache_reuse.py --write-metrics)")]
    prefix, continuation = recorded["prefix_tokens"], recorded["continuation_tokens"]
    codecs = {name: codec_round_trip(StorageChunkCodec(preset, name)) for name in claims}
    measured: dict[str, dict[str, Any]] = {name: {} for name in claims}
    for corpus in recorded["ppl_delta_pct_by_corpus"]:
        count = windows or counts.get(corpus)
        if not count:
            return [Check("storage budgets", False, f"the storage metrics do not say how many windows of {corpus} "
                          "they were measured on; fix: pass --storage-windows N")]
        got = reuse_windows(lm, tokenizer, texts[corpus], count, prefix, continuation, storage["chunk_tokens"])
        for name, round_trip in codecs.items():
            with torch.no_grad():
                restored = [[round_trip(c) for c in w.chunks] for w in got]
            measured[name][corpus] = reuse_delta(lm, got, restored, prefix, preset.shape.head_dim)
    checks = []
    for name, claim in claims.items():
        bad = []
        for corpus, want in claim["ppl_delta_pct_by_corpus"].items():
            m = measured[name][corpus]
            same_windows = windows is None or windows == counts.get(corpus)
            allowed = tol.ppl_pp + (0.0 if same_windows else
                                    3 * (m.se ** 2 + claim.get("ppl_delta_pct_se_by_corpus", {}).get(corpus, 0) ** 2) ** 0.5)
            if abs(m.delta_pct - want) > allowed + 1e-9:
                bad.append(f"{corpus} {m.delta_pct:+.2f}% against {want:+.2f}% (allowed ±{allowed:.2f} pp)")
        got_worst = max(m.delta_pct for m in measured[name].values())
        checks.append(Check(
            f"storage budget {name}", not bad,
            "every corpus within tolerance" if not bad else "off on " + "; ".join(bad) + "; fix: re-measure the "
            "budget (benchmarks/lmcache_reuse.py --write-metrics) or refit it (kvhub fit-storage)",
            f"worst {claim['ppl_delta_pct_worst']:+.3f}%", f"worst {got_worst:+.3f}%",
            f"±{tol.ppl_pp:g} pp" + ("" if windows is None else " + 3 SE")))
    return checks


def _load_model(report: VerifyReport, name: str, preset, device: str | None):
    from ..errors import PresetModelMismatchError
    from ..models import BENCHMARK_MODEL_ID, is_benchmark_model, load_model

    try:
        lm, tokenizer = load_model(name, device=device)
    except KVHubError as exc:
        report.add("model", False, str(exc))
        return None
    try:
        preset.check_model(lm.config, BENCHMARK_MODEL_ID if is_benchmark_model(name) else name)
    except PresetModelMismatchError as exc:
        report.add("model", False, str(exc))
        return None
    report.add("model", True, "layers, KV heads and head_dim match" + (
        "" if Path(name).exists() else f"; the model is {preset.base_model['id']}"))
    return lm, tokenizer


def _run_evaluation(report: VerifyReport, preset, lm, tokenizer, ppl_files: list[str], needle: bool | None,
                    haystack: str | None, progress: bool) -> None:
    from ..eval import EvalConfig, evaluate, hardware, metrics_block

    claimed = report.claimed
    assert claimed is not None
    protocol = claimed["perplexity"]
    grid = claimed.get("needle")
    run_needle = grid is not None if needle is None else needle
    cfg = EvalConfig(list(ppl_files), protocol["windows"], protocol["window_tokens"], protocol["chunk"], run_needle,
                     haystack, progress=progress)
    if grid is not None:
        cfg.contexts, cfg.depths = tuple(grid["context_lengths"]), tuple(grid["depths"])
    report.hardware = hardware()
    try:
        result = evaluate(lm, tokenizer, lambda: preset.build_cache(lm, allow_name_mismatch=True), cfg)
    except (KVHubError, ValueError) as exc:  # too little text for the windows, no haystack for the needle
        report.add("evaluation", False, f"{exc}; fix: pass the evaluation text the metrics were measured on")
        return
    report.measured = metrics_block(result, cfg, report.command)
    report.needle_rerun = run_needle
    report.checks += compare_metrics(claimed, report.measured, report.tolerances, run_needle)

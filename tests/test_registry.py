"""The registry pipeline: `kvhub registry build/check/verify/publish/push-index`, MODEL_ZOO.md, the recipes of
the pending models. The GitHub workflows that run these commands are tested in tests/test_workflows.py.

Verification and publication run on a tiny random-weight Llama saved to disk with a word-level tokenizer trained
here on a few hundred words, evaluated on one 64-token window: mechanics only, never quality. Publication goes
to the local Hub test server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import pytest

from kvhub.card import model_card
from kvhub.cli import main
from kvhub.hub_presets import download_preset
from kvhub.preset import BASES_NAME, CONFIG_NAME, KVPreset
from kvhub.recipe import Recipe
from kvhub.registry import RegistryIndex
from kvhub.registry_tools import Tolerances, compare_metrics, render_zoo
from kvhub.registry_tools.publish import measured_by, registry_metrics
from kvhub.registry_tools.verify import compare_needle
from kvhub.registry_tools.zoo import CLAIMS_HEADING, render_plot
from tests.conftest import TINY_MODEL_ID
from tests.hub_server import DEFAULT_TOKEN
from tests.paths import BOOKS_TUNED, EVALUATION
from tests.tiny_models import tiny_model

REPO = Path(__file__).resolve().parents[1]
PRESET_REPO = "kvhub-test/tiny-llama-kvhub"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The tiny protocol: one window of 64 tokens fed 16 at a time; a needle grid of one 96-token context.
EVAL_ARGS = ("--windows", "1", "--window-tokens", "64", "--chunk", "16")
NEEDLE_ARGS = ("--needle", "--context-lengths", "96")


# --- helpers and fixtures -----------------------------------------------------------------------------------

def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(capsys, *args: str) -> str:
    """A failing command: exit 1 and exactly one `error: ... fix: ...` line, no traceback."""
    code, _, err = cli(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """A few hundred words of deterministic pseudo-English, the evaluation text and needle haystack."""
    words = "the a of and to in is was it for on with as his her by at from that which this be had not but".split()
    rng = random.Random(0)
    text = " ".join(rng.choice(words) + ("." if rng.random() < 0.1 else "") for _ in range(600))
    path = tmp_path_factory.mktemp("text") / "tiny_eval.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def model_dir(tiny_llama, eval_text, tmp_path_factory) -> Path:
    """tiny_llama saved with a word-level tokenizer (ids 0/1/2 = pad/bos/eos, as the tiny config says) and a
    minimal chat template, so `load_model` and the needle prompt work on it offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([eval_text.read_text()], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}answer: {% endif %}")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    tiny_llama.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def measure(capsys, folder: Path, model: Path, text: Path, *extra: str) -> None:
    """`kvhub eval ... --write-metrics`: what a contributor runs before opening the pull request."""
    code, _, err = cli(capsys, "eval", folder, "--model", model, "--ppl", text, *EVAL_ARGS, *extra, "--write-metrics")
    assert code == 0, err


@pytest.fixture(scope="session")
def measured_preset(tiny_preset, model_dir, eval_text, tmp_path_factory) -> Path:
    """tiny_preset with metrics measured by `kvhub eval` (no needle). Read-only: copy it before editing."""
    folder = tmp_path_factory.mktemp("measured") / "test--tiny-llama"
    shutil.copytree(tiny_preset, folder)
    code = main(["eval", str(folder), "--model", str(model_dir), "--ppl", str(eval_text), *EVAL_ARGS, "--write-metrics"])
    assert code == 0
    return folder


@pytest.fixture
def preset_copy(measured_preset, tmp_path) -> Path:
    copy = tmp_path / "presets" / measured_preset.name
    shutil.copytree(measured_preset, copy)
    return copy


def edit_metrics(folder: Path, change) -> None:
    """Change the claimed metrics and re-save (so the card and checksums stay consistent: only the claim is off)."""
    preset = KVPreset.load_folder(folder)
    change(preset.config["metrics"])
    preset.save_pretrained(folder, overwrite=True)


def verify(capsys, folder: Path, model: Path, text: Path, report: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "registry", "verify", folder, "--model", model, "--ppl", text, "--report-dir", report, *extra)


def read_report(report: Path) -> tuple[dict, str]:
    return json.loads((report / "report.json").read_text()), (report / "report.md").read_text()


def failed(report: dict) -> list[str]:
    return [c["name"] for c in report["checks"] if not c["ok"]]


def repo_copy(tmp_path: Path) -> Path:
    """A repository root like ours: registry/index.json a link into the package data, MODEL_ZOO.md built."""
    root = tmp_path / "repo"
    data = root / "kvhub" / "data"
    data.mkdir(parents=True)
    shutil.copy(REPO / "kvhub" / "data" / "index.json", data / "index.json")
    (root / "registry").mkdir()
    (root / "registry" / "index.json").symlink_to("../kvhub/data/index.json")
    assert main(["registry", "build", "--root", str(root)]) == 0
    return root


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- MODEL_ZOO.md ---------------------------------------------------------------------------------------------

def index_document() -> dict:
    return json.loads((REPO / "registry" / "index.json").read_text(encoding="utf-8"))


def test_model_zoo_is_generated_from_the_index():
    """The staleness test: MODEL_ZOO.md is exactly what `kvhub registry build` makes of registry/index.json."""
    expected = render_zoo(index_document())
    assert (REPO / "MODEL_ZOO.md").read_text(encoding="utf-8") == expected, \
        "MODEL_ZOO.md is stale: run `kvhub registry build` and commit it"
    assert (REPO / "registry" / "compression_vs_quality.png").read_bytes().startswith(PNG_MAGIC)


def test_pending_rows_carry_no_numbers_and_claims_are_labelled():
    document = index_document()
    index = RegistryIndex.parse(document, "registry/index.json")
    text = render_zoo(document)
    head, claims_and_details = text.split(CLAIMS_HEADING)
    claims, details = claims_and_details.split("\n## Models\n")
    rows = {line.split(" | ")[0].split("[")[1].split("]")[0]: line.split(" | ")
            for line in head.splitlines() if line.startswith("| [")}
    assert set(rows) == {e.model for e in index.entries}
    for entry in index.entries:
        row = rows[entry.model]
        assert row[1] == entry.status
        if entry.status != "validated":
            assert row[2:6] == ["not measured", "-", "-", "-"], row
        if entry.claimed:
            ppl = f"{entry.claimed['ppl_delta_pct']:+.2f}%"
            section = details.split(f"`{entry.model}`", 1)[1].split("\n### ", 1)[0]
            assert ppl not in " | ".join(row) and ppl not in section, \
                f"{entry.model}: claimed {ppl} shown outside the claims section"
            assert f"| {entry.model} |" in claims and ppl in claims
    assert "never measured by kvhub" in claims and "not validated" in claims
    inherited = {"Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1", "Qwen/Qwen2-1.5B", "Qwen/Qwen2.5-0.5B"}
    assert inherited <= {e.model for e in index.entries if e.claimed and e.status == "pending"}


def test_build_and_check(tmp_path, capsys):
    root = repo_copy(tmp_path)
    for entry in RegistryIndex.parse(index_document(), "index").entries:
        (root / entry.recipe).mkdir(parents=True)
        (root / entry.recipe / "recipe.json").write_text("{}")
    code, out, _ = cli(capsys, "registry", "check", "--root", root)
    assert code == 0 and "ok:" in out
    assert (root / "MODEL_ZOO.md").read_bytes() == (REPO / "MODEL_ZOO.md").read_bytes()
    # Building twice gives the same bytes, plot included (no timestamp in the PNG).
    plot = (root / "registry" / "compression_vs_quality.png").read_bytes()
    assert main(["registry", "build", "--root", str(root)]) == 0
    assert (root / "registry" / "compression_vs_quality.png").read_bytes() == plot

    zoo = root / "MODEL_ZOO.md"
    zoo.write_text(zoo.read_text().replace("pending", "validated", 1))
    assert "stale" in cli_error(capsys, "registry", "check", "--root", root)
    assert main(["registry", "build", "--root", str(root)]) == 0
    shutil.rmtree(root / "presets" / "google--gemma-7b")
    assert "presets/google--gemma-7b/" in cli_error(capsys, "registry", "check", "--root", root)


def test_check_refuses_a_validated_entry_or_its_preset_lacking_a_domain(tmp_path, capsys):
    """A validated number must cover every domain of the protocol (kvhub.protocol): one corpus dropped from the index
    entry, or from the preset config in the repository behind it, and `registry check` fails naming it."""
    from kvhub.protocol import DOMAINS

    root = repo_copy(tmp_path)
    for entry in RegistryIndex.parse(index_document(), "index").entries:
        shutil.copytree(REPO / entry.recipe, root / entry.recipe)
    assert cli(capsys, "registry", "check", "--root", root)[0] == 0
    dropped = sorted(DOMAINS)[-1]
    index = root / "kvhub" / "data" / "index.json"
    document = json.loads(index.read_text())
    [smollm2] = [e for e in document["entries"] if e["status"] == "validated"]
    del smollm2["metrics"]["ppl_delta_pct_by_corpus"][dropped]
    index.write_text(json.dumps(document, indent=2))
    assert main(["registry", "build", "--root", str(root)]) == 0
    error = cli_error(capsys, "registry", "check", "--root", root)
    assert f"lacks the domain(s) {dropped}" in error and smollm2["model"] in error and "kvhub eval" in error

    shutil.copy(REPO / "kvhub" / "data" / "index.json", index)
    assert main(["registry", "build", "--root", str(root)]) == 0
    edit_metrics(root / smollm2["recipe"], lambda m: m["perplexity"]["corpora"].pop(dropped))
    error = cli_error(capsys, "registry", "check", "--root", root)
    assert f"measurement lacks the domain(s) {dropped}" in error and "kvhub_preset.json" in error


def test_the_index_and_the_zoo_show_the_bundled_storage_budgets_as_measured():
    """Each storage budget the bundled preset measured (benchmarks/lmcache_reuse.py --write-metrics) is in the index
    with its ratio, mean and worst corpus, and in the zoo's KV-at-rest column; the results file agrees."""
    config = json.loads((REPO / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct" / CONFIG_NAME).read_text())
    entry = next(e for e in index_document()["entries"] if e["model"] == config["base_model"]["id"])
    results = json.loads((REPO / "benchmarks" / "results" / "lmcache_reuse.json").read_text())["rows"]
    zoo = (REPO / "MODEL_ZOO.md").read_text(encoding="utf-8")
    budgets = config["storage"]["budgets"]
    assert sorted(entry["metrics"]["storage"]) == sorted(budgets) == ["10x", "16x"]
    for name, budget in budgets.items():
        recorded, m = entry["metrics"]["storage"][name], budget["metrics"]
        row = results[f"kvhub storage form, {name}"]
        assert (recorded["ppl_delta_pct"], recorded["ppl_delta_pct_worst"], recorded["worst_corpus"]) == \
            (m["ppl_delta_pct_mean"], m["ppl_delta_pct_worst"], m["worst_corpus"]) == \
            (row["ppl_delta_pct_mean"], row["ppl_delta_pct_worst"], row["worst_corpus"])
        assert recorded["ratio_vs_fp16_chunk"] == budget["ratio_vs_fp16_chunk"]
        assert abs(row["ratio_vs_fp16_chunk"] - budget["ratio_vs_fp16_chunk"]) < 0.01  # the bytes LMCache wrote
        assert f"{recorded['ratio_vs_fp16_chunk']:.1f}x: {recorded['ppl_delta_pct_worst']:+.2f}%" in zoo


def test_repository_registry_is_consistent(capsys):
    """What CI runs: the committed index is valid, MODEL_ZOO.md is fresh, every recipe folder exists."""
    code, out, err = cli(capsys, "registry", "check", "--root", REPO)
    assert code == 0, err


def test_recipes_of_the_pending_models():
    index = RegistryIndex.parse(index_document(), "index")
    claims = {"Qwen/Qwen2.5-7B": (2.67, 0.99), "mistralai/Mistral-7B-v0.1": (2.42, 2.30),
              "Qwen/Qwen2-1.5B": (2.29, 3.06), "Qwen/Qwen2.5-0.5B": (2.29, 4.06)}
    pending = [e for e in index.entries if e.status == "pending" and (REPO / e.recipe / "recipe.json").is_file()]
    assert len(pending) >= 9
    for entry in pending:
        recipe = Recipe.load(REPO / entry.recipe)
        assert recipe.model == entry.model and recipe.target_ppl_delta == 0.01
        if entry.model in claims:
            assert recipe.claimed["verified"] is False
            assert (recipe.claimed["compression_ratio"], recipe.claimed["ppl_delta"]) == claims[entry.model]
    legacy = Recipe.load(REPO / "presets" / "Qwen--Qwen2.5-7B").extra["inherited_recipe"]
    assert legacy["value_rank"] == 96 and legacy["value_bits"] == 8 and legacy["compress_keys"] is False


def test_plot_shows_validated_entries_only():
    document = index_document()
    empty = render_plot(document)
    assert empty.startswith(PNG_MAGIC) and render_plot(document) == empty
    entry = document["entries"][0]
    validated = json.loads(json.dumps(document))
    validated["entries"][0] = {
        **entry, "status": "validated",
        "preset": {"repo_id": entry["preset"]["repo_id"], "revision": "a" * 40,
                   "files": [{"name": CONFIG_NAME, "sha256": "b" * 64, "size": 1}]},
        "metrics": {"context_length": 2048, "compression": {"total": 3.0, "keys": 2.5, "values": 3.5},
                    "ppl_delta_pct": 0.8, "needle": {"accuracy": 0.8, "baseline_accuracy": 0.87}},
        "provenance": {"measured_by": "pytest", "hardware": "cpu", "kvhub_version": "0.1.0", "date": "2026-11-29"},
    }
    assert render_plot(validated) != empty
    text = render_zoo(validated)
    assert f"| [{entry['model']}]" in text and "| validated | 3.00x | 2.50x / 3.50x | not measured on every domain | +0.80% | 0.80 / 0.87 |" in text
    assert "a" * 12 in text and "measured by | pytest" in text


def test_zoo_links_only_commits_on_the_public_hub():
    """Validated and published are two facts: a commit is linked as a huggingface.co commit only when the index says
    it was made there; a rehearsal commit is named, never linked; an unpublished preset has no commit at all."""
    document = index_document()
    smol = document["entries"][0]
    assert smol["status"] == "validated" and smol["preset"]["revision"] is None  # the committed index
    assert "huggingface.co/" + smol["preset"]["repo_id"] not in render_zoo(document)
    for endpoint, linked in (("https://huggingface.co", True), ("http://127.0.0.1:8080", False), (None, False)):
        copy = json.loads(json.dumps(document))
        copy["entries"][0]["preset"]["revision"] = "c" * 40
        if endpoint:
            copy["entries"][0]["preset"]["endpoint"] = endpoint
        text = render_zoo(copy)
        link = f"(https://huggingface.co/{smol['preset']['repo_id']}/tree/{'c' * 40})"
        assert (link in text) == linked, endpoint
        assert ("c" * 12) in text


# --- verify ---------------------------------------------------------------------------------------------------

def shared_bases_bytes(folder: Path) -> int:
    """What a device holds for a preset's bases, counted from its files alone: every tensor of the .safetensors file
    in fp32 (how kvhub loads them, whatever the file stores), plus per stream what is derived once per device: the
    per-component deviations [H, r], the decode plan's matrix ``[W | mean]`` [H, d, r + 1], one fp32 level table of
    ``2**bits`` entries per quantized segment with Lloyd-Max levels; with log8 scales, one reference per head and
    scaled segment [H, groups] and the plan's scale table [H, groups, 256] in fp32."""
    raw = (folder / BASES_NAME).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    tensors = {name: t["shape"] for name, t in header.items() if name != "__metadata__"}
    codec = json.loads((folder / CONFIG_NAME).read_text())["codec"]
    total = sum(4 * math.prod(shape) for shape in tensors.values())
    for name, (heads, dim, rank) in ((n, s) for n, s in tensors.items() if n.endswith(".basis")):
        _, layer, stream, _ = name.split(".")
        spec = codec.get("layers", {}).get(layer, codec["default"])[stream]
        quantized = [bits for _, bits in spec["segments"] if 0 < bits < 16]
        scaled = len(quantized) if spec.get("scale", "token") != "channel" else 0
        references = scaled if spec.get("scale_format", "fp16") == "log8" else 0
        tables = sum(2**bits for bits in quantized) if spec.get("quantizer", "uniform") == "lloyd-max" else 0
        total += 4 * (heads * rank + heads * dim * (rank + 1) + heads * references * (1 + 256) + tables)
    return total


def test_eval_and_show_report_per_sequence_shared_and_allocated_bytes(tiny_preset, model_dir, eval_text, tmp_path,
                                                                      capsys):
    folder = tmp_path / "preset"
    shutil.copytree(tiny_preset, folder)
    code, out, err = cli(capsys, "eval", folder, "--model", model_dir, "--ppl", eval_text, *EVAL_ARGS,
                         "--write-metrics")
    assert code == 0, err
    held = KVPreset.load_folder(folder).config["metrics"]["bytes"]
    assert held["bases"] == shared_bases_bytes(folder)  # counted from the file's header
    assert 0 < held["total"] <= held["allocated"]
    assert held["fp16"] == 64 * 2 * 2 * tiny_model("llama").config.num_hidden_layers * 2 * 16  # tokens*K,V*fp16*L*H*d
    for words in ("per sequence", "shared bases", "allocated", "amortized over batch 1", "64 tokens, batch 1"):
        assert words in out, out
    code, shown, err = cli(capsys, "show", folder)
    assert code == 0, err
    assert f"{held['bases']:,}" in shown and f"{held['allocated']:,}" in shown
    assert f"amortized over batch 1: {held['fp16'] / (held['total'] + held['bases']):.2f}x" in shown


def test_verify_passes_when_the_claims_match(preset_copy, model_dir, eval_text, tmp_path, capsys):
    code, out, err = verify(capsys, preset_copy, model_dir, eval_text, tmp_path / "report")
    assert code == 0, err
    report, markdown = read_report(tmp_path / "report")
    assert report["passed"] and not failed(report)
    assert {c["name"] for c in report["checks"]} >= {
        "preset files", "model card", "evaluation text", "model", "PPL delta (mean)", "compression (total)"}
    claimed = json.loads((preset_copy / CONFIG_NAME).read_text())["metrics"]
    assert report["measured"]["perplexity"]["mean_delta_pct"] == claimed["perplexity"]["mean_delta_pct"]
    assert report["measured"]["compression"] == claimed["compression"]
    assert markdown.startswith("### kvhub registry verify: PASS") and "| PPL delta (mean) |" in markdown
    assert f"kvhub registry verify {preset_copy}" in markdown  # the command that reproduces it


def test_verify_fails_when_the_ppl_claim_is_off(preset_copy, model_dir, eval_text, tmp_path, capsys):
    edit_metrics(preset_copy, lambda m: m["perplexity"].update(mean_delta_pct=m["perplexity"]["mean_delta_pct"] + 1.0))
    code, _, err = verify(capsys, preset_copy, model_dir, eval_text, tmp_path / "report")
    assert code == 1 and "PPL delta (mean)" in err and "beyond 0.25 pp" in err and "Traceback" not in err
    report, markdown = read_report(tmp_path / "report")
    assert not report["passed"] and failed(report) == ["PPL delta (mean)"]
    assert "FAIL" in markdown and "off by 1.000 pp, beyond 0.25 pp" in markdown
    # The tolerance is an option.
    code, _, err = verify(capsys, preset_copy, model_dir, eval_text, tmp_path / "wide", "--tolerance-ppl", "1.5")
    assert code == 0, err


def test_verify_fails_when_the_compression_claim_is_off(preset_copy, model_dir, eval_text, tmp_path, capsys):
    edit_metrics(preset_copy, lambda m: m["compression"].update(total=round(m["compression"]["total"] * 1.05, 4)))
    error = cli_error(capsys, "registry", "verify", preset_copy, "--model", model_dir, "--ppl", eval_text,
                      "--report-dir", tmp_path / "report")
    assert "compression (total)" in error and "beyond 2%" in error
    report, _ = read_report(tmp_path / "report")
    assert failed(report) == ["compression (total)"]
    code, _, err = verify(capsys, preset_copy, model_dir, eval_text, tmp_path / "wide", "--tolerance-compression", "0.1")
    assert code == 0, err


def test_verify_fails_on_a_checksum_mismatch(preset_copy, model_dir, eval_text, tmp_path, capsys):
    bases = preset_copy / BASES_NAME
    data = bytearray(bases.read_bytes())
    data[-1] ^= 0xFF
    bases.write_bytes(bytes(data))
    error = cli_error(capsys, "registry", "verify", preset_copy, "--model", model_dir, "--ppl", eval_text,
                      "--report-dir", tmp_path / "report")
    assert "sha256" in error and BASES_NAME in error
    report, markdown = read_report(tmp_path / "report")
    assert failed(report) == ["preset files"] and report["measured"] is None and "FAIL" in markdown


def test_verify_refuses_other_evaluation_text_and_a_stale_card(preset_copy, model_dir, eval_text, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(eval_text.read_text() + " and more")
    verify(capsys, preset_copy, model_dir, other, tmp_path / "text")
    report, _ = read_report(tmp_path / "text")
    assert failed(report) == ["evaluation text"] and report["measured"] is None

    (preset_copy / "README.md").write_text("# edited by hand\n")
    verify(capsys, preset_copy, model_dir, eval_text, tmp_path / "card")
    report, _ = read_report(tmp_path / "card")
    assert failed(report) == ["model card"] and not report["passed"]


def test_verify_refuses_another_model_and_an_unmeasured_preset(preset_copy, tiny_preset, model_dir, eval_text,
                                                                 tmp_path, capsys):
    other = tmp_path / "qwen2"
    tiny_model("qwen2-mixed").save_pretrained(other)  # 4 layers: not what the preset was fitted on
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, other / name)
    verify(capsys, preset_copy, other, eval_text, tmp_path / "model")
    report, _ = read_report(tmp_path / "model")
    assert failed(report) == ["model"] and "num_hidden_layers" in report["checks"][-1]["detail"]

    verify(capsys, tiny_preset, model_dir, eval_text, tmp_path / "unmeasured")
    report, _ = read_report(tmp_path / "unmeasured")
    assert failed(report) == ["claimed metrics"] and "--write-metrics" in report["checks"][-1]["detail"]


@pytest.mark.slow
def test_benchmark_preset_verifies_on_cpu(tmp_path, capsys):
    """The SmolLM2 preset re-measured on CPU with its recorded perplexity protocol (7 corpora x 3 windows of 2048
    tokens) and compression: what validate-preset.yml does on a GPU for every contributed preset, less the needle
    grid (--no-needle: the grid adds six minutes on 2 cores and would take the suite past its 20-minute budget; the
    workflow and `kvhub eval --needle` re-run it) and without re-measuring the storage budgets (--storage-windows 0:
    their recorded windows take most of an hour on 2 cores). Minutes, not seconds.
    The bundled preset keeps the target it was tuned for (+1% on every domain), so it verifies as it is; the
    books-tuned preset it replaced (+1% on the books' mean) misses it on the whole protocol, and verify refuses that
    one before measuring unless told to let it through."""
    error = cli_error(capsys, "registry", "verify", BOOKS_TUNED, "--device", "cpu", "--ppl", EVALUATION, "--report-dir",
                      tmp_path / "refused")
    assert "misses the target it was tuned for" in error  # +1% on the books' mean, not on every domain's
    folder = REPO / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    code, out, err = cli(capsys, "registry", "verify", folder, "--device", "cpu", "--ppl", EVALUATION,
                         "--report-dir", tmp_path, "--no-needle", "--storage-windows", "0")
    assert code == 0, out + err
    report, markdown = read_report(tmp_path)
    assert report["passed"] and not report["needle_rerun"] and "needle" in report["claimed"]
    # the storage budgets (KV at rest) are not re-measured here (tests/test_storage_codec.py covers that check), and
    # the report says so instead of passing them silently
    (storage,) = [c for c in report["checks"] if c["name"] == "storage budgets"]
    assert storage["ok"] and "not re-measured" in storage["detail"]
    assert "allowed by --allow-weaker" not in markdown and "PPL delta (worst domain)" in markdown


def weaker_smollm2(tmp_path: Path) -> Path:
    """The bundled SmolLM2 preset as the issue's rehearsal saw it: measured on one 512-token window at +4.10%
    against its 1% target, to replace the validated entry measured on 3 x 2048 tokens."""
    folder = tmp_path / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    shutil.copytree(REPO / "presets" / folder.name, folder)
    edit_metrics(folder, lambda m: m["perplexity"].update(windows=1, window_tokens=512, mean_delta_pct=4.10,
                                                          worst_delta_pct=4.10))
    return folder


def test_verify_refuses_a_candidate_that_misses_its_target_or_is_weaker_than_the_entry(tmp_path, capsys, monkeypatch):
    import kvhub.models
    from kvhub.errors import ModelLoadError

    folder = weaker_smollm2(tmp_path)
    monkeypatch.setattr(kvhub.models, "load_model", lambda *a, **k: pytest.fail("measured a refused preset"))
    error = cli_error(capsys, "registry", "verify", folder, "--ppl", EVALUATION, "--report-dir", tmp_path / "r")
    assert "misses the target it was tuned for" in error and "--allow-weaker" in error
    assert "windows 1 < 3" in error and "window tokens 512 < 2048" in error and "its preset's config" in error
    report, markdown = read_report(tmp_path / "r")
    assert failed(report) == ["own target", "protocol"] and report["measured"] is None
    assert "| own target | +4.100% | - | at most +1.00% |" in markdown and "| protocol | windows 1, " in markdown

    def unloadable(*args, **kwargs):
        raise ModelLoadError("stub: not loaded in this test")

    monkeypatch.setattr(kvhub.models, "load_model", unloadable)
    cli(capsys, "registry", "verify", folder, "--ppl", EVALUATION, "--report-dir", tmp_path / "a", "--allow-weaker")
    report, _ = read_report(tmp_path / "a")
    assert failed(report) == ["model"]  # past the standing checks, which say they were let through
    allowed = {c["name"]: c["detail"] for c in report["checks"] if "allowed by --allow-weaker" in c["detail"]}
    assert set(allowed) == {"own target", "protocol"}


def test_rehearsal_refuses_a_weaker_candidate_before_measuring(tmp_path):
    """scripts/rehearse_publish.py, as CONTRIBUTING runs it, on the issue's candidate: exit 1, one line, nothing
    pushed or written."""
    import os
    import subprocess
    import sys

    folder = weaker_smollm2(tmp_path)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "rehearse_publish.py"), str(folder), "--ppl",
                             str(EVALUATION), "--root", str(REPO), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not published, verification failed" in errors[0] and "misses the target" in errors[0]
    assert "pushed" not in result.stdout and not (tmp_path / "out").exists()


def test_protocol_against_an_entry_known_from_the_index_alone():
    """An entry whose preset is not packaged: its window length and whether it ran a needle grid, from the index."""
    from kvhub.registry import RegistryEntry
    from kvhub.registry_tools.verify import standing_checks

    entry = RegistryEntry.from_json({
        "model": TINY_MODEL_ID, "aliases": [], "status": "validated", "recipe": "presets/test--tiny-llama/",
        "preset": {"repo_id": PRESET_REPO, "revision": None, "files": []},
        "metrics": {"context_length": 2048, "compression": {"total": 4, "keys": 4, "values": 4}, "ppl_delta_pct": 0.5,
                    "needle": {"accuracy": 1.0, "baseline_accuracy": 1.0}}})
    metrics = {"perplexity": {"windows": 3, "window_tokens": 2048, "chunk": 128, "mean_delta_pct": 0.9}}
    config = {"metrics": metrics, "calibration": {"tuning": {"target_ppl_delta": 0.01}}}
    [target, proto] = standing_checks(config, entry)
    assert target.ok and not proto.ok and "needle cells 0 < 1" in proto.detail and "the registry index" in proto.detail
    metrics["needle"] = {"context_lengths": [1024], "depths": [0.5]}
    assert all(c.ok for c in standing_checks(config, entry))
    assert standing_checks({"metrics": metrics, "calibration": {}}, None) == []  # no target, nothing replaced


def needle_block(compressed, baseline) -> dict:
    cells = [h for row in compressed for h in row]
    base = [h for row in baseline for h in row]
    return {"context_lengths": [1024, 2048], "depths": [0.1, 0.5, 0.9], "compressed": compressed,
            "baseline": baseline, "accuracy": sum(cells) / len(cells), "baseline_accuracy": sum(base) / len(base)}


def test_needle_grid_comparison():
    base = [[1, 1, 1], [1, 0, 1]]
    claimed = needle_block([[1, 1, 1], [1, 0, 0]], base)
    assert compare_needle(claimed, needle_block([[1, 1, 1], [1, 0, 0]], base), 1).ok
    # One compressed cell differs where the baseline flipped too: the model is unstable there, within tolerance.
    flipped = needle_block([[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 1, 1]])
    check = compare_needle(claimed, flipped, 1)
    assert check.ok and "2048@0.5" in check.detail
    assert not compare_needle(claimed, flipped, 0).ok
    # A compressed cell that differs while the baseline did not is a real discrepancy, whatever the tolerance.
    check = compare_needle(claimed, needle_block([[0, 1, 1], [1, 0, 0]], base), 5)
    assert not check.ok and "1024@0.1" in check.detail and "baseline did not change" in check.detail
    # Two unstable cells are more than one.
    twice = needle_block([[1, 1, 1], [0, 1, 0]], [[1, 1, 1], [0, 1, 1]])
    assert not compare_needle(claimed, twice, 1).ok and compare_needle(claimed, twice, 2).ok


def test_metric_comparison_tolerances():
    claimed = {"context_length": 2048, "compression": {"total": 4.0, "keys": 3.0, "values": 5.0},
               "perplexity": {"mean_delta_pct": 1.0}}
    close = {"context_length": 2048, "compression": {"total": 4.07, "keys": 3.0, "values": 5.0},
             "perplexity": {"mean_delta_pct": 1.24}}
    assert all(c.ok for c in compare_metrics(claimed, close, Tolerances()))
    far = {**close, "compression": {"total": 4.1, "keys": 3.0, "values": 5.0}, "perplexity": {"mean_delta_pct": 0.7}}
    assert [c.name for c in compare_metrics(claimed, far, Tolerances()) if not c.ok] == [
        "PPL delta (mean)", "compression (total)"]
    with pytest.raises(Exception, match="must not be negative"):
        Tolerances(ppl_pp=-1)


# --- publish --------------------------------------------------------------------------------------------------

def test_publish_dry_run_end_to_end(local_hub, tiny_preset, model_dir, eval_text, tmp_path, capsys, monkeypatch):
    """A pull request's preset goes verify -> publish against the local hub: pushed, pinned in the index with the
    sha256 of every file the client downloads, validated with measured numbers and provenance, MODEL_ZOO.md
    regenerated; once the index is uploaded, `download_preset` of the model name gets that exact commit."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)  # provenance is then the command, not a workflow run
    root = repo_copy(tmp_path)
    before = {p: (root / p).read_bytes() for p in ("registry/index.json", "MODEL_ZOO.md")}
    folder = tmp_path / "presets" / "test--tiny-llama"
    shutil.copytree(tiny_preset, folder)
    measure(capsys, folder, model_dir, eval_text, *NEEDLE_ARGS, "--haystack", str(eval_text))
    out = tmp_path / "out"

    code, stdout, err = cli(capsys, "registry", "publish", folder, "--repo-id", PRESET_REPO, "--model", model_dir,
                            "--ppl", eval_text, "--haystack", eval_text, "--endpoint", local_hub.endpoint,
                            "--root", root, "--dry-run", "--out", out, "--report-dir", tmp_path / "report")
    assert code == 0, err
    commit = HfApi(endpoint=local_hub.endpoint).model_info(PRESET_REPO).sha
    assert f"pushed   {PRESET_REPO} @ {commit}" in stdout and "entry added" in stdout
    assert {p: (root / p).read_bytes() for p in before} == before  # a dry run leaves the repository alone

    document = json.loads((out / "registry" / "index.json").read_text())
    index = RegistryIndex.parse(document, "dry run")
    entry = index.find(TINY_MODEL_ID)
    assert entry.status == "validated" and entry.repo_id == PRESET_REPO and entry.revision == commit
    assert "tiny-llama" in entry.aliases and entry.recipe == "presets/test--tiny-llama/"
    config = json.loads((folder / CONFIG_NAME).read_text())
    served = {CONFIG_NAME: (folder / CONFIG_NAME).read_bytes(), "README.md": model_card(config).encode(),
              BASES_NAME: (folder / BASES_NAME).read_bytes()}
    assert {(f.name, f.size, f.sha256) for f in entry.files} == {(n, len(d), sha256(d)) for n, d in served.items()}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] and report["needle_rerun"]
    raw = next(e for e in document["entries"] if e["model"] == TINY_MODEL_ID)
    assert raw["metrics"] == registry_metrics(report["measured"]) and raw["metrics"]["needle"] is not None
    assert raw["metrics"]["ppl_delta_pct"] == config["metrics"]["perplexity"]["mean_delta_pct"]
    assert set(raw["provenance"]) == {"measured_by", "hardware", "kvhub_version", "date"}
    assert raw["provenance"]["measured_by"].startswith("kvhub registry publish")
    assert raw["provenance"]["hardware"] == report["measured"]["hardware"]
    others = [e for e in document["entries"] if e["model"] != TINY_MODEL_ID]
    assert others == json.loads(before["registry/index.json"])["entries"]  # nothing else changed

    zoo = (out / "MODEL_ZOO.md").read_text()
    assert zoo == render_zoo(document) and f"| [{TINY_MODEL_ID}]" in zoo and commit[:12] in zoo
    assert (out / "registry" / "compression_vs_quality.png").read_bytes().startswith(PNG_MAGIC)

    # The repository's own index pins presets this test hub never received (push-index checks every pin): upload
    # only the entry published here. Until the index is on the registry repo the model name is unknown; then it
    # resolves to the pinned commit.
    document["entries"] = [e for e in document["entries"] if e["model"] == TINY_MODEL_ID or e["status"] != "validated"]
    (out / "registry" / "index.json").write_text(json.dumps(document))
    code, stdout, err = cli(capsys, "registry", "push-index", "--root", out, "--endpoint", local_hub.endpoint)
    assert code == 0, err
    download = download_preset(TINY_MODEL_ID)
    assert download.commit == commit and download.registry_verified
    assert download.metrics.ppl_delta_pct == raw["metrics"]["ppl_delta_pct"]

    # push-index refuses an index that pins a commit the Hub does not have.
    raw["preset"]["revision"] = "f" * 40
    (out / "registry" / "index.json").write_text(json.dumps(document))
    assert "cannot serve" in cli_error(capsys, "registry", "push-index", "--root", out, "--endpoint", local_hub.endpoint)


def test_publish_in_place_updates_the_linked_index(local_hub, preset_copy, model_dir, eval_text, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    root = repo_copy(tmp_path)
    code, _, err = cli(capsys, "registry", "publish", preset_copy, "--repo-id", PRESET_REPO, "--model", model_dir,
                       "--ppl", eval_text, "--endpoint", local_hub.endpoint, "--root", root, "--alias", "tiny",
                       "--measured-by", "pytest run 1", "--report-dir", tmp_path / "report")
    assert code == 0, err
    link = root / "registry" / "index.json"
    assert link.is_symlink() and link.readlink() == Path("../kvhub/data/index.json")
    entry = RegistryIndex.parse(json.loads(link.read_text()), "in place").find("tiny")
    assert entry.model == TINY_MODEL_ID and entry.provenance["measured_by"] == "pytest run 1"
    assert (root / "MODEL_ZOO.md").read_text() == render_zoo(json.loads(link.read_text()))
    code, _, err = cli(capsys, "registry", "check", "--root", root)  # fresh zoo; only the recipe folders are absent
    assert code == 1 and "stale" not in err and "recipe folder(s)" in err


def test_provenance_names_the_workflow_run(monkeypatch):
    for name, value in {"GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.com",
                        "GITHUB_REPOSITORY": "kvhub/kvhub", "GITHUB_RUN_ID": "42"}.items():
        monkeypatch.setenv(name, value)
    assert measured_by("kvhub registry publish x") == "https://github.com/kvhub/kvhub/actions/runs/42"
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert measured_by("kvhub registry publish x") == "kvhub registry publish x"


def test_publish_refuses_a_failed_verification(local_hub, preset_copy, model_dir, eval_text, tmp_path, capsys,
                                               monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    root = repo_copy(tmp_path)
    index_before = (root / "registry" / "index.json").read_bytes()
    edit_metrics(preset_copy, lambda m: m["perplexity"].update(mean_delta_pct=m["perplexity"]["mean_delta_pct"] - 2))
    error = cli_error(capsys, "registry", "publish", preset_copy, "--repo-id", PRESET_REPO, "--model", model_dir,
                      "--ppl", eval_text, "--endpoint", local_hub.endpoint, "--root", root,
                      "--report-dir", tmp_path / "report")
    assert "not published, verification failed" in error and "PPL delta (mean)" in error
    assert not HfApi(endpoint=local_hub.endpoint).repo_exists(PRESET_REPO)
    assert (root / "registry" / "index.json").read_bytes() == index_before
    assert "FAIL" in (tmp_path / "report" / "report.md").read_text()


def test_dry_run_never_targets_the_public_hub(measured_preset, tmp_path, capsys):
    error = cli_error(capsys, "registry", "publish", measured_preset, "--root", REPO, "--dry-run", "--out",
                      tmp_path / "out", "--endpoint", "https://huggingface.co", "--ppl", str(tmp_path))
    assert "refuses the public Hub" in error and "fix:" in error and not (tmp_path / "out").exists()


def test_publish_refuses_a_taken_alias_before_measuring(measured_preset, tmp_path, capsys):
    root = repo_copy(tmp_path)
    error = cli_error(capsys, "registry", "publish", measured_preset, "--repo-id", PRESET_REPO, "--root", root,
                      "--alias", "smollm2", "--ppl", str(tmp_path))
    assert "'smollm2' names both" in error

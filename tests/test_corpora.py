"""The corpora ship in the repository, where kvhub's defaults look; the evaluation protocol's domains are all there,
each with calibration text of its own kind, and calibration never overlaps evaluation."""

from __future__ import annotations

import re

import pytest

from kvhub.cli import main
from kvhub.corpora import CORPORA, default_corpus
from kvhub.errors import CorpusNotFoundError
from kvhub.protocol import CALIBRATION_DOMAINS, DOMAINS, calibration_domain
from tests.paths import CALIBRATION, EVALUATION, ROOT

MIN_PARAGRAPH_CHARS = 80  # shorter blocks ("CHAPTER I", "return None") legitimately repeat across texts


def paragraphs(*folders) -> dict[str, str]:
    """Whitespace-normalized blank-line-separated blocks of at least MIN_PARAGRAPH_CHARS -> the file they are in."""
    out = {}
    for folder in folders:
        for path in sorted(folder.glob("*.txt")):
            for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
                norm = " ".join(block.split())
                if len(norm) >= MIN_PARAGRAPH_CHARS:
                    out.setdefault(norm, path.name)
    return out


def test_corpora_are_in_the_repo_where_the_defaults_resolve():
    assert CORPORA == ROOT / "corpora"
    assert default_corpus("calibration") == CALIBRATION and default_corpus("evaluation") == EVALUATION


def test_every_protocol_domain_is_in_the_default_evaluation_corpus_and_nothing_else():
    """The protocol (kvhub.protocol) and the default folder are one list, so `kvhub eval` with no --ppl measures
    exactly the domains `registry check` demands."""
    assert sorted(p.stem for p in EVALUATION.glob("*.txt")) == sorted(DOMAINS)
    assert len(set(DOMAINS.values())) >= 6  # novels, scripture, documentation, source code, German, logs


def test_calibration_files_that_share_a_domain_name_one_the_evaluation_protocol_knows():
    """The storage fit weighs calibration domains alike: the four novels must be one domain, named as the
    protocol's novels are, and every file the mapping names must exist."""
    stems = {p.stem for p in CALIBRATION.glob("*.txt")}
    assert set(CALIBRATION_DOMAINS) <= stems
    assert {calibration_domain(s) for s in stems if s.startswith("austen_")} == {DOMAINS["austen_emma"]}
    assert {calibration_domain(s) for s in stems if s.startswith("python_docs_")} == {DOMAINS["python_docs_library"]}
    assert len({calibration_domain(s) for s in stems}) == len(set(DOMAINS.values()))  # one per protocol domain


@pytest.mark.parametrize("stem, marker", [("debian_reference_de", " und "), ("debian_changelogs", "urgency="),
                                          ("python_stdlib_modules", "def "), ("python_docs", ".. ")])
def test_each_new_domain_calibrates_on_its_own_kind_of_text_from_other_documents(stem, marker):
    """A domain's calibration files (``_a``, or the guides and reference) and its evaluation file are the same kind of text (the
    marker is frequent in both) but different documents (no shared paragraph: the test below)."""
    calib = list(CALIBRATION.glob(f"{stem}*.txt"))
    (evaluation,) = [p for p in EVALUATION.glob(f"{stem}*.txt")]
    assert calib
    for path in (*calib, evaluation):
        text = path.read_text(encoding="utf-8")
        assert 250_000 <= len(text) <= 300_000 and text.count(marker) >= 20, path


def test_calibration_and_evaluation_share_no_paragraph():
    calibration = paragraphs(CALIBRATION)
    evaluation = paragraphs(EVALUATION)
    assert len(calibration) > 1000 and len(evaluation) > 1000
    shared = [(p[:60], calibration[p], evaluation[p]) for p in calibration.keys() & evaluation.keys()]
    assert not shared, shared[:5]


def test_missing_default_corpus_names_the_option(monkeypatch, tmp_path):
    monkeypatch.setattr("kvhub.corpora.CORPORA", tmp_path / "corpora")
    with pytest.raises(CorpusNotFoundError, match="--calib"):
        default_corpus("calibration")
    with pytest.raises(CorpusNotFoundError, match="--ppl"):
        default_corpus("evaluation")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_defaults_name_the_repo_corpora_from_any_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    for command, corpus in ((["tune"], CALIBRATION), (["eval"], EVALUATION), (["registry", "verify"], EVALUATION)):
        code, out, _ = run_cli(capsys, *command, "--help")
        assert code == 0 and str(corpus) in "".join(out.split()), command  # help wraps lines at hyphens too


@pytest.mark.parametrize("command, option", [(["tune", "--model", "x"], "--calib"),
                                             (["registry", "verify", "."], "--ppl"),
                                             (["eval", "."], "--ppl")])
def test_missing_corpora_is_one_error_line_naming_the_option(monkeypatch, tmp_path, capsys, command, option):
    """What a wheel install sees: the corpora are not packaged, so the default is absent."""
    monkeypatch.setattr("kvhub.corpora.CORPORA", tmp_path / "absent")
    monkeypatch.delenv("KVHUB_EVAL_CORPUS", raising=False)
    code, _, err = run_cli(capsys, *command)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and option in errors[0] and "Traceback" not in err, err

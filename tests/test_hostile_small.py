"""Issue #22 item 6: a FIFO in place of the bases, extract-pr's error in the PR comment, a bidi override in the card's
front matter, and preset folder names that differ only by case."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from kvhub.card import model_card
from kvhub.errors import PresetFileError, PullRequestError
from kvhub.preset import BASES_NAME, KVPreset
from kvhub.registry_tools.extract_pr import extract_pr
from tests.test_extract_pr import preset_files, pull_request, repo  # noqa: F401  (fixture)
from tests.test_preset import metrics_with

WORKFLOW = Path(__file__).resolve().parents[1] / ".github" / "workflows" / "validate-preset.yml"


def test_a_fifo_in_place_of_the_bases_is_refused_not_waited_on(tiny_preset, tmp_path):
    folder = tmp_path / "preset"
    shutil.copytree(tiny_preset, folder)
    (folder / BASES_NAME).unlink()
    os.mkfifo(folder / BASES_NAME)
    caught: list[BaseException] = []
    reader = threading.Thread(target=lambda: _load(folder, caught), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # the old behaviour: release the blocked reader, then fail
        os.close(os.open(folder / BASES_NAME, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("loading a preset whose bases are a FIFO blocked")
    assert len(caught) == 1 and isinstance(caught[0], PresetFileError) and "not a regular file" in str(caught[0])


def _load(folder: Path, caught: list) -> None:
    try:
        KVPreset.load_folder(folder)
    except BaseException as exc:  # noqa: BLE001 (handed to the test thread)
        caught.append(exc)


def test_extract_prs_error_is_inert_in_the_pull_request_comment(tmp_path):
    """The workflow's lines that paste extract-pr's error, run on a hostile error text: it lands in a fenced block
    that nothing in it can close, so no link, image or @-mention is live."""
    script = WORKFLOW.read_text()
    start = script.index("printf '### Not verified")
    lines = script[start : script.index("exit 1", start)]
    reports = tmp_path / "reports"
    reports.mkdir()
    hostile = "presets/[x](https://e.example)--![i](https://e.example/i.png)--@someone``` ~~~\n`code` <b>|</b>\r\n"
    (reports / "extract.txt").write_text(hostile)
    comment = tmp_path / "comment.md"
    subprocess.run(["bash", "-c", lines], check=True, env={**os.environ, "reports": str(reports), "comment": str(comment)})
    text = comment.read_text()
    fenced = re.fullmatch(r"### Not verified\n\n```text\n([^`]*)\n```\n", text)
    assert fenced is not None, text
    assert "@someone" in fenced.group(1) and "](https://e.example)" in fenced.group(1)  # quoted, not rendered


def test_a_bidi_override_never_reaches_the_cards_front_matter(tiny_preset):
    corpus = "books\u202etxt.exe\u200b"
    config = {**KVPreset.load_folder(tiny_preset).config, "metrics": metrics_with("cpu", corpus, "kvhub eval")}
    front = model_card(config).split("---")[1]
    assert "\u202e" not in front and "\u200b" not in front and "\\u202e" in front


@pytest.mark.parametrize("names", [("Org--New", "org--new"), ("Old--Model",)])
def test_folder_names_that_differ_only_by_case_are_refused(repo, tmp_path, names):  # noqa: F811
    """Two folders of the pull request, or one beside the base's presets/old--model."""
    files = {}
    for name in names:
        files |= preset_files(name)
    base, head = pull_request(repo, files)
    with pytest.raises(PullRequestError, match="differ only by case"):
        extract_pr(repo, base, head, tmp_path / "out")

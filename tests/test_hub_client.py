"""Presets on the Hub: kvhub.hub, kvhub.registry and `kvhub pull/list/push`, with the real huggingface_hub client
over real HTTP against LocalHub (tests/hub_server.py). The local_hub fixture points HF_ENDPOINT at it and isolates
the client's cache and token, so nothing here can reach the internet."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import _http

from kvhub.card import model_card
from kvhub.cli import main
from kvhub.errors import (
    HubAuthError,
    HubChecksumError,
    HubModelMismatchError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    HubRevisionNotFoundError,
    NoPresetError,
    PresetFileError,
    RegistryFormatError,
    UnknownModelError,
)
from kvhub.hub_presets import download_preset, push_preset
from kvhub.preset import BASES_NAME, CONFIG_NAME, KVPreset
from kvhub.registry import (
    INDEX_NAME,
    PACKAGED_SOURCE,
    REGISTRY_REPO_ENV,
    REGISTRY_REVISION_ENV,
    RegistryIndex,
    load_index,
    packaged_index,
)
from tests.conftest import TINY_MODEL_ID, TINY_MODEL_REVISION
from tests.hub_server import DEFAULT_TOKEN, git_blob_sha1

PRESET_REPO = "kvhub-test/tiny-llama-kvhub"
ALIAS = "tiny-llama"
REGISTRY = "kvhub/registry"
METRICS = {"context_length": 64, "compression": {"total": 3.1, "keys": 2.5, "values": 4.0}, "ppl_delta_pct": 0.8,
           "needle": {"accuracy": 1.0, "baseline_accuracy": 1.0}}
PENDING = {"model": "test/pending-model", "aliases": ["pending-model"], "status": "pending",
           "preset": {"repo_id": None, "revision": None, "files": []}, "recipe": "presets/test--pending-model/",
           "claimed": {"source": "a test catalogue", "verified": False, "compression": {"values": 2.5},
                       "ppl_delta_pct": 1.5}}


# --- helpers ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    """The client retries connection errors with sleeps of 1, 2, 4, 8, 8 s; a stopped hub must fail at once."""
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))


@pytest.fixture
def api(local_hub) -> HfApi:
    return HfApi(endpoint=local_hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture
def published(local_hub, tiny_preset) -> str:
    """tiny_preset pushed to PRESET_REPO; its commit."""
    return push_preset(tiny_preset, PRESET_REPO, token=DEFAULT_TOKEN).oid


@pytest.fixture
def registry(api, published, tiny_preset) -> dict:
    """The registry repo on the local hub: tiny-llama validated and pinned at `published`, plus a pending model."""
    entry = validated_entry(published, tiny_preset)
    publish_index(api, [entry, PENDING])
    return entry


def preset_contents(folder: Path) -> dict[str, bytes]:
    """What push uploads, computed independently: the config, the bases and the card generated from the config."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    return {CONFIG_NAME: (folder / CONFIG_NAME).read_bytes(), BASES_NAME: (folder / BASES_NAME).read_bytes(),
            "README.md": model_card(config).encode()}


def preset_files(folder: Path) -> list[dict]:
    """The registry's `files` for the preset in ``folder`` once pushed."""
    return [{"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in preset_contents(folder).items()]


def validated_entry(commit: str, folder: Path, **changes) -> dict:
    entry = {
        "model": TINY_MODEL_ID, "model_revision": TINY_MODEL_REVISION, "aliases": [ALIAS], "status": "validated",
        "preset": {"repo_id": PRESET_REPO, "revision": commit, "files": preset_files(folder)},
        "recipe": "presets/test--tiny-llama/", "metrics": METRICS,
        "provenance": {"measured_by": "pytest", "hardware": "cpu", "kvhub_version": "0.1.0", "date": "2026-11-29"},
    }
    return {**entry, **changes}


def publish_index(api: HfApi, entries: list[dict], repo_id: str = REGISTRY, raw: bytes | None = None) -> str:
    api.create_repo(repo_id, exist_ok=True)
    document = raw or json.dumps({"schema_version": "1.0", "entries": entries}).encode()
    return api.upload_file(path_or_fileobj=document, path_in_repo=INDEX_NAME, repo_id=repo_id).oid


def variant(folder: Path, tmp_path: Path, tokens: int) -> Path:
    """A copy of the preset whose config differs (calibration.tokens), so pushing it makes a new commit."""
    copy = tmp_path / f"variant-{tokens}"
    shutil.copytree(folder, copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    config["calibration"]["tokens"] = tokens
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    return copy


def corrupt(path: Path) -> None:
    """Flip the last byte of the file (or of the cache blob a snapshot link points to), keeping its size."""
    target = path.resolve()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


def hub_cache() -> Path:
    return Path(constants.HF_HUB_CACHE)


def go_offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for subprocesses
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub read the variable at import


def cache_state(cache: Path) -> dict[str, str]:
    """Every file and link of the Hub cache (lock files aside) with its content hash or link target."""
    return {str(p.relative_to(cache)): str(p.readlink()) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(cache.rglob("*")) if ".locks" not in p.parts and (p.is_file() or p.is_symlink())}


def assert_cache_consistent(cache: Path) -> None:
    """No partial downloads; every snapshot link resolves to a blob named by its own content hash."""
    assert not list(cache.rglob("*.incomplete"))
    links = [p for p in cache.glob("models--*/snapshots/*/*") if p.is_symlink()]
    assert links
    for link in links:
        data = link.resolve(strict=True).read_bytes()
        assert link.resolve().name in (hashlib.sha256(data).hexdigest(), git_blob_sha1(data))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_error(capsys, *args: str) -> str:
    """Run a failing command: exit 1 and exactly one `error: ... fix: ...` line, no traceback."""
    code, _, err = cli(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "fix:" in errors[0] and "Traceback" not in err, err
    return errors[0]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with this process's environment (HF_* variables from the fixtures included)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


# --- publish and download -----------------------------------------------------------------------------------

def test_push_then_pull_round_trip(local_hub, api, tiny_preset, tiny_llama, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(tiny_preset, stale)
    (stale / "README.md").write_text("an outdated card\n")
    info = push_preset(stale, PRESET_REPO, token=DEFAULT_TOKEN)
    assert api.list_repo_files(PRESET_REPO) == [".gitattributes", "README.md", BASES_NAME, CONFIG_NAME]

    d = download_preset(PRESET_REPO)
    assert (d.repo_id, d.commit, d.entry, d.registry_verified) == (PRESET_REPO, info.oid, None, False)
    assert d.folder == hub_cache() / "models--kvhub-test--tiny-llama-kvhub" / "snapshots" / info.oid
    for name in (CONFIG_NAME, BASES_NAME):
        assert (d.folder / name).read_bytes() == (tiny_preset / name).read_bytes()
    assert (d.folder / "README.md").read_text() == model_card(d.config)  # regenerated, not the stale one
    assert sorted((f.name, f.size) for f in d.files) == sorted((f["name"], f["size"]) for f in preset_files(tiny_preset))

    cache = KVPreset.from_pretrained(PRESET_REPO).build_cache(tiny_llama)
    with torch.no_grad():
        tiny_llama(input_ids=torch.randint(3, 128, (1, 40)), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 40


def test_model_name_resolves_through_the_registry(api, registry, tiny_preset, tiny_llama, tmp_path):
    api.create_repo(TINY_MODEL_ID)  # a repo named like the base model: the registry must win over it
    newer = push_preset(variant(tiny_preset, tmp_path, 512), PRESET_REPO, token=DEFAULT_TOKEN).oid
    pinned = registry["preset"]["revision"]
    for name in (TINY_MODEL_ID, ALIAS, "TINY-LLAMA"):
        d = download_preset(name)
        assert (d.repo_id, d.commit, d.entry.model, d.registry_verified) == (PRESET_REPO, pinned, TINY_MODEL_ID, True)
    assert d.registry.startswith(f"{REGISTRY}@")
    assert {f.name for f in d.files} == {CONFIG_NAME, BASES_NAME, "README.md"}
    assert d.metrics.compression_total == 3.1  # the registry's numbers for the pinned commit

    override = download_preset(ALIAS, newer)  # another preset commit: checked against its config only
    assert (override.commit, override.registry_verified) == (newer, False)
    assert override.config["calibration"]["tokens"] == 512

    cache = KVPreset.from_pretrained(ALIAS).build_cache(tiny_llama)  # what a new user types after `kvhub pull`
    with torch.no_grad():
        tiny_llama(input_ids=torch.randint(3, 128, (1, 24)), cache=cache, use_cache=True)
    assert cache.get_seq_length() == 24


def test_pinning_by_commit_tag_and_branch(api, published, tiny_preset, tmp_path):
    api.create_tag(PRESET_REPO, tag="v1", revision=published)
    main_commit = push_preset(variant(tiny_preset, tmp_path, 512), PRESET_REPO, token=DEFAULT_TOKEN).oid
    dev_commit = push_preset(variant(tiny_preset, tmp_path, 1024), PRESET_REPO, revision="dev", token=DEFAULT_TOKEN).oid
    tokens = {published: 256, main_commit: 512, dev_commit: 1024}
    for revision, commit in {"v1": published, published: published, None: main_commit, "main": main_commit,
                             "dev": dev_commit}.items():
        d = download_preset(PRESET_REPO, revision)
        assert d.commit == commit and d.config["calibration"]["tokens"] == tokens[commit], revision
    refs = hub_cache() / "models--kvhub-test--tiny-llama-kvhub" / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == {"v1": published, "main": main_commit, "dev": dev_commit}


def test_push_opens_a_pull_request(api, published, tiny_preset, tmp_path):
    info = push_preset(variant(tiny_preset, tmp_path, 512), PRESET_REPO, create_pr=True, token=DEFAULT_TOKEN)
    assert info.pr_revision == "refs/pr/1"
    assert api.model_info(PRESET_REPO).sha == published  # main is untouched until the PR is merged
    assert download_preset(PRESET_REPO, "refs/pr/1").commit == info.oid


def test_push_validates_before_uploading(local_hub, tiny_preset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_preset, broken)
    corrupt(broken / BASES_NAME)
    local_hub.requests.clear()
    with pytest.raises(PresetFileError, match="sha256"):
        push_preset(broken, PRESET_REPO, token=DEFAULT_TOKEN)
    with pytest.raises(PresetFileError, match="no such preset folder"):
        push_preset(tmp_path / "missing", PRESET_REPO, token=DEFAULT_TOKEN)
    assert local_hub.requests == []  # nothing was sent
    with pytest.raises(HubAuthError, match="write to"):
        push_preset(tiny_preset, PRESET_REPO, token=False)


# --- cache, offline, integrity, concurrency -----------------------------------------------------------------

def test_second_pull_is_served_from_the_cache_offline(local_hub, registry, monkeypatch):
    first = download_preset(ALIAS)
    local_hub.stop()
    go_offline(monkeypatch)
    again = download_preset(ALIAS)
    assert (again.folder, again.registry_verified) == (first.folder, True)
    assert again.registry.startswith(f"{REGISTRY}@")  # the cached registry, not the packaged copy

    result = run_python("from kvhub.cli import run; run()", "pull", ALIAS)  # HF_HUB_OFFLINE=1 as a user sets it
    assert result.returncode == 0, result.stderr
    assert f"{PRESET_REPO} @ {first.commit}" in result.stdout


def test_corrupted_cache_file_is_refused_and_nothing_else_is_touched(registry, capsys):
    d = download_preset(ALIAS)
    download_preset(PRESET_REPO)  # also records refs/main: the state below is that of a cache used both ways
    corrupt(d.folder / BASES_NAME)
    before = cache_state(hub_cache())
    with pytest.raises(HubChecksumError, match=f"{BASES_NAME}.*registry entry.*--force"):
        download_preset(ALIAS)
    with pytest.raises(HubChecksumError, match=f"{BASES_NAME}.*{CONFIG_NAME}.*--force"):
        download_preset(PRESET_REPO)  # not through the registry: checked against the config
    with pytest.raises(HubChecksumError):
        KVPreset.from_pretrained(ALIAS)
    assert BASES_NAME in cli_error(capsys, "pull", ALIAS)
    assert cache_state(hub_cache()) == before

    repaired = download_preset(ALIAS, force_download=True)
    assert repaired.registry_verified and cache_state(hub_cache()) != before


def test_registry_checksum_mismatch_is_refused(api, published, tiny_preset):
    entry = validated_entry(published, tiny_preset)
    entry["preset"]["files"][2]["sha256"] = "0" * 64  # README.md: intact on disk, but not what was validated
    publish_index(api, [entry])
    with pytest.raises(HubChecksumError, match="README.md.*registry entry"):
        download_preset(ALIAS)


def test_concurrent_pulls_in_threads_leave_a_consistent_cache(registry):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: download_preset(ALIAS), range(2)))
    assert results[0].folder == results[1].folder and all(r.registry_verified for r in results)
    assert_cache_consistent(hub_cache())


def test_concurrent_pulls_in_processes_leave_a_consistent_cache(registry):
    code = f"from kvhub.hub_presets import download_preset; print(download_preset({ALIAS!r}).commit)"
    workers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    assert {out.strip() for out, _ in outputs} == {registry["preset"]["revision"]}
    assert_cache_consistent(hub_cache())
    assert download_preset(ALIAS).registry_verified


# --- errors a user meets: each one typed, one line with its fix ---------------------------------------------

def test_unknown_name_suggests_close_ones(registry, capsys):
    with pytest.raises(UnknownModelError, match="did you mean 'tiny-llama'"):
        download_preset("tiny-lama")
    assert "did you mean" in cli_error(capsys, "pull", "tiny-lama")
    with pytest.raises(PresetFileError, match="no such preset folder"):
        download_preset("./no/such/folder")


def test_model_without_a_published_preset(registry, capsys):
    with pytest.raises(NoPresetError, match="status 'pending'"):
        download_preset("pending-model")
    assert "pending" in cli_error(capsys, "pull", "test/pending-model")


def test_revision_and_repo_not_found(published, capsys):
    with pytest.raises(HubRevisionNotFoundError, match="'nope'"):
        download_preset(PRESET_REPO, "nope")
    assert "nope" in cli_error(capsys, "pull", PRESET_REPO, "--revision", "nope")
    with pytest.raises(HubNotFoundError, match="no such repo"):
        download_preset("kvhub-test/missing", token=DEFAULT_TOKEN)


def test_private_repo_needs_a_token(local_hub, tiny_preset, capsys, monkeypatch):
    push_preset(tiny_preset, "kvhub-test/secret", private=True, token=DEFAULT_TOKEN)
    with pytest.raises(HubAuthError, match="hf auth login"):
        download_preset("kvhub-test/secret")
    assert "private" in cli_error(capsys, "pull", "kvhub-test/secret")
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    assert download_preset("kvhub-test/secret").repo_id == "kvhub-test/secret"


def test_offline_with_nothing_cached(published, monkeypatch, capsys):
    with pytest.raises(HubOfflineError, match="local_files_only"):
        download_preset(PRESET_REPO, local_files_only=True)
    go_offline(monkeypatch)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        download_preset(PRESET_REPO)
    assert "offline" in cli_error(capsys, "pull", PRESET_REPO, "--force")


@pytest.mark.parametrize("failure", ["stopped", "http 503", "dropped connection"])
def test_network_failure_says_retry(local_hub, published, capsys, caplog, failure):
    if failure == "stopped":
        local_hub.stop()
    else:
        local_hub.fail_next(100, status=503 if failure == "http 503" else None, path=f"/{PRESET_REPO}")
    with pytest.raises(HubNetworkError, match="retry"):
        download_preset(PRESET_REPO)
    assert "retry" in cli_error(capsys, "pull", PRESET_REPO)


def test_preset_for_another_model_revision_is_refused(api, published, tiny_preset, capsys):
    publish_index(api, [validated_entry(published, tiny_preset, model_revision="f" * 40)])
    with pytest.raises(HubModelMismatchError, match=f"revision {TINY_MODEL_REVISION[:12]}"):
        download_preset(ALIAS)
    assert "revision" in cli_error(capsys, "pull", ALIAS)
    publish_index(api, [validated_entry(published, tiny_preset, model="test/other-model")])
    with pytest.raises(HubModelMismatchError, match="is for test/tiny-llama"):
        download_preset("test/other-model")


# --- the registry index -------------------------------------------------------------------------------------

def test_packaged_index_lists_the_planned_models():
    root = Path(__file__).resolve().parents[1]
    assert (root / "registry" / INDEX_NAME).resolve() == (root / "kvhub" / "data" / INDEX_NAME).resolve()
    index = packaged_index()
    smol = index.find("smollm2")
    assert (smol.model, smol.repo_id) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "kvhub/SmolLM2-135M-Instruct-kvhub")
    assert index.find("Qwen/Qwen2.5-7B") is index.find("QWEN2.5-7B")
    assert index.find("Qwen/Qwen2.5-7B").claimed["compression"] == {"values": 2.67, "total": 1.45}
    # Only what kvhub measured is validated (the bundled model); every other model waits for a GPU run. Validated
    # is not published: no Hub commit holds the bundled preset yet, so none is pinned (the packaged copy serves it).
    assert smol.status == "validated" and smol.metrics is not None
    assert smol.revision is None and not smol.published and not smol.on_public_hub
    others = [e for e in index.entries if e is not smol]
    assert all(e.status == "pending" and e.revision is None and e.metrics is None for e in others)
    assert all(e.claimed["verified"] is False for e in index.entries if e.claimed)
    assert index.suggest("qwen2.5-7")[0] == "qwen2.5-7b"
    with pytest.raises(NoPresetError):
        index.find("qwen2.5-7b").pinned()


def test_registry_falls_back_to_the_packaged_copy_saying_why(local_hub, monkeypatch, caplog):
    reasons = []
    index = load_index()  # this hub has no registry repo
    reasons.append(index.fallback)
    assert index.source == PACKAGED_SOURCE and index.find("smollm2") is not None
    local_hub.stop()
    reasons.append(load_index().fallback)
    go_offline(monkeypatch)
    reasons.append(load_index().fallback)
    assert ["not found" in reasons[0], "unreachable" in reasons[1], "offline" in reasons[2]] == [True] * 3
    assert [r.message for r in caplog.records if r.name == "kvhub.registry"] == reasons
    with pytest.raises(HubOfflineError):
        load_index("main")  # a pinned revision never falls back: the packaged copy is not that revision


def test_registry_revision_pin_and_repo_override(api, monkeypatch):
    first = publish_index(api, [PENDING])
    api.create_tag(REGISTRY, tag="v1", revision=first)
    other = {**PENDING, "model": "test/other", "aliases": ["other"]}
    publish_index(api, [PENDING, other])
    assert len(load_index().entries) == 2
    assert len(load_index("v1").entries) == 1
    assert load_index(first).source == f"{REGISTRY}@{first[:12]}"
    monkeypatch.setenv(REGISTRY_REVISION_ENV, "v1")
    assert len(load_index().entries) == 1
    with pytest.raises(HubRevisionNotFoundError):
        load_index("nope")
    monkeypatch.delenv(REGISTRY_REVISION_ENV)
    publish_index(api, [other], repo_id="org/registry")
    monkeypatch.setenv(REGISTRY_REPO_ENV, "org/registry")
    assert load_index().source.startswith("org/registry@") and load_index().find("pending-model") is None


@pytest.mark.parametrize("document, message", [
    ({"schema_version": "1.0", "entries": [PENDING, {**PENDING, "model": "test/other"}]}, "'pending-model' names both"),
    ({"schema_version": "1.0", "entries": [{**PENDING, "status": "validated"}]}, "entries.0"),
    ({"schema_version": "1.0", "entries": [{**PENDING, "aliases": ["Upper Case"]}]}, "entries.0.aliases.0"),
    ({"schema_version": "2.0", "entries": []}, "schema_version"),
])
def test_invalid_index_is_refused(document, message):
    with pytest.raises(RegistryFormatError, match=message):
        RegistryIndex.parse(document, "test")


def test_malformed_published_index_is_an_error_not_a_fallback(api):
    publish_index(api, [], raw=b"{not json")
    with pytest.raises(RegistryFormatError, match="malformed JSON"):
        load_index()


# --- the command line ---------------------------------------------------------------------------------------

def test_cli_push_pull_list(api, tiny_preset, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", DEFAULT_TOKEN)
    code, out, _ = cli(capsys, "push", str(tiny_preset), "--repo-id", PRESET_REPO)
    commit = api.model_info(PRESET_REPO).sha
    assert code == 0 and f"{PRESET_REPO} @ {commit}" in out
    publish_index(api, [validated_entry(commit, tiny_preset), PENDING])

    code, out, _ = cli(capsys, "pull", ALIAS)
    assert code == 0
    for expected in (f"{PRESET_REPO} @ {commit}", BASES_NAME, CONFIG_NAME, "validated by the registry",
                     "3.10x / 2.50x / 4.00x", "+0.80%", "1.00 (1.00)", f"KVPreset.from_pretrained('{ALIAS}')"):
        assert expected in out, expected

    code, out, _ = cli(capsys, "list")
    assert code == 0 and f"registry: {REGISTRY}@" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("test/")}
    assert rows[TINY_MODEL_ID] == [TINY_MODEL_ID, PRESET_REPO, "3.10x", "+0.80%", "1.00", "/", "1.00", "validated", "yes"]
    assert rows["test/pending-model"] == ["test/pending-model", "-", "V", "2.50x*", "+1.50%*", "-", "pending", "-"]

    code, out, _ = cli(capsys, "list", "--json")
    document = json.loads(out)
    assert code == 0 and document["fallback"] is None and document["entries"][0]["model"] == TINY_MODEL_ID


# --- validated vs published, the packaged fallback, an unreachable Hub (issue 11) ----------------------------

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PACKAGED_SMOL = Path(__file__).resolve().parents[1] / "presets" / "HuggingFaceTB--SmolLM2-135M-Instruct"


def closed_port_endpoint() -> str:
    """An endpoint on 127.0.0.1 where nothing listens: every connection is refused, as with the Hub unreachable."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def run_cli_timed(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    import os
    import time

    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "kvhub.cli", *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env}, cwd=Path(env["HF_HOME"]))
    return result, time.monotonic() - start


def test_validated_but_unpublished_falls_back_to_the_packaged_preset(api, registry, caplog, tmp_path, monkeypatch):
    """The registry on the Hub knows SmolLM2 as validated but pins no commit: pull and from_pretrained use the copy
    packaged with kvhub, checked against the packaged index, with one line saying so; from any folder."""
    packaged = packaged_index().find(SMOL)
    entry = json.loads(json.dumps(packaged_index().document["entries"][0]))
    assert entry["model"] == SMOL and entry["preset"]["revision"] is None
    publish_index(api, [entry])
    monkeypatch.chdir(tmp_path)  # the README's example must not depend on the working folder
    d = download_preset("smollm2")
    assert d.packaged and d.repo_id is None and d.registry_verified and d.registry == PACKAGED_SOURCE
    assert {f.name: f.sha256 for f in d.files} == {f.name: f.sha256 for f in packaged.files}
    assert (d.folder / CONFIG_NAME).read_bytes() == (PACKAGED_SMOL / CONFIG_NAME).read_bytes()
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 1 and "no published copy" in notices[0] and "packaged with kvhub" in notices[0]
    assert KVPreset.from_pretrained(SMOL).base_model["id"] == SMOL
    # Asked for a revision, kvhub never substitutes the packaged copy: that is not the revision asked for.
    with pytest.raises(NoPresetError, match="not published"):
        download_preset("smollm2", "main")


def test_packaged_fallback_refuses_a_changed_packaged_file(api, monkeypatch, tmp_path):
    """The packaged copy is checked against the packaged index: a preset folder edited in place is refused."""
    import kvhub.hub_presets as hub_presets

    copy = tmp_path / "packaged"
    shutil.copytree(PACKAGED_SMOL, copy)
    corrupt(copy / BASES_NAME)
    monkeypatch.setattr(hub_presets, "packaged_preset_folder", lambda model_id: copy)
    publish_index(api, [packaged_index().document["entries"][0]])
    with pytest.raises(HubChecksumError, match="git checkout -- presets/packaged`; else reinstall kvhub"):
        download_preset("smollm2")


def test_unreachable_hub_costs_seconds_and_one_line(tmp_path):
    """`kvhub list` and `kvhub pull smollm2` with the endpoint on a closed port: one short attempt, one line saying
    what happened and what kvhub used instead, an answer in under 5 s (the client alone retries for ~25 s)."""
    env = {"HF_ENDPOINT": closed_port_endpoint(), "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result, seconds = run_cli_timed("list", env=env)
    assert result.returncode == 0, result.stderr
    assert seconds < 5, f"kvhub list took {seconds:.1f} s with the Hub unreachable"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and PACKAGED_SOURCE in lines[0], result.stderr
    assert SMOL in result.stdout

    smol_row = next(line.split() for line in result.stdout.splitlines() if line.startswith(SMOL))
    assert smol_row[-2:] == ["validated", "no"]  # measured, not published: the packaged copy serves it

    result, seconds = run_cli_timed("pull", "smollm2", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and "packaged with kvhub" in lines[0], result.stderr
    assert "packaged with kvhub" in result.stdout and "validated by the registry" in result.stdout
    assert seconds < 15, f"kvhub pull took {seconds:.1f} s with the Hub unreachable"

    # Offline with an empty cache, as HF_HUB_OFFLINE=1 users run it: the same packaged preset, one line.
    result, _ = run_cli_timed("pull", "smollm2", env={**env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and "packaged with kvhub" in result.stdout, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "offline" in result.stderr


def test_unreachable_hub_uses_the_cached_registry_at_once(local_hub, registry, caplog, monkeypatch):
    first = download_preset(ALIAS)
    local_hub.stop()
    import kvhub.hub as transport

    monkeypatch.setattr(transport, "_REACHABLE", set())  # a new process: nothing known about the endpoint
    caplog.clear()
    again = download_preset(ALIAS)
    assert again.folder == first.folder and again.registry_verified
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and all("unreachable" in w and "cached copy" in w for w in warnings)
    assert not any("Retrying" in r.getMessage() for r in caplog.records)


# --- hostile names and bodies (issue 12 items 3 and 5) --------------------------------------------------------

@pytest.mark.parametrize("repo_id", ["a--b/c", "a..b/c", "org/name.", "org/" + "n" * 97])
def test_invalid_repo_ids_are_typed_errors(local_hub, repo_id, capsys, tiny_preset):
    from kvhub.errors import HubRepoIdError

    with pytest.raises(HubRepoIdError, match="not a valid Hub repo id.*fix:"):
        download_preset(repo_id)
    for bad in (repo_id, "org/a/b", "-org/name"):
        with pytest.raises(HubRepoIdError):
            push_preset(tiny_preset, bad, token=DEFAULT_TOKEN)
    assert "not a valid Hub repo id" in cli_error(capsys, "pull", repo_id)
    assert "not a valid Hub repo id" in cli_error(capsys, "push", str(tiny_preset), "--repo-id", repo_id)
    assert not [r for r in local_hub.requests if repo_id in r.path]  # refused before any request for it


def test_a_body_cut_short_is_a_network_error_with_a_fix(local_hub, published, capsys):
    local_hub.truncate_next(1, path=BASES_NAME)
    with pytest.raises(HubNetworkError, match="cut short.*fix: retry"):
        download_preset(PRESET_REPO)
    assert download_preset(PRESET_REPO).commit == published  # the retry the message suggests works
    local_hub.truncate_next(1, path=BASES_NAME)
    assert "cut short" in cli_error(capsys, "pull", PRESET_REPO, "--force")


def test_a_file_outside_the_repo_is_never_fetched(local_hub, published):
    """A repo listing ``../x.safetensors``: a pull fetches only the files the preset's config names, so the name
    never reaches the client (a config naming it is refused by the schema)."""
    local_hub.commit_unchecked(PRESET_REPO, {"../x.safetensors": b"outside"})
    assert download_preset(PRESET_REPO).folder.is_dir()
    assert not [r for r in local_hub.requests if "x.safetensors" in r.path]
    assert not list(Path(hub_cache()).parent.rglob("x.safetensors"))


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../../etc/hostname", "sub/bases.safetensors",
                                  ".hidden.safetensors", "notes.txt"])
def test_registry_file_names_are_plain_preset_files(published, tiny_preset, name):
    entry = validated_entry(published, tiny_preset)
    entry["preset"]["files"].append({"name": name, "sha256": "0" * 64, "size": 1})
    with pytest.raises(RegistryFormatError, match="files"):
        RegistryIndex.parse({"schema_version": "1.0", "entries": [entry]}, "test")


def test_a_link_out_of_the_snapshot_is_refused_without_leaking_the_target(registry, tmp_path):
    """Even past the schema (an older index, a tampered cache), no path outside the snapshot is read: a snapshot
    file that links outside the repo's cache is refused, and the error quotes neither its hash nor its size."""
    from kvhub.errors import HubUnsafePathError

    d = download_preset(ALIAS)
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"a private file outside the cache\n" * 1000 + b"#" * 3210)  # 36,210 bytes: a size no path holds
    card = d.folder / "README.md"
    card.unlink()
    card.symlink_to(secret)
    with pytest.raises(HubUnsafePathError) as caught:
        download_preset(ALIAS)
    message = str(caught.value)
    assert "links outside" in message
    assert hashlib.sha256(secret.read_bytes()).hexdigest()[:12] not in message
    assert str(secret.stat().st_size) not in message and "36210" not in message


def test_an_oversize_index_is_refused_before_it_is_stored_and_the_packaged_copy_serves(api):
    from kvhub.registry import MAX_INDEX_BYTES

    publish_index(api, [], raw=b'{"schema_version": "1.0", "entries": []' + b" " * MAX_INDEX_BYTES + b"}")
    index = load_index()
    assert index.source == PACKAGED_SOURCE and "more than the" in index.fallback
    assert not [p for p in hub_cache().rglob("*") if p.is_file() and p.stat().st_size > MAX_INDEX_BYTES]
    publish_index(api, [], raw=b"[" * 100_000 + b"]" * 100_000)  # within the size: a malformed index is an error
    with pytest.raises(RegistryFormatError, match="nesting deeper than"):
        load_index()


def test_index_schema_bounds_counts_and_lengths():
    many = [{**PENDING, "model": f"test/m{i}", "aliases": []} for i in range(10_001)]
    with pytest.raises(RegistryFormatError, match="entries"):
        RegistryIndex.parse({"schema_version": "1.0", "entries": many}, "test")
    with pytest.raises(RegistryFormatError, match="notes"):
        RegistryIndex.parse({"schema_version": "1.0", "entries": [{**PENDING, "notes": "x" * 5000}]}, "test")


# --- KVPreset.push_to_hub -------------------------------------------------------------------------------------

def test_push_to_hub_from_the_python_api(local_hub, api, tiny_preset):
    preset = KVPreset.load_folder(tiny_preset)
    info = preset.push_to_hub(PRESET_REPO, token=DEFAULT_TOKEN, commit_message="from python")
    assert preset.path == tiny_preset  # saving into a temporary folder does not move the object
    assert api.model_info(PRESET_REPO).sha == info.oid
    assert api.list_repo_commits(PRESET_REPO)[0].title == "from python"
    pulled = KVPreset.from_pretrained(PRESET_REPO)
    assert pulled.config["codec"] == preset.config["codec"] and pulled.base_model == preset.base_model
    original, received = preset.bases.to_tensors(), pulled.bases.to_tensors()
    assert original.keys() == received.keys() and all(torch.equal(original[k], received[k]) for k in original)
    edited = KVPreset.from_pretrained(PRESET_REPO)
    edited.config["license"] = "mit"  # a real change: the Hub client skips a commit that changes nothing
    pr = edited.push_to_hub(PRESET_REPO, token=DEFAULT_TOKEN, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"

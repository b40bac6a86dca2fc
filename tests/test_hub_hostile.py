"""Downloads against a hostile Hub on loopback (issue #22 item 3): endless, slow and oversized bodies, and repos
holding more than a preset. Every download has a byte limit and a deadline; on failure nothing partial stays in the
cache and the packaged fallback still serves; a pull fetches exactly the preset's files."""

from __future__ import annotations

import logging
import time

import pytest

from kvhub import hub
from kvhub.errors import HubNetworkError, HubOfflineError, HubTooLargeError, KVHubError
from kvhub.hub_presets import download_preset
from kvhub.preset import BASES_NAME
from kvhub.registry import MAX_INDEX_BYTES, PACKAGED_SOURCE, load_index
from tests.test_hub_client import (  # noqa: F401  (fixtures)
    ALIAS,
    PRESET_REPO,
    api,
    go_offline,
    hub_cache,
    no_backoff,
    publish_index,
    published,
    registry,
)


def _biggest_cached_file() -> int:
    return max((p.stat().st_size for p in hub_cache().rglob("*") if p.is_file()), default=0)


def _nothing_partial() -> bool:
    return not list(hub_cache().rglob("*.incomplete"))


def test_an_endless_index_falls_back_to_the_packaged_copy_and_keeps_nothing(api, local_hub):
    publish_index(api, [])
    local_hub.hostile_next("endless", path="index.json")
    start = time.monotonic()
    index = load_index()
    assert time.monotonic() - start < 10
    assert index.source == PACKAGED_SOURCE and "more than the" in index.fallback
    assert _nothing_partial() and _biggest_cached_file() <= MAX_INDEX_BYTES


def test_an_endless_bases_file_stops_at_its_pinned_size(registry, local_hub):
    pinned = next(f["size"] for f in registry["preset"]["files"] if f["name"] == BASES_NAME)
    local_hub.hostile_next("endless", path=BASES_NAME)
    with pytest.raises(HubTooLargeError, match=f"more than the {pinned} bytes"):
        download_preset(ALIAS)
    assert _nothing_partial() and _biggest_cached_file() <= max(pinned, 1 << 20)
    assert download_preset(ALIAS).registry_verified  # the next pull, from an honest server, works


def test_an_oversized_file_is_refused_from_its_announced_size(registry, local_hub):
    local_hub.hostile_next("oversized", path=BASES_NAME)
    with pytest.raises(HubTooLargeError, match="announces"):
        download_preset(ALIAS)
    assert not [r for r in local_hub.requests if r.method == "GET" and BASES_NAME in r.path]
    assert _nothing_partial()


def test_a_slow_server_meets_the_deadline(registry, local_hub, monkeypatch):
    monkeypatch.setattr(hub, "DEADLINE_S", 1.0)  # the tiny bases may then take 1 s: at 2 bytes/s they cannot
    local_hub.hostile_next("slow", path=BASES_NAME)
    start = time.monotonic()
    with pytest.raises(HubNetworkError, match="took more than"):
        download_preset(ALIAS)
    assert time.monotonic() - start < 6
    assert _nothing_partial()


def test_a_pull_fetches_exactly_the_files_the_config_names(local_hub, published):
    extra = {f"extra-{i}.safetensors": b"x" for i in range(1500)} | {"big.safetensors": bytes(20 << 20)}
    local_hub.commit_unchecked(PRESET_REPO, extra)
    folder = download_preset(PRESET_REPO).folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(["kvhub_preset.json", "README.md", BASES_NAME])
    fetched = {r.path.rsplit("/", 1)[-1] for r in local_hub.requests if f"/{PRESET_REPO}/resolve/" in r.path}
    assert fetched == {"kvhub_preset.json", "README.md", BASES_NAME}
    assert _biggest_cached_file() < 1 << 20


def test_the_unreachable_line_is_said_once_per_process(local_hub, caplog):
    local_hub.stop()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert load_index().source == PACKAGED_SOURCE
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_pull_force_fails_alike_offline_and_unreachable(local_hub, monkeypatch, how):
    """--force means "download again": when that cannot be done it is an error, offline or not, never the
    packaged copy in its place (which is what a plain pull falls back to)."""
    if how == "offline":
        go_offline(monkeypatch)
    else:
        local_hub.stop()
    assert download_preset("smollm2").packaged
    with pytest.raises(KVHubError, match="fix:") as caught:
        download_preset("smollm2", force_download=True)
    if how == "offline":
        assert isinstance(caught.value, HubOfflineError)

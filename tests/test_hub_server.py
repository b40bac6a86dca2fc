"""The real `huggingface_hub` client, over real HTTP, against the LocalHub test server."""

import hashlib
import types
from pathlib import Path

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils import _http, httpx

from tests.hub_server import DEFAULT_TOKEN, DEFAULT_USER, LocalHub, git_blob_sha1, isolate_hf_env, running_hub

REPO = "org/presets"
WEIGHTS = b"\x00\x01" * 64


@pytest.fixture(autouse=True)
def hf_cache(monkeypatch, tmp_path) -> Path:
    return isolate_hf_env(monkeypatch, tmp_path)


@pytest.fixture
def hub(tmp_path):
    with running_hub(tmp_path) as hub:
        yield hub


@pytest.fixture
def api(hub) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture
def published(api, tmp_path) -> types.SimpleNamespace:
    """REPO with two upload_folder commits: `first` (config v1, weights) and `second` (config v2, notes)."""
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# presets\n")
    (src / "config.json").write_text('{"v": 1}')
    (src / "weights" / "kv.safetensors").write_bytes(WEIGHTS)
    api.create_repo(REPO)
    first = api.upload_folder(repo_id=REPO, folder_path=src, commit_message="first")
    (src / "config.json").write_text('{"v": 2}')
    (src / "notes").mkdir()
    (src / "notes" / "a.txt").write_text("note")
    second = api.upload_folder(repo_id=REPO, folder_path=src, commit_message="second")
    return types.SimpleNamespace(src=src, first=first, second=second)


def _download(hub: LocalHub, filename: str, cache_dir: Path | None = None, **kwargs) -> Path:
    return Path(hf_hub_download(REPO, filename, endpoint=hub.endpoint, cache_dir=cache_dir, **kwargs))


def test_create_repo_exist_ok_and_conflict(api, hub):
    url = api.create_repo("org/new")
    assert (url.repo_id, url.endpoint) == ("org/new", hub.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo("org/new")
    assert err.value.response.status_code == 409
    assert api.create_repo("org/new", exist_ok=True) == url
    assert api.list_repo_files("org/new") == [".gitattributes"]  # the Hub's initial commit
    assert api.create_repo("mine").repo_id == f"{DEFAULT_USER}/mine"  # no namespace: the token's user
    assert api.whoami()["name"] == DEFAULT_USER


def test_writes_and_bad_tokens_are_rejected(hub):
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token=False).create_repo("org/anon")
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_wrong").create_repo("org/anon")
    assert err.value.response.status_code == 401
    assert not isinstance(err.value, RepositoryNotFoundError)


def test_upload_folder_makes_commits_with_history(api, published):
    first, second = published.first, published.second
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["second", "first", "initial commit"]
    assert [c.commit_id for c in commits[:2]] == [second.oid, first.oid]
    assert commits[0].authors == [DEFAULT_USER]
    assert api.list_repo_files(REPO) == [".gitattributes", "README.md", "config.json", "notes/a.txt",
                                          "weights/kv.safetensors"]
    assert "notes/a.txt" not in api.list_repo_files(REPO, revision=first.oid)
    assert api.model_info(REPO).sha == second.oid
    assert api.model_info(REPO, revision=first.oid).sha == first.oid
    # Unchanged files are skipped (preupload returns their oid): no empty commit.
    assert api.upload_folder(repo_id=REPO, folder_path=published.src, commit_message="noop").oid == second.oid
    assert len(api.list_repo_commits(REPO)) == 3


def test_branches_tags_and_refs(api, published):
    first, second = published.first, published.second
    api.create_branch(REPO, branch="dev", revision=first.oid)
    api.create_tag(REPO, tag="v1", revision="dev")
    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "dev": first.oid}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first.oid)]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(REPO, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(REPO, branch="dev", exist_ok=True)

    dev = api.create_commit(REPO, [CommitOperationAdd("dev.txt", b"dev")], commit_message="dev", revision="dev")
    assert api.model_info(REPO, revision="dev").sha == dev.oid
    assert api.model_info(REPO, revision="v1").sha == first.oid  # tags do not move
    assert api.model_info(REPO).sha == second.oid

    api.delete_tag(REPO, tag="v1")
    api.delete_branch(REPO, branch="dev")
    refs = api.list_repo_refs(REPO)
    assert ([b.name for b in refs.branches], refs.tags) == (["main"], [])


@pytest.mark.parametrize("revision", ["main", "v1", "first-sha"])
def test_snapshot_download_by_branch_tag_and_sha(api, hub, published, tmp_path, revision):
    api.create_tag(REPO, tag="v1", revision=published.first.oid)
    revision = published.first.oid if revision == "first-sha" else revision
    expected = published.second.oid if revision == "main" else published.first.oid
    hub.requests.clear()
    path = Path(snapshot_download(REPO, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path / "cache"))
    assert path.name == expected
    assert (path / "config.json").read_text() == ('{"v": 2}' if revision == "main" else '{"v": 1}')
    assert (path / "weights" / "kv.safetensors").read_bytes() == WEIGHTS
    asked_revision = any("/revision/" in r.path for r in hub.requests)
    assert asked_revision == (revision in ("main", "v1"))  # a commit sha needs no resolution


def test_hf_hub_download_metadata_and_cache_layout(hub, published, hf_cache):
    config = _download(hub, "config.json")  # default cache: isolate_hf_env points it at tmp
    assert config.is_relative_to(hf_cache) and config.read_text() == '{"v": 2}'
    storage = hf_cache / "models--org--presets"
    assert (storage / "refs" / "main").read_text() == published.second.oid
    assert config.resolve().name == git_blob_sha1(b'{"v": 2}')  # regular file: ETag is the git blob sha1
    weights = _download(hub, "weights/kv.safetensors")
    assert weights.resolve().name == hashlib.sha256(WEIGHTS).hexdigest()  # LFS file: X-Linked-Etag, the sha256

    meta = get_hf_file_metadata(hf_hub_url(REPO, "weights/kv.safetensors", endpoint=hub.endpoint), token=False)
    assert (meta.commit_hash, meta.size, meta.etag) == (
        published.second.oid, len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())


def test_tree_and_paths_info(api, published):
    top = {entry.path: entry for entry in api.list_repo_tree(REPO)}
    assert sorted(top) == [".gitattributes", "README.md", "config.json", "notes", "weights"]
    assert isinstance(top["weights"], RepoFolder) and isinstance(top["config.json"], RepoFile)
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="weights")] == ["weights/kv.safetensors"]
    deep = {entry.path: entry for entry in api.list_repo_tree(REPO, recursive=True)}
    lfs = deep["weights/kv.safetensors"].lfs
    assert (lfs.sha256, lfs.size) == (hashlib.sha256(WEIGHTS).hexdigest(), len(WEIGHTS))
    assert deep["config.json"].lfs is None and deep["config.json"].blob_id == git_blob_sha1(b'{"v": 2}')
    infos = api.get_paths_info(REPO, ["config.json", "weights", "missing.txt"], revision=published.first.oid)
    assert [(type(i), i.path) for i in infos] == [(RepoFile, "config.json"), (RepoFolder, "weights")]
    assert infos[0].blob_id == git_blob_sha1(b'{"v": 1}')


def test_client_maps_errors(api, hub, published, tmp_path):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        _download(hub, "missing.txt")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.txt", repo_id=REPO)


def test_private_repo_needs_a_token(api, hub, tmp_path):
    api.create_repo("org/secret", private=True)
    api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="org/secret")
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError) as err:
        anonymous.model_info("org/secret")
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as err:
        hf_hub_download("org/secret", "s.txt", endpoint=hub.endpoint, token=False, cache_dir=tmp_path / "c")
    assert err.value.response.status_code == 401
    assert api.model_info("org/secret").private is True
    path = hf_hub_download("org/secret", "s.txt", endpoint=hub.endpoint, token=DEFAULT_TOKEN)
    assert Path(path).read_bytes() == b"s"


def test_fail_next_injects_http_errors(api, hub, published):
    hub.fail_next(1, status=503)
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO)
    assert err.value.response.status_code == 503
    assert api.model_info(REPO).sha == published.second.oid
    assert [r.status for r in hub.requests[-2:]] == [503, 200]


def test_fail_next_filters_and_client_retries(api, hub, published, monkeypatch):
    sleeps = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=sleeps.append))  # the client's backoff
    hub.fail_next(2, status=503, path="/tree/")
    assert "config.json" in api.list_repo_files(REPO)
    assert sleeps == [1, 2]
    assert [r.status for r in hub.requests if "/tree/" in r.path] == [503, 503, 200]


def test_fail_next_can_drop_the_connection(api, hub, published):
    hub.fail_next(1, status=None)
    with pytest.raises(httpx.TransportError):
        api.model_info(REPO)
    assert hub.requests[-1].status is None


def test_stopped_hub_is_unreachable_then_restarts_with_its_state(api, hub, published, tmp_path):
    config = _download(hub, "config.json")
    endpoint = hub.endpoint
    hub.stop()
    with pytest.raises(httpx.ConnectError):
        api.model_info(REPO)
    assert _download(hub, "config.json") == config  # the client falls back to its cache
    hub.start()
    assert hub.endpoint == endpoint and api.model_info(REPO).sha == published.second.oid
    with LocalHub(tmp_path / "hub") as other:  # a new server over the same storage
        assert HfApi(endpoint=other.endpoint).model_info(REPO).sha == published.second.oid


def test_pull_requests_and_parent_commit(api, hub, published):
    pr = api.create_commit(REPO, [CommitOperationAdd("pr.txt", b"pr")], commit_message="pr", create_pr=True)
    assert (pr.pr_revision, pr.pr_num) == ("refs/pr/1", 1)
    assert "pr.txt" in api.list_repo_files(REPO, revision="refs/pr/1")
    assert "pr.txt" not in api.list_repo_files(REPO)
    assert [p.ref for p in api.list_repo_refs(REPO, include_pull_requests=True).pull_requests] == ["refs/pr/1"]
    assert _download(hub, "pr.txt", revision="refs/pr/1").read_bytes() == b"pr"

    add = [CommitOperationAdd("late.txt", b"late")]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(REPO, add, commit_message="stale", parent_commit=published.first.oid)
    assert err.value.response.status_code == 412
    api.create_commit(REPO, add, commit_message="fresh", parent_commit=published.second.oid)


def test_copy_and_folder_delete(api, published):
    api.create_commit(REPO, [
        CommitOperationCopy("weights/kv.safetensors", "weights/copy.safetensors"),  # sent as an `lfsFile` line
        CommitOperationDelete("notes/"),
    ], commit_message="copy")
    files = api.list_repo_files(REPO)
    assert "weights/copy.safetensors" in files and "notes/a.txt" not in files

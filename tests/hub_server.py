"""A local Hugging Face Hub for tests: the part of the Hub HTTP API that `huggingface_hub` 2.x calls.

Why it exists: no open-source server implements the Hub's upload API, and the tests must drive the real
`huggingface_hub` client over real HTTP. The server is stdlib-only and binds 127.0.0.1 only.

Scope and deliberate simplifications:
- Model repos only, ids of the form `namespace/name`.
- Every file is answered `"regular"` at preupload, so the client never needs Xet or the LFS batch API.
  Files matching a `filter=lfs` pattern of the commit's `.gitattributes` are nevertheless *described* as LFS
  files, as the real Hub does: tree entries carry `lfs`, and `/resolve` sends `X-Linked-Etag` (the sha256) and
  `X-Linked-Size`, so client caches name those blobs by sha256 exactly as against huggingface.co.
- `create_pr=True` opens `refs/pr/N` on top of the target branch (or of `parentCommit`); a commit to
  `refs/pr/N` extends it. There are no discussions and no merging.
- `parentCommit` on a branch must equal the branch head, else 412 (the Hub does not rebase either).
- Not implemented: Range requests (the full body is sent; the client copes with a 200), pagination, gated
  repos, repo settings or deletion, model-card parsing (`cardData`), LFS/Xet upload routes.

State lives under the storage directory (`blobs/<git sha1>` and `repos/<ns>/<name>.json`), so a hub restarted
over the same directory, or `stop()` then `start()` (same port), serves the same repos.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import BinaryIO
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_TOKEN = "hf_localhub_write_token"
DEFAULT_USER = "localuser"

# A subset of the `.gitattributes` the Hub puts in the initial commit of every new model repo.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.bin", "*.gguf", "*.h5", "*.npy", "*.npz", "*.onnx", "*.pt", "*.pth", "*.safetensors", "*.zip")
)

# A hostile body (LocalHub.hostile_next) stops after this many bytes or seconds, or when the client goes: the client
# must stop far earlier, and a test that fails must not fill the disk or hang.
HOSTILE_MAX_BYTES = 64 << 20
HOSTILE_MAX_S = 20.0
HOSTILE_KINDS = ("endless", "slow", "oversized")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_REF_NAME = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


class HubError(Exception):
    """An error answered to the client: status, `X-Error-Code` (what the client maps to its exceptions)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers)


def _revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub (and the client's cache) use as the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file: what git stores, and hashes, in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    """The Hub's date format, the only one `huggingface_hub.utils.parse_datetime` accepts."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class BlobStore:
    """File contents addressed by git blob sha1; sha256 is computed on demand (for LFS descriptions)."""

    def __init__(self, root: Path):
        self._root = root
        self._root.mkdir(parents=True, exist_ok=True)
        self._sha256: dict[str, str] = {}

    def put(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self._root / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def get(self, oid: str) -> bytes:
        return (self._root / oid).read_bytes()

    def size(self, oid: str) -> int:
        return (self._root / oid).stat().st_size

    def sha256(self, oid: str) -> str:
        if oid not in self._sha256:
            self._sha256[oid] = hashlib.sha256(self.get(oid)).hexdigest()
        return self._sha256[oid]

    def find_sha256(self, sha256: str) -> str | None:
        """The sha1 of the blob with this sha256: `lfsFile` commit lines (file copies) name blobs by sha256."""
        return next((path.name for path in self._root.iterdir() if self.sha256(path.name) == sha256), None)


@dataclass
class Repo:
    """One model repo: commits ({oid: {parent, tree, title, message, author, date}}) and refs ({ref: oid})."""

    private: bool
    created_at: str
    commits: dict[str, dict] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, rev: str) -> str:
        """Commit oid of a full commit sha, a full ref (`refs/pr/1`), a branch or a tag, in that order."""
        if rev in self.commits:
            return rev
        for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}"):
            if ref.startswith("refs/") and ref in self.refs:
                return self.refs[ref]
        raise _revision_not_found(rev)

    def branch_ref(self, rev: str) -> str:
        """The ref a commit to `rev` moves: a branch or a pull request; tags and commit shas are read-only."""
        for ref in (f"refs/heads/{rev}", rev):
            if ref in self.refs and ref.startswith(("refs/heads/", "refs/pr/")):
                return ref
        self.resolve(rev)  # raises RevisionNotFound for unknown revisions
        raise HubError(400, f"Cannot commit to '{rev}': not a branch")

    def add_commit(self, parent: str | None, tree: dict[str, str], title: str, message: str, author: str) -> str:
        """Store a commit; its oid hashes parent, tree and message, so identical commits share an oid."""
        payload = json.dumps([parent, sorted(tree.items()), title, message]).encode()
        oid = hashlib.sha1(payload).hexdigest()
        self.commits[oid] = {
            "parent": parent, "tree": tree, "title": title, "message": message, "author": author, "date": _now(),
        }
        return oid

    def tree(self, oid: str) -> dict[str, str]:
        return self.commits[oid]["tree"]

    def open_pr(self, oid: str) -> int:
        number = 1 + sum(ref.startswith("refs/pr/") for ref in self.refs)
        self.refs[f"refs/pr/{number}"] = oid
        return number


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[-1].lower() in ("1", "true")

    def json(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except json.JSONDecodeError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data


@dataclass(frozen=True)
class Response:
    """An answer; ``stream`` (a hostile body) writes the body itself, with no Content-Length unless in ``headers``."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: Callable[[BinaryIO], None] | None = None


def _json(data: object, status: int = 200) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json"})


@dataclass(frozen=True)
class RequestRecord:
    """One served request; `status` is None when a fault dropped the connection."""

    method: str
    path: str
    status: int | None


@dataclass
class _Fault:
    remaining: int
    status: int | None
    method: str | None
    path: str | None
    kind: str | None = None

    def matches(self, req: Request) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == req.method)
            and (self.path is None or self.path in req.path)
        )


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_API = f"/api/models/{_REPO}"
_ROUTES: list[tuple[tuple[str, ...], re.Pattern, str]] = [
    (methods, re.compile(pattern), handler)
    for methods, pattern, handler in [
        (("POST",), r"/api/repos/create", "_create_repo"),
        (("POST",), r"/api/validate-yaml", "_validate_yaml"),
        (("GET",), r"/api/whoami-v2", "_whoami"),
        (("GET",), _API, "_model_info"),
        (("GET",), _API + r"/revision/(?P<rev>[^/]+)", "_model_info"),
        (("GET",), _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "_tree"),
        (("POST",), _API + r"/paths-info/(?P<rev>[^/]+)", "_paths_info"),
        (("GET",), _API + r"/refs", "_refs"),
        (("GET",), _API + r"/commits/(?P<rev>[^/]+)", "_commits"),
        (("POST",), _API + r"/preupload/(?P<rev>[^/]+)", "_preupload"),
        (("POST",), _API + r"/commit/(?P<rev>[^/]+)", "_commit"),
        (("POST",), _API + r"/branch/(?P<branch>[^/]+)", "_create_branch"),
        (("DELETE",), _API + r"/branch/(?P<branch>[^/]+)", "_delete_branch"),
        (("POST",), _API + r"/tag/(?P<rev>[^/]+)", "_create_tag"),
        (("DELETE",), _API + r"/tag/(?P<tag>[^/]+)", "_delete_tag"),
        (("GET", "HEAD"), f"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
    ]
]


class LocalHub:
    """A Hub server on 127.0.0.1 for tests; see the module docstring for what it implements.

    `tokens` maps each valid token to its user name (an iterable of tokens maps them all to `DEFAULT_USER`).
    Write routes need a valid token; private repos answer 401 `RepoNotFound` without one, like the Hub.
    Any valid token may read and write every repo: there are no per-repo permissions.
    """

    def __init__(self, storage_dir: str | Path, tokens: Mapping[str, str] | Iterable[str] = (DEFAULT_TOKEN,)):
        self._root = Path(storage_dir)
        self._blobs = BlobStore(self._root / "blobs")
        self._tokens = dict(tokens) if isinstance(tokens, Mapping) else dict.fromkeys(tokens, DEFAULT_USER)
        self._repos = self._load_repos()
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._truncations: list[_Fault] = []
        self._hostile: list[_Fault] = []
        self._port = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RequestRecord] = []

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Serve in a daemon thread; after a `stop()`, serve again on the same port (same endpoint)."""
        self._server = _Server(("127.0.0.1", self._port), _Handler, hub=self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: clients then get connection errors, as when the Hub is unreachable."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if not self._port:
            raise RuntimeError("LocalHub is not started")
        return f"http://127.0.0.1:{self._port}"

    # -- fault injection ---------------------------------------------------------------------------------

    def fail_next(self, n: int = 1, status: int | None = 503, *, method: str | None = None, path: str | None = None):
        """Make the next `n` requests fail; `method` / `path` (a substring of the raw URL path) narrow which.

        `status=None` drops the connection without answering, which the client sees as a network error.
        Note the client retries 5xx/429 on some routes (tree listing, preupload) with sleeps of 1 s, 2 s, ...
        """
        with self._lock:
            self._faults.append(_Fault(n, status, method, path))

    def truncate_next(self, n: int = 1, *, path: str | None = None) -> None:
        """Make the next `n` file downloads (GET /resolve, `path` a substring of the URL path) send only the first
        half of the file, with a Content-Length that matches what is sent: a body cut short by a proxy. HEAD still
        announces the full size, so the client notices the difference."""
        with self._lock:
            self._truncations.append(_Fault(n, None, "GET", path))

    def hostile_next(self, kind: str, n: int = 1, *, path: str | None = None) -> None:
        """Make the next `n` file downloads (GET /resolve, `path` a substring of the URL path) hostile:

        - ``endless``: a body without Content-Length that does not end (HEAD stays honest, so it lies about it);
        - ``slow``: the real body with its Content-Length, one byte every 0.5 s;
        - ``oversized``: the real body padded by 8 MiB, HEAD and GET announcing the padded size (each answer counts
          as one of the `n`: a client that stops at HEAD uses one).

        Every hostile body stops after HOSTILE_MAX_BYTES or HOSTILE_MAX_S, or when the client closes the connection."""
        if kind not in HOSTILE_KINDS:
            raise ValueError(f"kind must be one of {HOSTILE_KINDS}")
        with self._lock:
            self._hostile.append(_Fault(n, None, None if kind == "oversized" else "GET", path, kind))

    def commit_unchecked(self, repo_id: str, files: Mapping[str, bytes], message: str = "unchecked") -> str:
        """Commit `files` to main without the path checks of the upload route (names like `../x` included): what a
        hostile or broken server could list. Returns the commit oid."""
        with self._lock:
            repo = self._repos[repo_id]
            head = repo.refs["refs/heads/main"]
            tree = {**repo.tree(head), **{path: self._blobs.put(data) for path, data in files.items()}}
            oid = repo.add_commit(head, tree, message, message, DEFAULT_USER)
            repo.refs["refs/heads/main"] = oid
            self._save(repo_id)
            return oid

    def _injected_fault(self, req: Request) -> _Fault | None:
        fault = next((fault for fault in self._faults if fault.matches(req)), None)
        if fault is not None:
            fault.remaining -= 1
        return fault

    # -- dispatch ----------------------------------------------------------------------------------------

    def _handle(self, req: Request) -> Response | None:
        """Answer one request (None: drop the connection) and log it."""
        with self._lock:
            fault = self._injected_fault(req)
            if fault is None:
                response = self._dispatch(req)
            elif fault.status is None:
                response = None
            else:
                response = self._error(HubError(fault.status, "Injected failure (LocalHub.fail_next)"))
            truncation = next((t for t in self._truncations if t.matches(req)), None)
            if truncation is not None and response is not None and "/resolve/" in req.path and response.status == 200:
                truncation.remaining -= 1
                response = Response(200, response.body[: len(response.body) // 2], response.headers)
            hostile = next((h for h in self._hostile if h.matches(req)), None)
            if hostile is not None and response is not None and "/resolve/" in req.path and response.status == 200:
                hostile.remaining -= 1
                response = _hostile(hostile.kind, response)
            self.requests.append(RequestRecord(req.method, req.path, response and response.status))
            return response

    def _dispatch(self, req: Request) -> Response:
        try:
            matches = [(methods, match, handler) for methods, pattern, handler in _ROUTES
                       if (match := pattern.fullmatch(req.path))]
            for methods, match, handler in matches:
                if req.method in methods:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    return getattr(self, handler)(req, **params)
            raise HubError(405 if matches else 404, f"No route for {req.method} {req.path}")
        except HubError as err:
            return self._error(err)
        except Exception as err:  # a LocalHub bug: answer it, so that the failing test shows the cause
            return self._error(HubError(500, f"LocalHub failed: {err!r}"))

    @staticmethod
    def _error(err: HubError) -> Response:
        response = _json({"error": err.message}, err.status)
        response.headers["X-Error-Message"] = err.message.encode("ascii", "replace").decode()
        if err.code is not None:
            response.headers["X-Error-Code"] = err.code
        response.headers.update(err.headers)
        return response

    # -- auth and persistence ----------------------------------------------------------------------------

    def _user(self, req: Request) -> str | None:
        """The user behind the bearer token; an unknown token is rejected on every route, as on the Hub."""
        auth = req.headers.get("Authorization")
        if not auth:
            return None
        user = self._tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _readable(self, req: Request, repo_id: str) -> Repo:
        """The repo, if this request may read it; hidden repos answer 401 to anonymous requests, like the Hub."""
        user = self._user(req)
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and user is None):
            raise HubError(404 if user else 401, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo

    def _writable(self, req: Request, repo_id: str) -> tuple[Repo, str]:
        user = self._user(req)
        if user is None:
            raise HubError(401, "You must be authenticated to write to a repo")
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo, user

    def _load_repos(self) -> dict[str, Repo]:
        files = sorted((self._root / "repos").glob("*/*.json"))
        return {f"{file.parent.name}/{file.stem}": Repo(**json.loads(file.read_text())) for file in files}

    def _save(self, repo_id: str) -> None:
        path = self._root / "repos" / f"{repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self._repos[repo_id])))

    # -- file descriptions -------------------------------------------------------------------------------

    def _lfs_matcher(self, tree: dict[str, str]) -> Callable[[str], bool]:
        """Which paths this tree's `.gitattributes` routes to LFS (patterns without '/' match the basename)."""
        text = self._blobs.get(tree[".gitattributes"]).decode(errors="replace") if ".gitattributes" in tree else ""
        patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]

        def is_lfs(path: str) -> bool:
            name = path.rsplit("/", 1)[-1]
            return any(fnmatch.fnmatchcase(path if "/" in pattern else name, pattern) for pattern in patterns)

        return is_lfs

    def _file_entry(self, path: str, oid: str, lfs: bool) -> dict:
        """A tree entry as the Hub lists it; for LFS files `oid` is that of the pointer and `lfs.oid` the sha256."""
        size = self._blobs.size(oid)
        if not lfs:
            return {"type": "file", "path": path, "oid": oid, "size": size}
        sha256 = self._blobs.sha256(oid)
        pointer = lfs_pointer(sha256, size)
        lfs_info = {"oid": sha256, "size": size, "pointerSize": len(pointer)}
        return {"type": "file", "path": path, "oid": git_blob_sha1(pointer), "size": size, "lfs": lfs_info}

    @staticmethod
    def _folder_entry(tree: dict[str, str], folder: str) -> dict:
        listing = "".join(f"{path} {oid}\n" for path, oid in sorted(tree.items()) if path.startswith(f"{folder}/"))
        return {"type": "directory", "path": folder, "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0}

    def _entry(self, tree: dict[str, str], path: str) -> dict | None:
        """The entry for a file or folder path, or None if the tree has neither."""
        if path in tree:
            return self._file_entry(path, tree[path], self._lfs_matcher(tree)(path))
        if any(p.startswith(f"{path}/") for p in tree):
            return self._folder_entry(tree, path)
        return None

    def _listing(self, tree: dict[str, str], folder: str, recursive: bool) -> list[dict]:
        prefix = f"{folder}/" if folder else ""
        files = sorted(path for path in tree if path.startswith(prefix))
        if folder and not files:
            raise HubError(404, f"Folder not found: {folder}", "EntryNotFound")
        folders = {parent for path in files for parent in _parent_folders(path) if parent.startswith(prefix)}
        if not recursive:
            files = [p for p in files if "/" not in p[len(prefix):]]
            folders = {f for f in folders if "/" not in f[len(prefix):]}
        is_lfs = self._lfs_matcher(tree)
        return [self._folder_entry(tree, f) for f in sorted(folders)] + [
            self._file_entry(p, tree[p], is_lfs(p)) for p in files
        ]

    # -- routes: repos and account -----------------------------------------------------------------------

    def _create_repo(self, req: Request) -> Response:
        user = self._user(req)
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        body = req.json()
        if body.get("type", "model") != "model":
            raise HubError(400, "LocalHub only serves model repos")
        namespace, name = body.get("organization") or user, body.get("name", "")
        if not (_NAME.fullmatch(namespace) and _NAME.fullmatch(name)):
            raise HubError(400, f"Invalid repo name: {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self._repos:
            return _json({"error": "You already created this model repo", "url": url}, 409)
        private = body.get("visibility", "private" if body.get("private") else "public") == "private"
        repo = self._repos[repo_id] = Repo(private=private, created_at=_now())
        tree = {".gitattributes": self._blobs.put(DEFAULT_GITATTRIBUTES.encode())}
        repo.refs["refs/heads/main"] = repo.add_commit(None, tree, "initial commit", "", user)
        self._save(repo_id)
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, req: Request) -> Response:
        return _json({"errors": [], "warnings": []})

    def _whoami(self, req: Request) -> Response:
        user = self._user(req)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        token_info = {"displayName": "localhub", "role": "write"}
        return _json({"type": "user", "name": user, "fullname": user, "orgs": [],
                      "auth": {"type": "access_token", "accessToken": token_info}})

    def _model_info(self, req: Request, repo_id: str, rev: str = "main") -> Response:
        repo = self._readable(req, repo_id)
        oid = repo.resolve(rev)
        tree = repo.tree(oid)
        is_lfs = self._lfs_matcher(tree)
        siblings = [self._sibling(self._file_entry(p, tree[p], is_lfs(p)), req.flag("blobs")) for p in sorted(tree)]
        return _json({
            "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "createdAt": repo.created_at, "lastModified": repo.commits[oid]["date"], "siblings": siblings,
        })

    @staticmethod
    def _sibling(entry: dict, blobs: bool) -> dict:
        """A `siblings` item; sizes, blob ids and LFS info only when asked (`files_metadata=True`)."""
        if not blobs:
            return {"rfilename": entry["path"]}
        sibling = {"rfilename": entry["path"], "size": entry["size"], "blobId": entry["oid"]}
        if "lfs" in entry:
            lfs = entry["lfs"]
            sibling["lfs"] = {"size": lfs["size"], "sha256": lfs["oid"], "pointerSize": lfs["pointerSize"]}
        return sibling

    # -- routes: browsing --------------------------------------------------------------------------------

    def _tree(self, req: Request, repo_id: str, rev: str, path: str = "") -> Response:
        repo = self._readable(req, repo_id)
        tree = repo.tree(repo.resolve(rev))
        return _json(self._listing(tree, path.strip("/"), req.flag("recursive")))

    def _paths_info(self, req: Request, repo_id: str, rev: str) -> Response:
        """Entries for the requested paths (form-encoded `paths`); unknown paths are left out, as on the Hub."""
        repo = self._readable(req, repo_id)
        tree = repo.tree(repo.resolve(rev))
        paths = parse_qs(req.body.decode()).get("paths", [])
        entries = (self._entry(tree, path.strip("/")) for path in paths)
        return _json([entry for entry in entries if entry is not None])

    def _refs(self, req: Request, repo_id: str) -> Response:
        repo = self._readable(req, repo_id)

        def refs(prefix: str, strip: bool = True) -> list[dict]:
            return [
                {"name": ref.removeprefix(prefix) if strip else ref, "ref": ref, "targetCommit": oid}
                for ref, oid in sorted(repo.refs.items())
                if ref.startswith(prefix)
            ]

        body = {"branches": refs("refs/heads/"), "tags": refs("refs/tags/"), "converts": []}
        if req.flag("include_prs"):
            body["pullRequests"] = refs("refs/pr/", strip=False)
        return _json(body)

    def _commits(self, req: Request, repo_id: str, rev: str) -> Response:
        repo = self._readable(req, repo_id)
        history, oid = [], repo.resolve(rev)
        while oid is not None:
            commit = repo.commits[oid]
            history.append({"id": oid, "title": commit["title"], "message": commit["message"],
                            "date": commit["date"], "authors": [{"user": commit["author"]}]})
            oid = commit["parent"]
        return _json(history)

    def _resolve(self, req: Request, repo_id: str, rev: str, path: str) -> Response:
        """File download (GET) and metadata (HEAD): the client needs X-Repo-Commit, ETag and Content-Length."""
        repo = self._readable(req, repo_id)
        oid = repo.resolve(rev)
        tree = repo.tree(oid)
        if path not in tree:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        entry = self._file_entry(path, tree[path], self._lfs_matcher(tree)(path))
        headers = {"Content-Type": "application/octet-stream", "X-Repo-Commit": oid, "ETag": f'"{entry["oid"]}"'}
        if "lfs" in entry:
            headers |= {"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(entry["size"])}
        return Response(200, self._blobs.get(tree[path]), headers)

    # -- routes: writing ---------------------------------------------------------------------------------

    def _preupload(self, req: Request, repo_id: str, rev: str) -> Response:
        """Always "regular" (no Xet/LFS); `oid` lets the client skip files that did not change."""
        repo, _ = self._writable(req, repo_id)
        oid = repo.resolve(rev)
        tree = repo.tree(oid)
        files = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"])}
            for f in req.json().get("files", [])
        ]
        return _json({"files": files, "commitOid": oid})

    def _commit(self, req: Request, repo_id: str, rev: str) -> Response:
        repo, user = self._writable(req, repo_id)
        header, operations = _parse_commit_payload(req.body)
        ref = repo.branch_ref(rev)
        parent = self._commit_parent(repo, ref, header.get("parentCommit"), req.flag("create_pr"))
        tree = self._apply(dict(repo.tree(parent)), operations)
        oid = repo.add_commit(parent, tree, header.get("summary", ""), header.get("description", ""), user)
        pr_url = None
        if req.flag("create_pr"):
            pr_url = f"{self.endpoint}/{repo_id}/discussions/{repo.open_pr(oid)}"
        else:
            repo.refs[ref] = oid
        self._save(repo_id)
        commit_url = f"{self.endpoint}/{repo_id}/commit/{oid}"
        return _json({"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": pr_url})

    @staticmethod
    def _commit_parent(repo: Repo, ref: str, parent_commit: str | None, create_pr: bool) -> str:
        """A PR may start from any known `parentCommit`; a branch commit must be made on top of its head."""
        head = repo.refs[ref]
        if parent_commit is None:
            return head
        if create_pr:
            if parent_commit not in repo.commits:
                raise _revision_not_found(parent_commit)
            return parent_commit
        if parent_commit != head:
            raise HubError(412, f"Parent commit {parent_commit} is not the head of {ref} ({head})")
        return head

    def _apply(self, tree: dict[str, str], operations: list[tuple[str, dict]]) -> dict[str, str]:
        for key, value in operations:
            path = _clean_path(value.get("path", ""))
            if key == "file":
                tree[path] = self._blobs.put(_decode_file(value))
            elif key == "lfsFile":
                tree[path] = self._lfs_blob(value.get("oid", ""))
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in tree if p.startswith(f"{path}/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation: {key}")
        return tree

    def _lfs_blob(self, sha256: str) -> str:
        """`lfsFile` lines only come from copies of files the hub already has: nothing is ever uploaded as LFS."""
        oid = self._blobs.find_sha256(sha256)
        if oid is None:
            raise HubError(400, f"Unknown LFS object {sha256}: LocalHub only accepts regular uploads")
        return oid

    def _create_branch(self, req: Request, repo_id: str, branch: str) -> Response:
        repo, _ = self._writable(req, repo_id)
        _check_ref_name(branch)
        if f"refs/heads/{branch}" in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        repo.refs[f"refs/heads/{branch}"] = repo.resolve(req.json().get("startingPoint") or "main")
        self._save(repo_id)
        return _json({})

    def _delete_branch(self, req: Request, repo_id: str, branch: str) -> Response:
        repo, _ = self._writable(req, repo_id)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        if repo.refs.pop(f"refs/heads/{branch}", None) is None:
            raise _revision_not_found(branch)
        self._save(repo_id)
        return _json({})

    def _create_tag(self, req: Request, repo_id: str, rev: str) -> Response:
        repo, _ = self._writable(req, repo_id)
        tag = req.json().get("tag", "")
        _check_ref_name(tag)
        if f"refs/tags/{tag}" in repo.refs:
            raise HubError(409, f"Tag already exists: {tag}")
        repo.refs[f"refs/tags/{tag}"] = repo.resolve(rev)
        self._save(repo_id)
        return _json({})

    def _delete_tag(self, req: Request, repo_id: str, tag: str) -> Response:
        repo, _ = self._writable(req, repo_id)
        if repo.refs.pop(f"refs/tags/{tag}", None) is None:
            raise _revision_not_found(tag)
        self._save(repo_id)
        return _json({})


def _hostile(kind: str, response: Response) -> Response:
    """The hostile version of a file download (see LocalHub.hostile_next)."""
    if kind == "oversized":
        body = response.body + bytes(8 << 20)
        headers = dict(response.headers)
        if "X-Linked-Size" in headers:
            headers["X-Linked-Size"] = str(len(body))
        return Response(200, body, headers)
    started = time.monotonic()

    def in_bounds(sent: int) -> bool:
        return sent < HOSTILE_MAX_BYTES and time.monotonic() - started < HOSTILE_MAX_S

    def endless(out: BinaryIO) -> None:
        block, sent = bytes(1 << 16), 0
        while in_bounds(sent):
            out.write(block)
            sent += len(block)

    def slow(out: BinaryIO) -> None:
        for sent in range(len(response.body)):
            if not in_bounds(sent):
                return
            out.write(response.body[sent : sent + 1])
            out.flush()
            time.sleep(0.5)

    if kind == "endless":
        return Response(200, b"", response.headers, endless)
    return Response(200, b"", {**response.headers, "Content-Length": str(len(response.body))}, slow)


def _parse_commit_payload(body: bytes) -> tuple[dict, list[tuple[str, dict]]]:
    """Split the ndjson commit body into its header value and (key, value) operations."""
    try:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        raise HubError(400, f"Invalid ndjson commit payload: {err}") from err
    if not lines or lines[0].get("key") != "header":
        raise HubError(400, "A commit payload starts with a header line")
    return lines[0]["value"], [(line.get("key"), line.get("value", {})) for line in lines[1:]]


def _decode_file(value: dict) -> bytes:
    if value.get("encoding", "base64") != "base64":
        raise HubError(400, f"Unsupported file encoding: {value['encoding']}")
    try:
        return base64.b64decode(value.get("content", ""), validate=True)
    except binascii.Error as err:
        raise HubError(400, f"Invalid base64 content for {value.get('path')}: {err}") from err


def _clean_path(path: str) -> str:
    """Reject paths that could escape the repo or that git could not store."""
    path = path.rstrip("/")
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _parent_folders(path: str) -> list[str]:
    """`a/b/c.txt` -> [`a`, `a/b`]."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _check_ref_name(name: str) -> None:
    if not _REF_NAME.fullmatch(name) or _COMMIT_SHA.fullmatch(name) or name.startswith("refs/"):
        raise HubError(400, f"Invalid reference name: {name!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: LocalHub):
        self.hub = hub
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only; the hub answers. HTTP/1.0 (one request per connection) so that `stop()` really cuts
    clients off instead of leaving keep-alive connections served by lingering threads."""

    server: _Server
    protocol_version = "HTTP/1.0"

    def _serve(self) -> None:
        # Read the body first: closing a socket with unread data resets the connection before the client reads.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        request = Request(self.command, url.path, parse_qs(url.query), self.headers, body)
        response = self.server.hub._handle(request)
        if response is None:
            return  # injected network failure: the connection closes without a response
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        if response.stream is None:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if response.stream is None:
            self.wfile.write(response.body)
            return
        try:
            response.stream(self.wfile)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: object) -> None:
        """Silent: the hub keeps its own log in `LocalHub.requests`."""


@contextmanager
def running_hub(
    tmp_path: str | Path, tokens: Mapping[str, str] | Iterable[str] = (DEFAULT_TOKEN,)
) -> Iterator[LocalHub]:
    """The body of a pytest fixture: a started hub storing under `tmp_path/hub`, stopped on exit."""
    with LocalHub(Path(tmp_path) / "hub", tokens) as hub:
        yield hub


def isolate_hf_env(monkeypatch, tmp_path: str | Path) -> Path:
    """Point the client's home, cache and token paths at `tmp_path/hf_home` and drop ambient tokens/endpoints.

    `huggingface_hub.constants` reads the environment once at import, so the constants are patched as well as
    the environment. Returns the hub cache directory (pass it as `cache_dir=` or rely on HF_HUB_CACHE).
    """
    from huggingface_hub import constants

    home = Path(tmp_path) / "hf_home"
    cache = home / "hub"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
        monkeypatch.setenv(name, str(value))
    patched = {
        "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"), "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    return cache

"""`kvhub registry extract-pr` on real temporary git repositories: a fork's pull request as the workflow sees it
(the base checked out, the head fetched as a ref), refused inputs and the accepted case."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvhub.cli import main
from kvhub.errors import PullRequestError
from kvhub.registry_tools.extract_pr import Limits, extract_pr

FOLDER = "test--tiny-llama"
PRESET = {"kvhub_preset.json": b'{"a": 1}\n', "README.md": b"# card\n", "bases.safetensors": b"\0" * 300}


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=kvhub", "-c", "user.email=kvhub@localhost", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository with code and one preset on main; `base` is its head."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "kvhub").mkdir()
    (root / "kvhub" / "code.py").write_text("print('base')\n")
    (root / "presets" / "old--model").mkdir(parents=True)
    (root / "presets" / "old--model" / "recipe.json").write_text("{}\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "base")
    return root


def pull_request(repo: Path, files: dict[str, bytes | None], links: dict[str, str] = ()) -> tuple[str, str]:
    """Commit ``files`` (None deletes) and ``links`` on a branch, go back to main; (base, head) commits."""
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", f"pr-{len(os.listdir(repo / '.git' / 'refs' / 'heads'))}")
    for path, data in files.items():
        target = repo / path
        if data is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    for path, to in dict(links).items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).symlink_to(to)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "pull request")
    head = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "main")
    return base, head


def preset_files(folder: str = FOLDER, **changes: bytes) -> dict[str, bytes]:
    return {f"presets/{folder}/{name}": data for name, data in {**PRESET, **changes}.items()}


def test_accepted_pull_request_is_extracted_as_plain_files(repo, tmp_path, capsys):
    base, head = pull_request(repo, preset_files())
    out = tmp_path / "out"
    result = extract_pr(repo, base, head, out)
    assert (result.folders, result.removed, result.files) == ([FOLDER], [], 3)
    assert result.bytes == sum(len(d) for d in PRESET.values())
    written = {p.name: p for p in (out / "presets" / FOLDER).iterdir()}
    assert {n: p.read_bytes() for n, p in written.items()} == PRESET
    assert all(not p.is_symlink() and p.stat().st_mode & 0o777 == 0o644 for p in written.values())
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"  # the head was never checked out
    assert (repo / "kvhub" / "code.py").read_text() == "print('base')\n"

    assert main(["registry", "extract-pr", "--repo", str(repo), "--base", base, "--head", head,
                 "--out", str(tmp_path / "cli")]) == 0
    assert f"extracted {tmp_path / 'cli' / 'presets' / FOLDER}" in capsys.readouterr().out


def test_whole_folder_is_extracted_and_removed_folders_are_listed(repo, tmp_path):
    base, head = pull_request(repo, {**preset_files(), "presets/old--model/recipe.json": None})
    result = extract_pr(repo, base, head, tmp_path / "a")
    assert result.removed == ["old--model"] and result.folders == [FOLDER]
    git(repo, "merge", "-q", "--ff-only", head)  # now a second pull request touching one file of the preset
    base3, head3 = pull_request(repo, {f"presets/{FOLDER}/README.md": b"# newer card\n"})
    result = extract_pr(repo, base3, head3, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "presets" / FOLDER).iterdir()) == sorted(PRESET)
    assert (tmp_path / "b" / "presets" / FOLDER / "README.md").read_bytes() == b"# newer card\n"


@pytest.mark.parametrize("files, message", [
    ({"kvhub/code.py": b"import os; os.system('steal')\n"}, "outside presets/"),
    ({".github/workflows/x.yml": b"on: push\n"}, "outside presets/"),
    ({"presets/README.md": b"hi\n"}, "outside presets/"),
    ({f"presets/{FOLDER}/sub/bases.safetensors": b"x"}, "outside presets/"),
    ({"presets/no-separator/README.md": b"x"}, "not named <org>--<name>"),
    ({f"presets/{FOLDER}/run.py": b"print(1)\n"}, "not a preset file"),
    ({f"presets/{FOLDER}/.hidden.safetensors": b"x"}, "not a preset file"),
    ({f"presets/{FOLDER}/model.pt": b"x"}, "not a preset file"),
])
def test_refused_paths_and_file_types(repo, tmp_path, files, message):
    base, head = pull_request(repo, {**preset_files(), **files})
    with pytest.raises(PullRequestError, match=message):
        extract_pr(repo, base, head, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_symlinks_are_refused_not_followed(repo, tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.write_text("a private file\n")
    base, head = pull_request(repo, {f"presets/{FOLDER}/kvhub_preset.json": PRESET["kvhub_preset.json"],
                                     f"presets/{FOLDER}/README.md": PRESET["README.md"]},
                              links={f"presets/{FOLDER}/bases.safetensors": str(secret)})
    with pytest.raises(PullRequestError, match="symbolic link"):
        extract_pr(repo, base, head, tmp_path / "out")
    code = main(["registry", "extract-pr", "--repo", str(repo), "--base", base, "--head", head, "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "symbolic link" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_submodules_are_refused(repo, tmp_path):
    base = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "-b", "sub")
    commit = git(repo, "rev-parse", "HEAD")
    git(repo, "update-index", "--add", "--cacheinfo", f"160000,{commit},presets/{FOLDER}/bases.safetensors")
    git(repo, "commit", "-q", "-m", "a submodule")
    head = git(repo, "rev-parse", "HEAD")
    with pytest.raises(PullRequestError, match="submodule"):
        extract_pr(repo, base, head, tmp_path / "out")


def test_oversize_and_too_many_files_are_refused(repo, tmp_path):
    base, head = pull_request(repo, preset_files(**{"bases.safetensors": b"\0" * 5000}))
    with pytest.raises(PullRequestError, match="5000 bytes, over the limit of 4096"):
        extract_pr(repo, base, head, tmp_path / "a", Limits(tensor_file_bytes=4096))
    with pytest.raises(PullRequestError, match="over the limit of 8"):
        extract_pr(repo, base, head, tmp_path / "b", Limits(small_file_bytes=8))
    with pytest.raises(PullRequestError, match="more than 5000 bytes"):
        extract_pr(repo, base, head, tmp_path / "c", Limits(total_bytes=5000))
    many = {f"presets/{FOLDER}/part{i}.safetensors": b"x" for i in range(6)}
    base, head = pull_request(repo, {**preset_files(), **many})
    with pytest.raises(PullRequestError, match="more than 8 preset files"):
        extract_pr(repo, base, head, tmp_path / "d", Limits(files=8))
    assert not [p for p in tmp_path.iterdir() if p.name != "repo"]


def test_bad_revisions_and_an_existing_out_folder(repo, tmp_path):
    base, head = pull_request(repo, preset_files())
    with pytest.raises(PullRequestError, match="fix: fetch both commits"):
        extract_pr(repo, base, "f" * 40, tmp_path / "out")
    with pytest.raises(PullRequestError, match="not a revision"):
        extract_pr(repo, "--output=/tmp/x", head, tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(PullRequestError, match="already exists"):
        extract_pr(repo, base, head, tmp_path / "out")

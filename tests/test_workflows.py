"""The GitHub workflows: actionlint and zizmor clean, pull-request code never checked out where it could reach a
token or a self-hosted runner, untrusted and publishing jobs on separate runners, actions pinned by commit, and
every kvhub command a workflow runs exercised by the tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
# Triggers whose runs use the base repository's workflow file and token: the pull request's code must never run.
PRIVILEGED = {"pull_request_target", "issue_comment", "workflow_run"}
PR_TRIGGERS = PRIVILEGED | {"pull_request"}
_CHECKOUT_CMD = re.compile(r"\b(git\s+(checkout|switch|worktree|reset|merge|pull|cherry-pick|restore|stash)|gh\s+pr\s+checkout)\b")
_BASE_REFS = (None, "${{ github.event.repository.default_branch }}", "${{ github.base_ref }}",
              "${{ github.event.pull_request.base.sha }}", "${{ github.event.pull_request.base.ref }}")


def load(path: Path) -> dict:
    document = yaml.safe_load(path.read_text())
    document["on"] = document.pop(True, document.get("on"))  # YAML 1.1 reads the key `on` as true
    return document


def workflow(name: str) -> dict:
    return load(WORKFLOWS / name)


def triggers(document: dict) -> set[str]:
    on = document["on"]
    return {on} if isinstance(on, str) else set(on)


def tool(name: str) -> str:
    binary = Path(sys.executable).with_name(name)
    found = str(binary) if binary.is_file() else shutil.which(name)
    assert found, f"{name} is missing: install the dev extra (.[dev])"
    return found


def pull_request_code_checkouts(document: dict) -> list[str]:
    """Where a workflow triggered by a pull-request event checks out the pull request's code as a working tree.

    Privileged triggers: any checkout of a ref other than the base, or any git command that moves the working
    tree. ``pull_request``: CI does test the pull request's code, so it may, but only on GitHub-hosted runners,
    with read-only permissions and no secrets."""
    found = []
    events = triggers(document) & PR_TRIGGERS
    for name, job in document["jobs"].items():
        for step in job.get("steps", []):
            where = f"job {name}, step {step.get('name') or step.get('uses')}"
            checkout = step.get("uses", "").startswith("actions/checkout@")
            if events & PRIVILEGED:
                if checkout and (step.get("with") or {}).get("ref") not in _BASE_REFS:
                    found.append(f"{where}: checks out {step['with']['ref']}")
                if _CHECKOUT_CMD.search(step.get("run", "")):
                    found.append(f"{where}: moves the working tree ({_CHECKOUT_CMD.search(step['run']).group(0)})")
            elif checkout and "pull_request" in events:
                runs_on = job.get("runs-on")
                labels = [runs_on] if isinstance(runs_on, str) else list(runs_on or [])
                writes = [p for p, v in (job.get("permissions") or document.get("permissions") or {}).items()
                          if v == "write"]
                if "self-hosted" in labels or writes or "secrets." in json.dumps(job):
                    found.append(f"{where}: checks out the pull request on {labels} with {writes or 'secrets'}")
    return found


# --- linters ------------------------------------------------------------------------------------------------

def test_workflows_pass_actionlint():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.yml"))
    assert len(files) >= 3
    result = subprocess.run([tool("actionlint"), "-no-color", *files], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_workflows_pass_zizmor_offline():
    """No finding of medium severity or above. The only suppressions allowed are the two privileged triggers of
    validate-preset.yml, whose safety zizmor cannot see and the next test checks."""
    result = subprocess.run([tool("zizmor"), "--offline", "--no-progress", "--min-severity", "medium", "--format",
                             "json", str(WORKFLOWS)], cwd=REPO, capture_output=True, text=True, timeout=120)
    findings = json.loads(result.stdout or "[]")
    assert result.returncode == 0 and findings == [], result.stdout[:4000] + result.stderr[-2000:]
    ignores = [(path.name, line.split("zizmor: ignore[")[1].split("]")[0])
               for path in sorted(WORKFLOWS.glob("*.yml")) for line in path.read_text().splitlines()
               if "zizmor: ignore[" in line]
    assert ignores == [("validate-preset.yml", "dangerous-triggers")] * 2


# --- pull-request code, runners, permissions, pins ---------------------------------------------------------

def test_no_pull_request_job_checks_out_the_pull_request_where_it_could_do_harm():
    checked = [p.name for p in WORKFLOWS.glob("*.yml") if triggers(load(p)) & PR_TRIGGERS]
    assert {"ci.yml", "validate-preset.yml"} <= set(checked)
    for path in WORKFLOWS.glob("*.yml"):
        assert pull_request_code_checkouts(load(path)) == [], path.name


@pytest.mark.parametrize("step", [
    {"uses": "actions/checkout@abc", "with": {"ref": "${{ github.event.pull_request.head.sha }}"}},
    {"uses": "actions/checkout@abc", "with": {"ref": "refs/pull/${{ github.event.issue.number }}/head"}},
    {"run": "git fetch origin pull/1/head && git checkout FETCH_HEAD"},
    {"run": "gh pr checkout 1"},
    {"run": "git worktree add ../pr refs/remotes/pull/head"},
])
def test_the_checkout_detector_catches_pull_request_checkouts(step):
    """The check above can fail: a privileged workflow that checks out the pull request is reported."""
    document = {"on": {"issue_comment": {}}, "jobs": {"verify": {"runs-on": "ubuntu-latest", "steps": [step]}}}
    assert pull_request_code_checkouts(document)
    unprivileged = {"on": {"pull_request": {}}, "jobs": {"test": {
        "runs-on": ["self-hosted", "gpu"], "steps": [{"uses": "actions/checkout@abc"}]}}}
    assert pull_request_code_checkouts(unprivileged)


def test_fork_pull_requests_are_verified_by_the_base_branch_code():
    validate = workflow("validate-preset.yml")
    assert validate["on"] == {"pull_request_target": {"types": ["labeled"]}, "issue_comment": {"types": ["created"]}}
    assert validate["permissions"] == {}
    verify, comment = validate["jobs"]["verify"], validate["jobs"]["comment"]
    gate = " ".join(verify["if"].split())
    assert "github.event.label.name == 'verify'" in gate and "startsWith(github.event.comment.body, '/verify')" in gate
    assert '["OWNER", "MEMBER", "COLLABORATOR"]' in gate and "author_association" in gate
    assert verify["runs-on"] == ["self-hosted", "linux", "gpu", "untrusted"]
    assert verify["permissions"] == {"contents": "read"} and comment["permissions"] == {"pull-requests": "write"}
    assert comment["runs-on"] == "ubuntu-latest" and comment["needs"] == "verify"
    text = (WORKFLOWS / "validate-preset.yml").read_text()
    assert "secrets." not in text
    runs = "\n".join(s.get("run", "") for s in verify["steps"])
    assert "refs/pull/$PR_NUMBER/head:refs/remotes/pull/head" in runs  # fetched as a ref ...
    assert "registry extract-pr --base HEAD --head refs/remotes/pull/head" in runs  # ... read as data
    assert "registry verify \"$dir\" --device cuda" in runs and "pr-data/presets" in runs
    assert 'pip install -q ".[model]"' in runs  # kvhub from the base checkout


def test_untrusted_and_publishing_jobs_never_share_a_runner():
    jobs = {(path.name, name): job for path in WORKFLOWS.glob("*.yml") for name, job in load(path)["jobs"].items()}
    labels = {key: set([job["runs-on"]] if isinstance(job["runs-on"], str) else job["runs-on"])
              for key, job in jobs.items()}
    publishing = [key for key, job in jobs.items() if "secrets.HF_TOKEN" in json.dumps(job)]
    untrusted = [key for key in jobs if key[0] == "validate-preset.yml" and "self-hosted" in labels[key]]
    assert publishing == [("publish.yml", "publish")] and untrusted == [("validate-preset.yml", "verify")]
    assert "publish" in labels[publishing[0]] and "untrusted" not in labels[publishing[0]]
    assert "untrusted" in labels[untrusted[0]] and "publish" not in labels[untrusted[0]]
    assert jobs[publishing[0]]["environment"] == "hub-publish"
    assert jobs[publishing[0]]["permissions"] == {"contents": "read"}  # no write token where HF_TOKEN is
    declared = yaml.safe_load((REPO / ".github" / "actionlint.yaml").read_text())["self-hosted-runner"]["labels"]
    assert {"gpu", "untrusted", "publish"} <= set(declared)


def test_least_privilege_pinned_actions_and_no_persisted_credentials():
    for path in sorted(WORKFLOWS.glob("*.yml")):
        document = load(path)
        assert document["permissions"] in ({}, {"contents": "read"}), path.name
        for name, job in document["jobs"].items():
            for step in job["steps"]:
                if step.get("uses", "").startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, f"{path.name} {name}"
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(- )?uses:", line):
                assert re.search(r"uses: [\w.-]+/[\w.-]+@[0-9a-f]{40} # v\d+(\.\d+)*$", line), \
                    f"{path.name}:{number}: pin the action by commit sha with its tag in a comment: {line.strip()}"


def test_publish_stays_on_merge_to_main():
    publish = workflow("publish.yml")
    assert set(publish["on"]) == {"push", "workflow_dispatch"}
    assert publish["on"]["push"]["branches"] == ["main"] and "presets/**" in publish["on"]["push"]["paths"]
    job = publish["jobs"]["publish"]
    uses_token = [s for s in job["steps"] if "HF_TOKEN" in s.get("env", {})]
    assert uses_token and all(s["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}" for s in uses_token)
    opens_pr = publish["jobs"]["open-pr"]
    assert opens_pr["runs-on"] == "ubuntu-latest" and opens_pr["needs"] == "publish"
    create = next(s for s in opens_pr["steps"] if s.get("uses", "").startswith("peter-evans/create-pull-request"))
    assert {"kvhub/data/index.json", "MODEL_ZOO.md"} <= set(create["with"]["add-paths"].split())


def test_ci_runs_the_suite_on_every_pull_request():
    ci = workflow("ci.yml")
    assert {"push", "pull_request"} <= triggers(ci)
    assert any("scripts/test.sh" in s.get("run", "") for job in ci["jobs"].values() for s in job["steps"])


def test_every_kvhub_command_the_workflows_run_is_tested():
    called = set()
    for path in WORKFLOWS.glob("*.yml"):
        runs = [step.get("run", "") for job in load(path)["jobs"].values() for step in job["steps"]]
        for words in re.findall(r"(?:^|[\s/$])kvhub\"? ([a-z-]+)(?: ([a-z-]+))?", "\n".join(runs)):
            assert words[0] == "registry", f"{path.name} runs `kvhub {words[0]}`: test it here or add it to this list"
            called.add(words[1])
    assert called == {"verify", "publish", "check", "push-index", "extract-pr"}
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for command in called:
        assert f'"registry", "{command}"' in sources, f"`kvhub registry {command}` is never run by the tests"

"""models.yaml delivered by git (issue 21): real git, a bare repository as the remote, two clones."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from opta_lmx.state.gitsync import GitFollower
from opta_lmx.state.store import EditConflict, ModelsStore

FIRST = """\
# the fleet's desired state
memory:
  budget: 8GiB
models:
  - name: alpha
    source: /models/alpha
    priority: 1
  - name: beta
    source: /models/beta
"""


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture
def fleet_repo(tmp_path):
    """A bare remote holding models.yaml, and two clones of it (two hosts)."""
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(remote))
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "-q", str(remote), str(seed))
    (seed / "models.yaml").write_text(FIRST)
    git(seed, "add", "models.yaml")
    git(seed, "commit", "-q", "-m", "first")
    git(seed, "push", "-q", "origin", "HEAD:main")
    hosts = []
    for name in ("a", "b"):
        clone = tmp_path / name
        git(tmp_path, "clone", "-q", str(remote), str(clone))
        git(clone, "config", "user.name", name)
        git(clone, "config", "user.email", f"{name}@fleet")
        hosts.append(clone)
    return remote, hosts


def commit_and_push(clone: Path, text: str, message: str) -> str:
    (clone / "models.yaml").write_text(text)
    git(clone, "commit", "-q", "-am", message)
    git(clone, "push", "-q", "origin", "HEAD:main")
    return git(clone, "rev-parse", "HEAD")


def test_a_valid_commit_is_fast_forwarded_and_an_invalid_one_is_refused_once(fleet_repo):
    _remote, (a, b) = fleet_repo
    follower = GitFollower(a / "models.yaml")
    assert follower.sync().applied is None  # already current

    good = commit_and_push(b, FIRST.replace("priority: 1", "priority: 7"), "alpha first")
    result = follower.sync()
    assert result.applied == good
    assert "priority: 7" in (a / "models.yaml").read_text()

    bad = commit_and_push(b, FIRST.replace("priority: 1", "priority: lots"), "a typo")
    result = follower.sync()
    assert result.applied is None and result.refused is not None
    assert result.refused.commit == bad and result.refused.subject == "a typo"
    assert any("priority" in problem for problem in result.refused.problems), result.refused.problems
    assert "priority: 7" in (a / "models.yaml").read_text()  # the last good state stays checked out
    assert git(a, "rev-parse", "HEAD") == good
    assert follower.state.to_dict()["refused"]["commit"] == bad
    assert follower.sync().refused is None  # said once, still refused
    assert follower.state.refused is not None

    fixed = commit_and_push(b, FIRST.replace("priority: 1", "priority: 8"), "fix the typo")
    assert follower.sync().applied == fixed
    assert follower.state.refused is None and "priority: 8" in (a / "models.yaml").read_text()


def test_an_admin_edit_is_pushed_and_reaches_the_other_host(fleet_repo):
    _remote, (a, b) = fleet_repo
    store = ModelsStore(a / "models.yaml", git=GitFollower(a / "models.yaml"))
    result = store.edit(lambda doc: _set(doc, "alpha", "priority", 3) or "set alpha: priority=3",
                        endpoint="PATCH /admin/models/alpha")
    assert result.commit and result.commit_error is None
    assert git(a, "rev-parse", "origin/main") == result.commit
    follower_b = GitFollower(b / "models.yaml")
    assert follower_b.sync().applied == result.commit
    assert "priority: 3" in (b / "models.yaml").read_text()
    assert "# the fleet's desired state" in (b / "models.yaml").read_text()  # comments travel


def test_a_push_that_loses_the_race_is_redone_on_the_fresh_head(fleet_repo):
    _remote, (a, b) = fleet_repo
    store = ModelsStore(a / "models.yaml", git=GitFollower(a / "models.yaml"))
    # host b changes beta meanwhile; a has not fetched it
    other = commit_and_push(b, FIRST.replace("    source: /models/beta\n", "    source: /models/beta\n    pinned: true\n"),
                            "pin beta")
    result = store.edit(lambda doc: _set(doc, "alpha", "priority", 5) or "set alpha: priority=5")
    assert result.commit_error is None
    text = (a / "models.yaml").read_text()
    assert "priority: 5" in text and "pinned: true" in text  # both edits, neither lost
    assert git(a, "rev-parse", "origin/main") == git(a, "rev-parse", "HEAD")
    assert git(a, "merge-base", "--is-ancestor", other, "HEAD") == ""


def test_a_push_that_conflicts_is_refused_and_leaves_the_remote_head(fleet_repo):
    _remote, (a, b) = fleet_repo
    store = ModelsStore(a / "models.yaml", git=GitFollower(a / "models.yaml"))
    theirs = commit_and_push(b, FIRST.replace("priority: 1", "priority: 9"), "b says 9")
    with pytest.raises(EditConflict) as refused:
        store.edit(lambda doc: _set(doc, "alpha", "priority", 4) or "set alpha: priority=4")
    assert "conflicts" in str(refused.value)
    assert git(a, "rev-parse", "HEAD") == theirs  # the edit is not kept half-applied anywhere
    assert "priority: 9" in (a / "models.yaml").read_text()
    assert git(b, "ls-remote", "origin", "main").split()[0] == theirs


def test_following_an_unknown_remote_is_refused_with_a_reason(fleet_repo):
    from opta_lmx.state.gitsync import GitSyncError
    _remote, (a, _b) = fleet_repo
    with pytest.raises(GitSyncError, match="nowhere"):
        GitFollower(a / "models.yaml", "nowhere")


def _set(document, name: str, key: str, value) -> None:
    for model in document["models"]:
        if model["name"] == name:
            model[key] = value


def test_the_fleet_part_is_validated_with_line_and_column():
    from opta_lmx.state.document import ConfigError, parse_document
    text = """\
fleet:
  hosts:
    - {name: studio, url: "http://127.0.0.1:1234"}
    - {name: studio, url: "http://127.0.0.1:1235"}
    - {name: laptop, url: "http://127.0.0.1:1236/v1"}
models:
  - name: a
    source: /m/a
    hosts: [studio, macbook, studio]
"""
    with pytest.raises(ConfigError) as refused:
        parse_document(text, "models.yaml")
    found = {(p.path, p.line, p.column): p.message for p in refused.value.problems}
    assert any(path == "fleet.hosts[2].url" and line == 5 for path, line, _ in found), found
    fixed = text.replace('"http://127.0.0.1:1236/v1"', '"http://127.0.0.1:1236"')
    with pytest.raises(ConfigError) as refused:
        parse_document(fixed, "models.yaml")
    found = {(p.path, p.line, p.column): p.message for p in refused.value.problems}
    assert found == {
        ("fleet.hosts[1].name", 4, 8): "host 'studio' is listed twice",
        ("models[0].hosts[1]", 9, 21): "a: unknown host 'macbook' (the fleet's hosts: laptop, studio)",
        ("models[0].hosts[2]", 9, 30): "a: host 'studio' is listed twice",
    }
    ok = parse_document(fixed.replace("    - {name: studio, url: \"http://127.0.0.1:1235\"}\n", "")
                        .replace("studio, macbook, studio", "laptop, studio"), "models.yaml").state
    assert ok.models[0].hosts == ["laptop", "studio"] and ok.fleet.host("laptop").url == "http://127.0.0.1:1236"

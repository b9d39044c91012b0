"""models.yaml delivered by git (docs/fleet.md): follow a shared remote, fast-forward only, and
apply a commit only if the file it holds validates; push admin edits, retried on the fresh head.

Each host's checkout follows one branch of one remote (a bare repository on the same machine is a
remote like any other). A commit whose models.yaml does not validate is never checked out: every
host keeps its last good state and names the refused commit. The file watcher applies what a
fast-forward writes, as it applies any other edit.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from opta_lmx.state.document import ConfigError, parse_document
from opta_lmx.state.gitcommit import identity

GIT_TIMEOUT = 60.0
PUSH_ATTEMPTS = 4


class GitSyncError(Exception):
    """A git command failed in a way the follower cannot resolve (no remote, a dirty checkout...)."""


class PushConflict(Exception):
    """An admin edit could not be pushed: the remote moved and the edit does not apply on its head."""


@dataclass
class Refusal:
    commit: str
    subject: str
    problems: list[str]

    def to_dict(self) -> dict:
        return {"commit": self.commit, "subject": self.subject, "problems": self.problems}


@dataclass
class SyncResult:
    """What one sync did: `applied` the commit fast-forwarded to, `refused` a commit that does not
    validate (only the first time it is seen), `pushed` local commits sent."""

    applied: str | None = None
    refused: Refusal | None = None
    pushed: str | None = None


@dataclass
class GitState:
    remote: str
    branch: str
    head: str | None = None
    remote_head: str | None = None
    last_sync: float | None = None
    last_error: str | None = None
    refused: Refusal | None = None
    applied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"remote": self.remote, "branch": self.branch, "head": self.head, "remote_head": self.remote_head,
                "last_sync": self.last_sync, "last_error": self.last_error,
                "refused": self.refused.to_dict() if self.refused else None}


class GitFollower:
    """Keeps the checkout holding `file` on `remote`/`branch`. Blocking: run it off the event loop."""

    def __init__(self, file: Path, remote: str = "origin", branch: str | None = None):
        self.file = Path(file)
        self.directory = self.file.resolve().parent
        self._lock = threading.RLock()  # one git operation on this checkout at a time
        self.top = Path(self._git("rev-parse", "--show-toplevel").strip())
        self.relpath = str(self.file.resolve().relative_to(self.top.resolve()))
        self.branch = branch or self._git("rev-parse", "--abbrev-ref", "HEAD").strip()
        if self.branch == "HEAD":
            raise GitSyncError(f"{self.top} is on a detached HEAD: check out the branch to follow")
        self.state = GitState(remote, self.branch)
        self._git("remote", "get-url", remote)  # raises if the remote is unknown

    @property
    def remote(self) -> str:
        return self.state.remote

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["git", *args], cwd=self.directory, capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT, env=_git_env())
        except (OSError, subprocess.SubprocessError) as error:
            raise GitSyncError(f"git {args[0]} failed: {error}") from None

    def _git(self, *args: str) -> str:
        done = self._run(*args)
        if done.returncode != 0:
            raise GitSyncError(f"git {' '.join(args[:2])}: {(done.stderr or done.stdout).strip()[:500]}")
        return done.stdout

    def _rev(self, ref: str) -> str | None:
        done = self._run("rev-parse", "--verify", "-q", ref + "^{commit}")
        return done.stdout.strip() or None if done.returncode == 0 else None

    def _is_ancestor(self, older: str, newer: str) -> bool:
        return self._run("merge-base", "--is-ancestor", older, newer).returncode == 0

    def _tracking(self) -> str:
        return f"refs/remotes/{self.remote}/{self.branch}"

    def problems_at(self, commit: str) -> list[str]:
        """Why models.yaml at `commit` is refused (empty: it validates)."""
        shown = self._run("show", f"{commit}:{self.relpath}")
        if shown.returncode != 0:
            return [f"{self.relpath} does not exist at {commit[:12]}"]
        try:
            parse_document(shown.stdout, f"{commit[:12]}:{self.relpath}")
        except ConfigError as error:
            return [str(problem) for problem in error.problems] or [str(error)]
        return []

    def fetch(self) -> str | None:
        self._git("fetch", "--quiet", self.remote, f"+refs/heads/{self.branch}:{self._tracking()}")
        return self._rev(self._tracking())

    def sync(self) -> SyncResult:
        """Fetch; fast-forward to the remote's head if its models.yaml validates; push local commits
        the remote lacks. Raises GitSyncError when git itself fails."""
        with self._lock:
            result = SyncResult()
            try:
                remote_head = self.fetch()
                head = self._rev("HEAD")
                if remote_head is not None and head != remote_head:
                    if head is None or self._is_ancestor(head, remote_head):
                        result = self._fast_forward(remote_head)
                    elif self._is_ancestor(remote_head, head):
                        result.pushed = self._push_once()
                    else:
                        raise GitSyncError(f"{self.branch} and {self.remote}/{self.branch} have diverged: "
                                           "rebase or reset the checkout by hand")
                elif remote_head is None and head is not None:
                    result.pushed = self._push_once()  # an empty remote: this checkout starts it
                self.state.last_error = None
            except GitSyncError as error:
                self.state.last_error = str(error)
                raise
            finally:
                self.state.last_sync = time.time()
                self.state.head = self._rev("HEAD")
                self.state.remote_head = self._rev(self._tracking())
            return result

    def _fast_forward(self, target: str) -> SyncResult:
        problems = self.problems_at(target)
        if problems:
            already = self.state.refused is not None and self.state.refused.commit == target
            subject = self._run("log", "-1", "--format=%s", target).stdout.strip()
            self.state.refused = Refusal(target, subject, problems)
            return SyncResult(refused=None if already else self.state.refused)
        self._git("merge", "--ff-only", "--quiet", target)
        self.state.refused = None
        self.state.applied = [*self.state.applied[-19:], target]
        return SyncResult(applied=target)

    def _push(self) -> subprocess.CompletedProcess[str]:
        return self._run("push", "--quiet", self.remote, f"HEAD:refs/heads/{self.branch}")

    def _push_once(self) -> str | None:
        done = self._push()
        if done.returncode != 0:
            raise GitSyncError(f"git push: {(done.stderr or done.stdout).strip()[:500]}")
        self.fetch()
        return self._rev("HEAD")

    def push_edit(self) -> str:
        """Push the commit an admin edit just made. If the remote moved meanwhile, the edit is
        rebased on its fresh head and pushed again (a few times); if it does not apply there, or
        the result does not validate, the checkout goes back to the remote's head and PushConflict
        says so: the edit is not applied anywhere, and the client is told (409)."""
        with self._lock:
            for _attempt in range(PUSH_ATTEMPTS):
                done = self._push()
                if done.returncode == 0:
                    self.fetch()
                    self.state.head = self.state.remote_head = self._rev("HEAD")
                    return self.state.head or ""
                remote_head = self.fetch()
                if remote_head is None:
                    raise GitSyncError(f"git push: {(done.stderr or done.stdout).strip()[:500]}")
                rebased = self._run(*identity(self._run), "rebase", "--quiet", remote_head)
                if rebased.returncode != 0:
                    self._run("rebase", "--abort")
                    self._give_up(remote_head)
                    raise PushConflict(f"the edit conflicts with {self.remote}/{self.branch} at {remote_head[:12]}, "
                                       "which changed the same lines meanwhile; read it again and retry")
                head = self._rev("HEAD") or ""
                if problems := self.problems_at(head):
                    self._give_up(remote_head)
                    raise PushConflict(f"on {self.remote}/{self.branch}'s new head the edit would not validate: "
                                       + "; ".join(problems[:3]))
            raise PushConflict(f"{self.remote}/{self.branch} kept moving during {PUSH_ATTEMPTS} pushes; "
                               "the edit was not applied: retry")

    def _give_up(self, remote_head: str) -> None:
        """Back to the remote's head: the edit that could not be pushed is not kept anywhere."""
        self._git("reset", "--quiet", "--keep", remote_head)  # other local changes stay
        self.state.head = remote_head


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_TERMINAL_PROMPT", "0")  # never wait for a password on a terminal
    env["GIT_EDITOR"] = "true"  # a rebase never opens an editor
    return env

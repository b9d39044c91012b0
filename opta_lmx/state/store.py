"""The one writer of models.yaml.

Every programmatic change to the desired state goes through `ModelsStore.edit`: a round-trip
edit (state.yamledit, state.render) that keeps comments, key order and quoting, validated as a
whole document before anything touches the disk, written atomically (state.atomic), and guarded
by a compare-and-swap on the content's ETag so that concurrent writers (API calls, a person
saving in an editor, `git pull`) never lose an update silently. HTTP (If-Match, status codes)
is the api's business: the store takes a precondition on the current ETag.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ruamel.yaml.comments import CommentedMap

from opta_lmx.state.atomic import write_atomic
from opta_lmx.state.document import content_etag, parse_document
from opta_lmx.state.gitcommit import commit_file
from opta_lmx.state.gitsync import GitFollower, GitSyncError, PushConflict
from opta_lmx.state.render import render_edit
from opta_lmx.state.spec import DesiredState
from opta_lmx.state.yamledit import EditError

log = logging.getLogger(__name__)

UNREADABLE_ETAG = '"unreadable"'  # the ETag of a path that is there but cannot be read as a file

Precondition = Callable[[str], bool]  # given the current ETag: may the write go ahead?


class PreconditionFailed(Exception):
    """The precondition refused the current version of the file: nothing was written."""

    def __init__(self, current: str):
        super().__init__(f"models.yaml is at {current}, which the precondition refused")
        self.current = current


class EditConflict(Exception):
    """The file kept changing under us through every retry; nothing was written."""


@dataclass(frozen=True)
class Snapshot:
    """models.yaml's bytes as read at one moment, and their ETag."""

    data: bytes
    etag: str
    exists: bool
    problem: str | None = None  # why the path is there but cannot be read as a file
    loops: bool = False  # the path is a symbolic link that loops

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")

    @property
    def blank(self) -> bool:
        """Empty or only whitespace: a file being written (`cat >`, a non-atomic save), not "no models"."""
        return self.exists and self.problem is None and not self.data.strip()


@dataclass(frozen=True)
class WriteResult:
    etag: str
    previous_etag: str
    changed: bool
    state: DesiredState
    text: str
    summary: str
    commit: str | None = None
    commit_error: str | None = None


class ModelsStore:
    """models.yaml on disk: snapshots with ETags, and validated, atomic, compare-and-swap edits."""

    def __init__(self, path: str | os.PathLike[str], *, git_commit: bool = False, retries: int = 8,
                 git: GitFollower | None = None):
        self.path = Path(path)
        self.git = git  # following a remote: every write is committed and pushed (docs/fleet.md)
        self.git_commit = git_commit or git is not None
        self.retries = retries
        self._lock = threading.Lock()

    def target(self) -> Path:
        """The file that is really written: the symlink's target when models.yaml is a link."""
        return Path(os.path.realpath(self.path))

    def snapshot(self) -> Snapshot:
        """The bytes now; a path that cannot be read as a file (a directory, a link loop) says why."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Snapshot(b"", content_etag(b""), False)
        except IsADirectoryError:
            return Snapshot(b"", UNREADABLE_ETAG, True, (
                f"{self.path} is a directory, not a file: move it away (nothing here deletes a "
                "directory), then create the file with PUT /admin/desired"))
        except OSError as error:
            if error.errno == errno.ELOOP:
                return Snapshot(b"", UNREADABLE_ETAG, True, (
                    f"{self.path} is a symbolic link that loops: PUT /admin/desired replaces the "
                    "link with a regular file"), loops=True)
            return Snapshot(b"", UNREADABLE_ETAG, True, f"cannot read {self.path}: {error.strerror or error}")
        return Snapshot(data, content_etag(data), True)

    def edit(self, mutate: Callable[[CommentedMap], str], *, precondition: Precondition | None = None,
             endpoint: str = "", dry_run: bool = False, create: bool = False) -> WriteResult:
        """Apply `mutate` to the current document and write it, unless someone wrote first.

        The file is re-read just before the rename; if it changed since this edit read it, the
        edit is redone on the new content (or, under a precondition, checked again). A missing
        or blank file is not an empty desired state: the edit is refused unless `create`.
        """
        return self._write(lambda snap: render_edit(self.editable_text(snap, create), mutate),
                           precondition=precondition, endpoint=endpoint, dry_run=dry_run)

    def replace(self, text: str, *, precondition: Precondition | None = None, endpoint: str = "",
                summary: str = "replace the desired state", dry_run: bool = False) -> WriteResult:
        """Replace the whole document with `text` (for `lmx apply -f`), validated first.

        Whatever the old file is (missing, not UTF-8, not YAML, a looping link) it can be replaced;
        only a directory in its place is refused, since replacing it would delete it.
        """
        if not text.strip():
            raise EditError("an empty document is not a desired state (a missing or blank models.yaml never "
                            "means \"no models\"): send `models: []` to remove every model", "invalid_edit")
        return self._write(lambda _snap: (text, summary), precondition=precondition, endpoint=endpoint,
                           dry_run=dry_run)

    def editable_text(self, snap: Snapshot, create: bool = False) -> str:
        """The text an edit applies to, or an EditError saying why this file cannot be edited."""
        if snap.problem is not None:
            raise EditError(snap.problem, "document_unreadable")
        if not snap.exists and not create:
            raise EditError(
                f"{self.path} does not exist, and a missing file is not an empty desired state; nothing "
                "was written. Create it whole with PUT /admin/desired, or repeat this request with "
                "?create=true to start a new file holding only this change", "document_missing")
        if snap.blank and not create:
            raise EditError(
                f"{self.path} is empty (a file being written?), which is not an empty desired state; "
                "nothing was written. Write `models: []` for no models, replace it with PUT "
                "/admin/desired, or repeat this request with ?create=true", "document_missing")
        try:
            return snap.text
        except UnicodeDecodeError as error:
            raise EditError(f"{self.path} is not UTF-8 text ({error.reason} at byte {error.start}), so it "
                            "cannot be edited; replace it whole with PUT /admin/desired",
                            "invalid_document") from None

    def _write(self, produce: Callable[[Snapshot], tuple[str, str]], *, precondition: Precondition | None,
               endpoint: str, dry_run: bool) -> WriteResult:
        with self._lock, self._directory_lock():
            for _attempt in range(self.retries):
                snap = self.snapshot()
                if precondition is not None and not precondition(snap.etag):
                    raise PreconditionFailed(snap.etag)
                if snap.problem is not None and not snap.loops:
                    raise EditError(snap.problem, "document_unreadable")
                new_text, summary = produce(snap)
                document = parse_document(new_text, str(self.path))  # ConfigError: nothing written
                data = new_text.encode("utf-8")
                etag = content_etag(data)
                changed = data != snap.data or not snap.exists
                if not changed or dry_run:
                    return WriteResult(etag, snap.etag, changed, document.state, new_text, summary)
                if self.snapshot().etag != snap.etag:
                    log.info("models.yaml changed while an edit was being prepared; redoing the edit")
                    continue
                self._write_bytes(data, snap)
                commit, error = None, None
                if self.git_commit:
                    commit, error = commit_file(self.target(), f"{summary} (via {endpoint})" if endpoint else summary)
                if self.git is not None and commit is not None:
                    commit, error = self._push(commit)
                return WriteResult(etag, snap.etag, True, document.state, new_text, summary, commit, error)
        raise EditConflict(f"models.yaml kept changing during {self.retries} attempts; nothing was written")

    def _push(self, commit: str) -> tuple[str | None, str | None]:
        """Push the edit's commit. A push the remote refuses because it moved is redone on its fresh
        head; if the edit does not apply there, the checkout is back at the remote's head and the
        write is refused (409). A push that fails otherwise (the remote unreachable) keeps the
        commit, pushed by the next sync: (commit, why it is not pushed yet)."""
        assert self.git is not None
        try:
            return self.git.push_edit(), None
        except PushConflict as error:
            raise EditConflict(f"{error}; models.yaml is now as on {self.git.remote}") from None
        except GitSyncError as error:
            return commit, f"committed but not pushed yet (the next sync pushes it): {error}"

    def _write_bytes(self, data: bytes, snap: Snapshot) -> None:
        """Write through a symlink to its target; a looping link (which leads nowhere) is replaced."""
        target = self.path if snap.loops else self.target()
        try:
            if snap.loops:
                os.unlink(self.path)  # the link leads nowhere; rename cannot replace what stat cannot read
            write_atomic(target, data)
        except OSError as error:
            raise EditError(f"cannot write {target}: {error}", "write_failed") from None

    @contextlib.contextmanager
    def _directory_lock(self):
        """flock on the target's directory: excludes other lmx writers (other processes, other stores).

        A lock on the directory rather than a lock file leaves nothing behind in a git checkout.
        Editors do not take it; the compare-and-swap covers them.
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: the in-process lock and the CAS still apply
            yield
            return
        try:
            fd = os.open(self.target().parent, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

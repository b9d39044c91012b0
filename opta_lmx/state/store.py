"""The one writer of models.yaml.

Every programmatic change to the desired state goes through `ModelsStore.edit`: a round-trip
edit that keeps comments, key order and quoting, validated as a whole document before anything
touches the disk, written atomically, and guarded by a compare-and-swap on the content's ETag
so that concurrent writers (API calls, a person saving in an editor, `git pull`) never lose an
update silently.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import logging
import os
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError
from ruamel.yaml.scalarstring import ScalarString
from ruamel.yaml.tokens import CommentToken

from opta_lmx.state.document import (
    content_etag,
    new_yaml,
    parse_document,
    plain,
)
from opta_lmx.state.spec import DesiredState

log = logging.getLogger(__name__)

# Indentation styles tried when re-emitting a file, so a file written in another common style
# (for example `- name:` flush with its parent key) is re-emitted in that same style.
_INDENTS = [(2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 6, 4), (4, 4, 0), (2, 3, 1)]


class EditError(Exception):
    """The edit cannot apply to this document (e.g. the model it names does not exist)."""

    def __init__(self, message: str, code: str = "invalid_edit", status: int = 400):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


class PreconditionFailed(Exception):
    """`If-Match` named a version of the file that is no longer current: nothing was written."""

    def __init__(self, expected: str, current: str):
        super().__init__(f"models.yaml is at {current}, not {expected}")
        self.expected = expected
        self.current = current


class EditConflict(Exception):
    """The file kept changing under us through every retry; nothing was written."""


@dataclass(frozen=True)
class Snapshot:
    """models.yaml's bytes as read at one moment, and their ETag."""

    data: bytes
    etag: str
    exists: bool

    @property
    def text(self) -> str:
        return self.data.decode("utf-8")


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


def etag_matches(if_match: str, etag: str) -> bool:
    """RFC 9110 If-Match: `*` or any listed tag (weak prefixes ignored)."""
    for candidate in if_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if not candidate.startswith('"'):
            candidate = f'"{candidate}"'
        if candidate == etag:
            return True
    return False


# -- tree edits -------------------------------------------------------------------------
def to_node(value: Any, like: Any = None) -> Any:
    """A JSON value as a round-trip node; a string replacing a quoted one keeps its quotes."""
    if isinstance(value, dict):
        node = CommentedMap()
        if isinstance(like, CommentedMap) and like.fa.flow_style():
            node.fa.set_flow_style()
        for key, item in value.items():
            node[key] = to_node(item)
        return node
    if isinstance(value, list):
        node = CommentedSeq(to_node(item) for item in value)
        if isinstance(like, CommentedSeq) and like.fa.flow_style():
            node.fa.set_flow_style()
        return node
    if isinstance(value, str) and isinstance(like, ScalarString) and not isinstance(value, ScalarString):
        return type(like)(value)
    return value


def _same(old: Any, new: Any) -> bool:
    """Equal as data (so an unchanged value keeps its original spelling); bools never equal ints."""
    if isinstance(old, bool) != isinstance(new, bool):
        return False
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new))
    if isinstance(old, (dict, list)) or isinstance(new, (dict, list)):
        return False
    if isinstance(old, str) != isinstance(new, str):
        return False
    return old == new


def _holder(mapping: CommentedMap, key: Any) -> tuple[CommentedMap, Any]:
    """The (mapping, key) whose comment token carries the lines that follow `mapping[key]`."""
    value = mapping[key]
    if isinstance(value, CommentedMap) and value and not value.fa.flow_style():
        return _holder(value, list(value)[-1])
    return mapping, key


def _last_holder(node: Any) -> tuple[CommentedMap, Any] | None:
    if not isinstance(node, CommentedMap) or not node or node.fa.flow_style():
        return None
    return _holder(node, list(node)[-1])


def take_trailer(holder: tuple[CommentedMap, Any] | None) -> str:
    """Detach the comment and blank lines after a key (they belong to whatever comes next)."""
    if holder is None:
        return ""
    mapping, key = holder
    entry = mapping.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    if token is None or "\n" not in token.value:
        return ""
    eol, rest = token.value.split("\n", 1)
    if not rest:
        return ""
    token.value = eol + "\n"
    if not eol.strip():
        entry[2] = None
    return rest


def give_trailer(holder: tuple[CommentedMap, Any] | None, rest: str) -> None:
    """Attach lines taken by `take_trailer` after another key."""
    if holder is None or not rest:
        return
    mapping, key = holder
    entry = mapping.ca.items.setdefault(key, [None, None, None, None])
    if entry[2] is None:
        entry[2] = CommentToken("\n" + rest, CommentMark(0), None)
    else:
        entry[2].value = entry[2].value + rest


def delete_key(node: CommentedMap, key: Any) -> None:
    """Remove `key`, keeping the comment lines that followed it (they introduce the next key)."""
    keys = list(node)
    index = keys.index(key)
    rest = take_trailer(_holder(node, key))
    del node[key]
    if index > 0:
        give_trailer(_holder(node, keys[index - 1]), rest)


def set_key(node: CommentedMap, key: Any, value: Any) -> None:
    """Set `key`; a new last key takes over the trailing lines of the previous last one."""
    if key in node:
        node[key] = value
        return
    rest = take_trailer(_last_holder(node))
    node[key] = value
    give_trailer(_holder(node, key), rest)


def append_item(seq: CommentedSeq, item: Any) -> None:
    """Append to a sequence of mappings; the new last item takes over the trailing lines."""
    rest = take_trailer(_last_holder(seq[-1])) if seq else ""
    seq.append(item)
    give_trailer(_last_holder(item), rest)


def delete_item(seq: CommentedSeq, index: int) -> None:
    """Remove an item of a sequence of mappings, keeping the comment lines after it."""
    rest = take_trailer(_last_holder(seq[index]))
    del seq[index]
    if index > 0:
        give_trailer(_last_holder(seq[index - 1]), rest)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return value


def merge_patch(node: CommentedMap, patch: dict[str, Any]) -> None:
    """RFC 7396 JSON merge patch, applied in place so untouched keys keep their comments."""
    for key, value in patch.items():
        if value is None:
            if key in node:
                delete_key(node, key)
        elif isinstance(value, dict):
            current = node.get(key)
            if isinstance(current, CommentedMap):
                merge_patch(current, value)
            else:
                set_key(node, key, to_node(_without_nulls(value), current))
        elif key not in node or not _same(node[key], value):
            set_key(node, key, to_node(value, node.get(key)))


def replace_mapping(node: CommentedMap, new: dict[str, Any]) -> None:
    """Make `node` equal `new`, in place: keys that stay keep their place and comments."""
    for key in [k for k in node if k not in new]:
        delete_key(node, key)
    for key, value in new.items():
        current = node.get(key)
        if isinstance(value, dict) and isinstance(current, CommentedMap):
            replace_mapping(current, value)
        elif key not in node or not _same(current, value):
            set_key(node, key, to_node(value, current))


def models_of(tree: CommentedMap) -> CommentedSeq:
    models = tree.get("models")
    if models is None:
        models = CommentedSeq()
        tree["models"] = models
    if not isinstance(models, list):
        raise EditError("`models` in models.yaml is not a list", "invalid_document", 409)
    return models


def find_model(tree: CommentedMap, name: str) -> CommentedMap | None:
    for entry in models_of(tree):
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    return None


def require_model(tree: CommentedMap, name: str) -> CommentedMap:
    entry = find_model(tree, name)
    if entry is None:
        raise EditError(f"no model named `{name}` in models.yaml", "model_not_found", 404)
    return entry


def describe_patch(patch: Any, prefix: str = "") -> str:
    """`a.b=1, c=null`: a one-line account of a merge patch, for commit messages and events."""
    if not isinstance(patch, dict) or not patch:
        return f"{prefix}={_short(patch)}" if prefix else _short(patch)
    parts = []
    for key, value in patch.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        parts.append(describe_patch(value, path) if isinstance(value, dict) and value else f"{path}={_short(value)}")
    return ", ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# -- rendering ----------------------------------------------------------------------------
def _yaml_with(indent: tuple[int, int, int]) -> YAML:
    yaml = new_yaml()
    yaml.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    return yaml


def _dump(yaml: YAML, tree: Any) -> str:
    buffer = io.StringIO()
    yaml.dump(tree, buffer)
    return buffer.getvalue()


def _load_with_style(text: str) -> tuple[YAML, Any, str]:
    """Load `text`, picking the indentation style that re-emits it most faithfully."""
    best: tuple[float, YAML, Any, str] | None = None
    for indent in _INDENTS:
        yaml = _yaml_with(indent)
        tree = yaml.load(text)
        dumped = _dump(yaml, tree) if tree is not None else ""
        if dumped == text:
            return yaml, tree, dumped
        score = difflib.SequenceMatcher(None, dumped.splitlines(), text.splitlines(), autojunk=False).ratio()
        if best is None or score > best[0]:
            best = (score, yaml, tree, dumped)
    assert best is not None
    return best[1], best[2], best[3]


def splice(original: str, before: str, after: str) -> str | None:
    """Apply the line changes between two dumps (`before` -> `after`) to the original text.

    ruamel re-emits some layouts differently from how a person wrote them (extra spaces,
    flow-style spacing); splicing only the changed lines into the original keeps every
    untouched line byte for byte. None when the changes do not map onto the original.
    """
    orig, old, new = (t.splitlines(keepends=True) for t in (original, before, after))
    if orig == old:
        return after
    mapping: dict[int, int] = {}
    for tag, i1, i2, j1, _j2 in difflib.SequenceMatcher(None, old, orig, autojunk=False).get_opcodes():
        if tag == "equal":
            mapping.update({i1 + k: j1 + k for k in range(i2 - i1)})
    out: list[str] = []
    pos = 0
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        if i1 < i2:
            if any(k not in mapping for k in range(i1, i2)):
                return None
            start, end = mapping[i1], mapping[i2 - 1] + 1
            if end - start != i2 - i1:
                return None
        elif i1 in mapping:
            start = end = mapping[i1]
        elif i1 == len(old):
            start = end = len(orig)
        elif i1 - 1 in mapping:
            start = end = mapping[i1 - 1] + 1
        else:
            return None
        if start < pos:
            return None
        out += orig[pos:start]
        out += new[j1:j2]
        pos = end
    out += orig[pos:]
    return "".join(out)


def render_edit(text: str, mutate: Callable[[CommentedMap], str]) -> tuple[str, str]:
    """The new file text after `mutate` edits the tree of `text`, and its summary.

    Untouched lines survive byte for byte: the edit is emitted by ruamel and spliced into
    the original, falling back to ruamel's whole output only if the splice would not mean
    the same data.
    """
    if "\r\n" in text:  # keep Windows line endings: edit with \n, write back with \r\n
        new_text, summary = render_edit(text.replace("\r\n", "\n"), mutate)
        return new_text.replace("\n", "\r\n"), summary
    try:
        yaml, tree, before = _load_with_style(text) if text.strip() else (new_yaml(), None, "")
    except YAMLError as error:
        raise EditError(
            f"models.yaml does not parse, so it cannot be edited; fix it by hand or replace it "
            f"whole (PUT /admin/desired): {error}", "invalid_document", 409,
        ) from None
    if tree is None:
        tree = CommentedMap()
        before = ""
    if not isinstance(tree, CommentedMap):
        raise EditError("the top level of models.yaml is not a mapping", "invalid_document", 409)
    summary = mutate(tree)
    after = _dump(yaml, tree)
    spliced = splice(text, before, after) if before else None
    if spliced is not None and spliced != after:
        try:
            if plain(new_yaml().load(spliced)) == plain(new_yaml().load(after)):
                return spliced, summary
        except YAMLError:
            pass
        log.info("could not splice the edit into models.yaml's own layout; re-emitting it whole")
        return after, summary
    return (spliced if spliced is not None else after), summary


# -- the store ----------------------------------------------------------------------------
class ModelsStore:
    """models.yaml on disk: snapshots with ETags, and validated, atomic, compare-and-swap edits."""

    def __init__(self, path: str | os.PathLike[str], *, git_commit: bool = False, retries: int = 8):
        self.path = Path(path)
        self.git_commit = git_commit
        self.retries = retries
        self._lock = threading.Lock()

    def target(self) -> Path:
        """The file that is really written: the symlink's target when models.yaml is a link."""
        return Path(os.path.realpath(self.path))

    def snapshot(self) -> Snapshot:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Snapshot(b"", content_etag(b""), False)
        return Snapshot(data, content_etag(data), True)

    def edit(
        self,
        mutate: Callable[[CommentedMap], str],
        *,
        if_match: str | None = None,
        endpoint: str = "",
        dry_run: bool = False,
    ) -> WriteResult:
        """Apply `mutate` to the current document and write it, unless someone wrote first.

        The file is re-read just before the rename; if it changed since this edit read it, the
        edit is redone on the new content (or, under `If-Match`, refused with 412).
        """
        return self._write(lambda text: render_edit(text, mutate), if_match=if_match,
                           endpoint=endpoint, dry_run=dry_run)

    def replace(self, text: str, *, if_match: str | None = None, endpoint: str = "",
                summary: str = "replace the desired state", dry_run: bool = False) -> WriteResult:
        """Replace the whole document with `text` (for `lmx apply -f`), validated first."""
        return self._write(lambda _old: (text, summary), if_match=if_match, endpoint=endpoint, dry_run=dry_run)

    def _write(self, produce: Callable[[str], tuple[str, str]], *, if_match: str | None,
               endpoint: str, dry_run: bool) -> WriteResult:
        with self._lock, self._directory_lock():
            for _attempt in range(self.retries):
                snap = self.snapshot()
                if if_match is not None and not etag_matches(if_match, snap.etag):
                    raise PreconditionFailed(if_match, snap.etag)
                try:
                    old_text = snap.text
                except UnicodeDecodeError:
                    raise EditError("models.yaml is not UTF-8 text", "invalid_document", 409) from None
                new_text, summary = produce(old_text)
                document = parse_document(new_text, str(self.path))  # ConfigError: nothing written
                data = new_text.encode("utf-8")
                etag = content_etag(data)
                if data == snap.data or dry_run:
                    return WriteResult(etag, snap.etag, data != snap.data, document.state, new_text, summary)
                if self.snapshot().etag != snap.etag:
                    log.info("models.yaml changed while an edit was being prepared; redoing the edit")
                    continue
                try:
                    self._atomic_write(data)
                except OSError as error:
                    raise EditError(f"cannot write {self.target()}: {error}", "write_failed", 500) from None
                result = WriteResult(etag, snap.etag, True, document.state, new_text, summary)
                if self.git_commit:
                    message = f"{summary} (via {endpoint})" if endpoint else summary
                    commit, error = self._commit(message)
                    result = WriteResult(etag, snap.etag, True, document.state, new_text, summary, commit, error)
                return result
        raise EditConflict(f"models.yaml kept changing during {self.retries} attempts; nothing was written")

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

    def _atomic_write(self, data: bytes) -> None:
        """Temp file beside the real target, fsync, rename over it: readers see old or new, never half."""
        target = self.target()
        try:
            st: os.stat_result | None = target.stat()
        except FileNotFoundError:
            st = None
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if st is not None:
                os.chmod(tmp, stat.S_IMODE(st.st_mode))
                try:
                    os.chown(tmp, st.st_uid, st.st_gid)
                except (PermissionError, AttributeError):
                    pass
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _commit(self, message: str) -> tuple[str | None, str | None]:
        """`git commit` just this file in the repository that holds it: (sha, None) or (None, why)."""
        target = self.target()
        cwd = target.parent

        def git(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

        try:
            top = git("rev-parse", "--show-toplevel")
            if top.returncode != 0:
                return None, f"{target} is not in a git repository"
            identity: list[str] = []
            if not git("config", "user.email").stdout.strip():
                identity = ["-c", "user.name=Opta-LMX", "-c", "user.email=opta-lmx@localhost"]
            added = git("add", "--", target.name)
            if added.returncode != 0:
                return None, added.stderr.strip()
            done = git(*identity, "commit", "--no-verify", "-q", "-m", message, "--", target.name)
            if done.returncode != 0:
                return None, (done.stderr or done.stdout).strip()
            return git("rev-parse", "HEAD").stdout.strip(), None
        except (OSError, subprocess.SubprocessError) as error:
            return None, f"git failed: {error}"


"""The state directory is the control plane's alone, checked once at start-up.

Worker records, the workers' secret, sockets, the instance lock and the logs all live there. A
record is a claim the next start acts on (adopt, signal, remove), so a directory another local
user can write is a way to make this server act for them: `lmx serve` refuses a state (or log)
directory that another user owns or can write, and says how to fix it. It tightens what is
merely readable (0700 directories, 0600 files: prompts end up in worker logs), and `lmx serve`
runs with umask 077 so that everything it and its workers create afterwards is private whatever
the user's umask. Finding out that the directory is read-only from a traceback deep in the
first record write helps nobody either, so it is proven writable here too.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

PRIVATE_UMASK = 0o077  # what `lmx serve` runs with: new files 0600, new directories 0700


class StateDirError(Exception):
    """The state directory cannot be created, written, or trusted; the message says how to fix it."""


def prepare_state_dir(path: str | os.PathLike[str], what: str = "state dir") -> Path:
    """Create `path` (0700) if needed, make sure only this user can write into it or anything in
    it (tightening what others may only read), and prove it writable."""
    state_dir = Path(path)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise StateDirError(f"{what} {state_dir} is not a writable directory ({error.strerror or error}); make "
                            "it writable, or pass another --state-dir") from None
    make_private(state_dir, what)
    try:
        with tempfile.TemporaryFile(dir=state_dir, prefix=".lmx-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise StateDirError(f"{what} {state_dir} is not a writable directory ({reason}); make it "
                            "writable (or free space on its disk), or pass another --state-dir") from None
    return state_dir


def make_private(root: Path, what: str = "state dir") -> None:
    """Refuse `root` if another user owns it or anything in it, or may write to it; else make
    every directory in it 0700 and every file 0600 (symbolic links are neither followed nor kept
    as trusted: one that points outside is reported)."""
    uid = os.geteuid()
    info = _lstat(root)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"{what} {root} is not a directory")
    if info.st_uid != uid:
        raise StateDirError(f"{what} {root} belongs to uid {info.st_uid}, not to you (uid {uid}): another "
                            "user could plant records this server would act on; use a directory of your own "
                            "(--state-dir)")
    if info.st_mode & 0o022:
        raise StateDirError(f"{what} {root} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}): "
                            f"they could plant records this server would act on; check what is in it, then "
                            f"`chmod -R go-w {root}` (or use another --state-dir)")
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory) / name
            entry = _lstat(path)
            if entry.st_uid != uid:
                raise StateDirError(f"{path} in the {what} belongs to uid {entry.st_uid}, not to you: remove it "
                                    f"(it is not this server's) and start again")
            if stat.S_ISLNK(entry.st_mode):
                continue  # never chmod through a link (it changes the target); never followed by os.walk
            wanted = 0o700 if stat.S_ISDIR(entry.st_mode) else 0o600 if stat.S_ISREG(entry.st_mode) else None
            if wanted is not None and stat.S_IMODE(entry.st_mode) & 0o077:
                os.chmod(path, stat.S_IMODE(entry.st_mode) & 0o700 | (0o700 if wanted == 0o700 else 0))
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(root, 0o700)


def inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether `path`, resolved (links and `..`), lies inside `root` (resolved): a path a record
    names is acted on (read, removed) only if it does."""
    try:
        resolved, base = Path(path).resolve(), Path(root).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return resolved == base or base in resolved.parents


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as error:
        raise StateDirError(f"cannot read {path}: {error.strerror or error}") from None

"""Where a model's worker log is, and its last lines: read by `lmx logs` and the dashboard.

Only files under the log directory are ever read: a model's logs are `<log dir>/<model>/`, one per
worker process, named by its start (`<UTC time><ns>-<worker id>.log`), so the newest worker's is
the last by name. No record names a file to read (a record is a claim another user might have
planted, docs/security.md), and a name that is not a model's name is no path at all.
"""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path

from opta_lmx.state.spec import NAME_PATTERN

_NAME = re.compile(NAME_PATTERN)
_STAMPED = re.compile(r"^\d{8}T\d{15}-.+\.log$")


def model_log_path(name: str, log_dir: Path) -> Path | None:
    """The current worker's log of `name`: the newest stamped file in `log_dir/<name>/`, else the
    newest other `*.log` there (an older version's worker ids), else an older version's
    `log_dir/<name>.log`; None if there is none or `name` is not a model's name."""
    if not _NAME.fullmatch(name):
        return None
    directory = log_dir / name
    stamped, others = [], []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        entries = []
    for entry in entries:
        if not entry.name.endswith(".log"):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue  # a link (or anything else) is never read through
        if _STAMPED.match(entry.name):
            stamped.append(entry.name)
        else:
            others.append((info.st_mtime, entry.name))
    if stamped:
        return directory / max(stamped)
    if others:
        return directory / max(others)[1]
    fallback = log_dir / f"{name}.log"
    try:
        return fallback if stat.S_ISREG(os.lstat(fallback).st_mode) else None
    except OSError:
        return None


def tail(path: Path, lines: int, out=None) -> int:
    """Print the last `lines` lines of `path`; return the offset reached (for follow)."""
    out = out or sys.stdout
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        chunk, position, data = 65536, end, b""
        while position > 0 and data.count(b"\n") <= lines:
            position = max(0, position - chunk)
            handle.seek(position)
            data = handle.read(end - position)
        text = b"\n".join(data.split(b"\n")[-(lines + 1):]) if lines else b""
        out.write(text.decode("utf-8", "replace"))
        out.flush()
        return end

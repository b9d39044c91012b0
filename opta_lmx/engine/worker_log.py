"""A worker's log files: one per worker process under <log dir>/<model>/, pruned per model, and
the line of a log that says best why a worker failed."""

from __future__ import annotations

import os
import time
from pathlib import Path

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3
WORKER_LOGS_KEPT = 5  # per model: the newest workers' logs (the one starting is the 6th)


def prune_worker_logs(directory: Path, keep: int = WORKER_LOGS_KEPT) -> None:
    """Before a model's new worker starts: delete all but its `keep` newest worker logs."""
    try:
        logs = sorted(directory.glob("*.log"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in logs[keep:]:
        old.unlink(missing_ok=True)


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES, keep: int = LOG_KEEP) -> None:
    """At a worker's start: if its log has grown past `max_bytes`, shift it to .1 (keeping `keep`)."""
    try:
        if path.stat().st_size <= max_bytes:
            return
    except FileNotFoundError:
        return
    for index in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if keep > 0:
        os.replace(path, path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def last_error_line(text: str) -> str:
    """The most telling line of a worker's log: its last error, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def open_log(path: Path):
    """A log opened for appending, created 0600 whatever the umask: worker output holds prompts."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "ab", buffering=0)


def log_stamp() -> str:
    """A worker log's name prefix: its start time, so names sort as workers started."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time_ns() % 10**9:09d}"

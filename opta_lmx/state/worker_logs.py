"""Where a model's worker log is, and its last lines: read by `lmx logs` and the dashboard.

The worker records (written by the engine) name each worker's log; this reads them as plain
JSON so the api layer can find a log without importing the engine.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def model_log_path(name: str, state_dir: Path, log_dir: Path) -> Path | None:
    """The current worker's log of `name`: the newest record's, else the newest file in
    `log_dir/<name>/` (one log per worker process), else an older version's `log_dir/<name>.log`."""
    records = state_dir / "workers" / "records"
    newest: tuple[float, Path] | None = None
    for path in records.glob("*.json"):
        try:
            record = json.loads(path.read_text())
            started, log_path = float(record.get("started_at") or 0.0), record["log_path"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
        if record.get("name") == name and isinstance(log_path, str) and log_path:
            if newest is None or started > newest[0]:
                newest = (started, Path(log_path))
    if newest is not None:
        return newest[1]
    worker_logs = []
    for path in (log_dir / name).glob("*.log"):
        try:
            worker_logs.append((path.stat().st_mtime, path))
        except OSError:
            continue
    if worker_logs:
        return max(worker_logs)[1]
    fallback = log_dir / f"{name}.log"
    return fallback if fallback.exists() else None


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

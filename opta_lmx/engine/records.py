"""Per-worker records in the state directory, so a restarted control plane finds its workers.

Workers run in their own sessions and survive a SIGKILLed control plane. Each running worker
has a small JSON record (pid, process create time, address, spec fingerprint, log path)
written when it starts and removed when it stops. The create time is what makes a pid safe to
trust: a pid the kernel has reused for another process has a different create time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import psutil

from opta_lmx.state.atomic import write_atomic

log = logging.getLogger(__name__)

# psutil's create_time is derived from boot time and clock ticks: stable for one process,
# different (by far more than this) for a later process that got the same pid.
CREATE_TIME_TOLERANCE = 0.05


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    name: str
    fingerprint: str
    source: str
    engine: dict[str, Any]
    pid: int
    create_time: float
    host: str
    port: int
    address: str
    log_path: str
    run_dir: str
    started_at: float | None = None
    ready_at: float | None = None
    started_through: str = "cold"  # cold | spare | template (a forked worker's memory is read as PSS)

    def process(self) -> psutil.Process | None:
        """The recorded process if it is still the same one (not a reused pid) and not a zombie."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > CREATE_TIME_TOLERANCE:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


_FIELDS = {f.name for f in fields(WorkerRecord)}


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class WorkerRecords:
    """A directory of `<worker id>.json` files, written atomically."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, worker_id: str) -> Path:
        return self.directory / f"{worker_id}.json"

    def write(self, record: WorkerRecord) -> None:
        write_atomic(self._path(record.worker_id), json.dumps(asdict(record), indent=1))

    def remove(self, worker_id: str) -> None:
        try:
            self._path(worker_id).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list[WorkerRecord]:
        """Every readable record; unreadable ones are logged and deleted (they name nothing usable)."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                # Keys this version does not know (an older `extra`) are dropped, not fatal.
                records.append(WorkerRecord(**{k: v for k, v in data.items() if k in _FIELDS}))
            except (OSError, ValueError, TypeError, AttributeError) as error:
                log.warning("ignoring unreadable worker record %s: %s", path, error)
                path.unlink(missing_ok=True)
        return records

"""Per-worker records in the state directory, so a restarted control plane finds its workers.

Workers run in their own sessions and survive a SIGKILLed control plane. Each running worker
has a small JSON record (pid, process create time, address, spec fingerprint, log path)
written when it starts and removed when it stops. A record is a claim, never proof (issue 22):
the create time says the pid was not reused, `belongs_to_us` says the process is a worker this
user started (its owner and its launcher) and that the paths the record names are ours; only
then may the process be signalled. Adopting it further needs the worker to prove it holds its
key over the port, and to own that port (the reconciler's adoption asks for both).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import psutil
from pydantic import TypeAdapter, ValidationError

from opta_lmx.engine.files import UnreadableFile, read_regular_file
from opta_lmx.state.atomic import write_atomic
from opta_lmx.state.spec import EngineOptions
from opta_lmx.state.statedir import inside

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
    # Set when the file could not be read as a record of this version (never written): the
    # worker it names is not adopted but stopped, if its pid is still the recorded process.
    problem: str | None = None
    started_through: str = "cold"  # cold | spare | template (a forked worker's memory is read as PSS)
    kept_cache: bool = False  # its prefix cache is the model's kept one (engine/prefix_cache.py)
    warm_prompts: str | None = None

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


# What a worker's command line names (cold and spare workers run it; forked ones keep the template's).
WORKER_MODULES = ("opta_lmx.engine.worker_main", "opta_lmx.engine.template_main")


def belongs_to_us(record: WorkerRecord, process: psutil.Process, run_root: Path,
                  log_root: Path | None) -> str | None:
    """Why `process` (the record's pid, create time checked) must not be acted on, or None when it
    is a worker this user started and the record's paths lie inside this state directory."""
    try:
        if process.uids().real != os.geteuid():
            return f"pid {record.pid} belongs to uid {process.uids().real}, not to this server's user"
        cmdline = process.cmdline()
    except psutil.Error as error:
        return f"pid {record.pid} cannot be inspected ({type(error).__name__})"
    if not any(module in cmdline for module in WORKER_MODULES):
        return f"pid {record.pid} is not a worker ({' '.join(cmdline)[:120]!r})"
    if record.problem:
        return None  # unreadable otherwise: a worker of ours, to be stopped (its paths are not used)
    if Path(record.run_dir).parent != run_root or not inside(record.run_dir, run_root):
        return f"its run directory {record.run_dir!r} is not in {run_root}"
    if not (inside(record.log_path, log_root) if log_root is not None else inside(record.log_path, record.run_dir)):
        return f"its log {record.log_path!r} is not in {log_root or record.run_dir}"
    return None


_FIELDS = {f.name for f in fields(WorkerRecord)} - {"problem"}
_ENGINE_FIELDS = set(EngineOptions.model_fields)
_VALIDATOR = TypeAdapter(WorkerRecord)
RECORD_MAX_BYTES = 1024 * 1024


def parse_record(data: object, worker_id: str, run_root: Path) -> WorkerRecord | None:
    """A record from another version's JSON: unknown fields (also in `engine`) are dropped with a
    warning. One that cannot be read but still names a pid and create time comes back with
    `problem` set (its worker is stopped, not adopted); one that names no process is None."""
    if not isinstance(data, dict):
        return None
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        log.warning("worker record %s: ignoring fields this version does not know: %s", worker_id, unknown)
    known = {k: v for k, v in data.items() if k in _FIELDS}
    engine = known.get("engine")
    if isinstance(engine, dict) and set(engine) - _ENGINE_FIELDS:
        log.warning("worker record %s: ignoring engine options this version does not know: %s",
                    worker_id, sorted(set(engine) - _ENGINE_FIELDS))
        known["engine"] = {k: v for k, v in engine.items() if k in _ENGINE_FIELDS}
    try:
        record = _VALIDATOR.validate_python(known)
        EngineOptions.model_validate(record.engine)
        return record
    except (ValidationError, ValueError, TypeError) as error:
        problem = f"unreadable worker record: {str(error).splitlines()[0][:200]}"
    pid, create_time = data.get("pid"), data.get("create_time")
    if isinstance(pid, bool) or not isinstance(pid, int) or not isinstance(create_time, (int, float)) or pid <= 1:
        return None
    named = data.get("name")
    name = named if isinstance(named, str) else "unknown"
    return WorkerRecord(worker_id=worker_id, name=name, fingerprint="", source="", engine={}, pid=pid,
                        create_time=float(create_time), host="127.0.0.1", port=0, address="", log_path="",
                        run_dir=str(run_root / f"unreadable-{worker_id}"), problem=problem)


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
        # Temp files of writes cut short by a kill (write_atomic removes its own on an error):
        # only this instance writes here (it holds the state directory's lock).
        for stale in self.directory.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, worker_id: str) -> Path:
        return self.directory / f"{worker_id}.json"

    def write(self, record: WorkerRecord) -> None:
        data = {k: v for k, v in asdict(record).items() if k != "problem"}
        write_atomic(self._path(record.worker_id), json.dumps(data, indent=1))

    def remove(self, worker_id: str) -> None:
        try:
            self._path(worker_id).unlink()
        except FileNotFoundError:
            pass

    def load_all(self) -> list[WorkerRecord]:
        """Every record; one that cannot be read is deleted and, if it still names a live process,
        returned with `problem` set so its worker is stopped (never a dead loop, never an orphan)."""
        records = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data: object = json.loads(read_regular_file(path, RECORD_MAX_BYTES) or b"null")
            except (UnreadableFile, ValueError, RecursionError) as error:
                log.warning("worker record %s cannot be read: %s", path, error)
                data = None
            record = parse_record(data, path.stem, self.directory.parent)
            if record is None or record.problem:
                log.warning("deleting worker record %s: %s", path, record.problem if record else "names no process")
                path.unlink(missing_ok=True)
            if record is not None:
                records.append(record)
        return records

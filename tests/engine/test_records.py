"""Worker records and adoption without a real worker: pid reuse, stale records, rotation."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time

import psutil
import pytest

from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.records import WorkerRecord, WorkerRecords
from opta_lmx.engine.worker import Worker, rotate_log


def _record(pid: int, create_time: float, worker_id: str = "a-1234abcd-000000", run_root: str = "/tmp/run",
            **changes) -> WorkerRecord:
    record = WorkerRecord(worker_id=worker_id, name="a", fingerprint="f" * 16, source="/models/a", engine={},
                          pid=pid, create_time=create_time, host="127.0.0.1", port=1, address="http://127.0.0.1:1",
                          log_path=f"{run_root}/{worker_id}/worker.log", run_dir=f"{run_root}/{worker_id}",
                          started_at=time.time())
    return dataclasses.replace(record, **changes)


@pytest.fixture
def sleeper():
    """A stand-in for a worker left by a killed control plane: its own session, not doing much."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "opta_lmx.engine.worker_main"],
                            start_new_session=True)  # named as a worker's launcher (records.belongs_to_us)
    yield proc
    proc.kill()
    proc.wait()


def test_records_round_trip_and_removal(tmp_path):
    records = WorkerRecords(tmp_path)
    record = _record(os.getpid(), psutil.Process().create_time())
    records.write(record)
    assert records.load_all() == [record]
    records.remove(record.worker_id)
    assert records.load_all() == []
    (tmp_path / "broken.json").write_text("{not json")
    assert records.load_all() == [] and not (tmp_path / "broken.json").exists()


def test_a_reused_pid_is_not_the_recorded_process(sleeper):
    create_time = psutil.Process(sleeper.pid).create_time()
    assert _record(sleeper.pid, create_time).process() is not None
    assert _record(sleeper.pid, create_time - 5.0).process() is None  # same pid, another process
    sleeper.kill()
    sleeper.wait()
    assert _record(sleeper.pid, create_time).process() is None


def test_recover_rebuilds_live_workers_and_drops_stale_records(tmp_path, sleeper):
    pool = WorkerPool(tmp_path / "workers")
    root = str(tmp_path / "workers")
    live = _record(sleeper.pid, psutil.Process(sleeper.pid).create_time(), worker_id="a-live", run_root=root)
    reused = _record(sleeper.pid, 12345.0, worker_id="a-reused", run_root=root)
    pool.records.write(live)
    pool.records.write(reused)
    (worker,) = pool.recover().workers
    assert worker.id == "a-live" and worker.adopted and worker.pid == sleeper.pid and worker.alive()
    assert worker.spec.fingerprint == Worker.from_record(live, psutil.Process(sleeper.pid)).spec.fingerprint
    assert [r.worker_id for r in pool.records.load_all()] == ["a-live"]
    assert pool.recover().workers == []  # already known: not recovered twice

    exited = []
    pool.add_exit_listener(exited.append)
    asyncio.run(pool.stop(worker, grace=5.0))  # stops the whole process group of a non-child
    assert sleeper.wait(timeout=10) is not None
    assert pool.records.load_all() == [] and pool.workers() == []
    deadline = time.monotonic() + 5
    while not exited and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exited == [worker], "the psutil watcher did not notice the adopted worker's exit"


def test_an_adopted_worker_that_is_gone_is_never_signalled(tmp_path, sleeper):
    record = _record(sleeper.pid, psutil.Process(sleeper.pid).create_time())
    worker = Worker.from_record(record, psutil.Process(sleeper.pid))
    sleeper.kill()
    sleeper.wait()
    assert not worker.alive()
    worker.stop_sync(grace=0.1)  # must not killpg a pid that may belong to someone else by now


def test_rotate_log_by_size_keeps_n(tmp_path):
    log = tmp_path / "a.log"
    rotate_log(log, max_bytes=10, keep=2)  # nothing to rotate
    for generation in range(4):
        log.write_text(f"gen{generation} " * 10)
        rotate_log(log, max_bytes=10, keep=2)
    assert not log.exists()
    assert (tmp_path / "a.log.1").read_text().startswith("gen3")
    assert (tmp_path / "a.log.2").read_text().startswith("gen2")
    assert not (tmp_path / "a.log.3").exists()
    log.write_text("small")
    rotate_log(log, max_bytes=10, keep=2)
    assert log.read_text() == "small"

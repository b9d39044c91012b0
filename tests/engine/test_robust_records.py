"""Issue 15 item 5: worker records from another version never stop the loop or leave an orphan.

Unknown fields (also inside `engine`) are ignored with a warning and the worker is still
adopted; a record that cannot be read means "not adopted": the process it names is stopped if
it is still the recorded one (pid and create time), and left alone if the pid was reused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.records import WorkerRecords
from opta_lmx.reconciler.controller import LoopSettings, Reconciler

GOOD = {"worker_id": "a-1", "name": "a", "fingerprint": "f" * 16, "source": "/models/a", "engine": {},
        "pid": 0, "create_time": 0.0, "host": "127.0.0.1", "port": 1, "address": "http://127.0.0.1:1",
        "log_path": "/tmp/run/a-1/worker.log", "run_dir": "/tmp/run/a-1", "started_at": 1.0, "ready_at": 2.0}


@pytest.fixture
def sleeper():
    """A stand-in for a worker left by a killed control plane: its own session."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "opta_lmx.engine.worker_main"],
                            start_new_session=True)  # named as a worker's launcher (records.belongs_to_us)
    yield proc
    proc.kill()
    proc.wait()


def _write(directory, worker_id, data):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{worker_id}.json").write_text(data if isinstance(data, str) else json.dumps(data))


def test_unknown_fields_also_in_engine_are_ignored_with_a_warning(tmp_path, caplog, sleeper):
    data = {**GOOD, "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time(),
            "future_field": [1, 2], "engine": {"max_num_seqs": 4, "speculative_tree": {"depth": 3}}}
    _write(tmp_path, "a-1", data)
    with caplog.at_level(logging.WARNING):
        [record] = WorkerRecords(tmp_path).load_all()
    assert record.problem is None and record.engine == {"max_num_seqs": 4}
    assert "future_field" in caplog.text and "speculative_tree" in caplog.text
    pool = WorkerPool(Path("/tmp/run"))
    pool.records = WorkerRecords(tmp_path)
    [worker] = pool.recover().workers
    assert worker.unadoptable is None and worker.spec.engine.max_num_seqs == 4


@pytest.mark.parametrize("broken", [
    {"engine": "not a mapping"},
    {"port": "eighty"},
    {"engine": {"max_num_seqs": "many"}},
    {"worker_id": None, "source": None},
])
def test_an_unreadable_record_stops_its_worker_and_the_loop_goes_on(tmp_path, sleeper, broken):
    state = tmp_path / "workers"
    data = {**GOOD, "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time(), **broken}
    _write(state / "records", "a-1", data)
    (tmp_path / "models.yaml").write_text("models: []\n")
    pool = WorkerPool(state)
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(stop_grace=5))

    async def scenario():
        await reconciler.reconcile_once()
        await reconciler.reconcile_once()

    asyncio.run(scenario())
    assert sleeper.wait(timeout=10) is not None  # stopped, not adopted and not left running
    assert not list((state / "records").glob("*.json"))
    assert any(e.reason == "StoppedLeftover" and "unreadable worker record" in e.message
               for e in reconciler.events.since())


def test_an_unreadable_record_of_a_reused_pid_stops_nothing(tmp_path, sleeper):
    data = {**GOOD, "pid": sleeper.pid, "create_time": psutil.Process(sleeper.pid).create_time() - 50,
            "engine": 7}
    _write(tmp_path / "run" / "records", "a-1", data)
    pool = WorkerPool(tmp_path / "run")
    assert pool.recover().workers == []
    assert sleeper.poll() is None and not list((tmp_path / "run" / "records").glob("*.json"))


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "null", "", "\udcff"[:0] + "\x00\x01"])
def test_garbage_records_are_deleted_without_raising(tmp_path, text):
    _write(tmp_path, "x", text)
    assert WorkerRecords(tmp_path).load_all() == []
    assert not (tmp_path / "x.json").exists()


def test_a_record_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    os.mkfifo(tmp_path / "x.json")
    assert WorkerRecords(tmp_path).load_all() == []


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_a_full_disk_leaves_no_temp_files(tmp_path, monkeypatch, where):
    """ENOSPC (or EMFILE) while writing a record raises to the caller (the load backs off) and
    leaves no `*.tmp` behind; temp files a kill left are swept when the records are opened."""
    import errno
    import os

    from opta_lmx.engine.records import WorkerRecord
    from opta_lmx.state import atomic

    records = WorkerRecords(tmp_path)
    record = WorkerRecord(**{**GOOD, "pid": os.getpid(), "create_time": psutil.Process().create_time()})

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "write":
        monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FullFile(fd))
    else:
        monkeypatch.setattr(atomic.os, where, full)
    for _ in range(20):
        with pytest.raises(OSError):
            records.write(record)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".a-1.json.killed.tmp").write_text("{")
    WorkerRecords(tmp_path)
    assert list(tmp_path.iterdir()) == []


_REAL_FDOPEN = __import__("os").fdopen


class _FullFile:
    def __init__(self, fd):
        self._file = _REAL_FDOPEN(fd, "wb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def write(self, _data):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

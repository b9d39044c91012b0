"""Stopping a worker: SIGTERM then SIGKILL after the grace; a drained worker (grace 0) is killed at once."""

from __future__ import annotations

import asyncio
import sys
import time

import psutil

from opta_lmx.engine.worker import Worker, WorkerSpec

# A stand-in worker that notes a SIGTERM in its log and keeps running for a while after it
# (a graceful shutdown that takes time), plus a child in its process group.
SCRIPT = """
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
def on_term(*_):
    print("got SIGTERM", flush=True)
    time.sleep(1.5)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("up", child.pid, flush=True)
time.sleep(60)
"""


class ScriptWorker(Worker):
    def command(self) -> list[str]:
        return [sys.executable, "-c", SCRIPT]


def _started(tmp_path, name: str) -> tuple[Worker, list[psutil.Process]]:
    worker = ScriptWorker(WorkerSpec(name, "/models/x"), run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    worker.spawn()
    deadline = time.monotonic() + 30
    while "up" not in worker.log_tail() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "up" in worker.log_tail()
    return worker, [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]


def _gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)


def test_a_drained_worker_is_killed_at_once_without_sigterm(tmp_path):
    worker, group = _started(tmp_path, "drained")
    assert len(group) == 2
    asyncio.run(worker.stop(grace=0))
    assert _gone(group), "the worker or its child outlived the stop"
    assert "got SIGTERM" not in worker.log_tail()  # no graceful shutdown was asked for


def test_a_worker_with_requests_left_gets_sigterm_and_its_grace(tmp_path):
    worker, group = _started(tmp_path, "busy")
    asyncio.run(worker.stop(grace=10))
    assert _gone(group)
    assert "got SIGTERM" in worker.log_tail()  # asked to shut down gracefully first

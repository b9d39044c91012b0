"""A worker process's own port, its readiness and its stop (stand-in processes and servers).

A port is never given to two live workers; readiness is this worker's server answering, not
whatever listens on its port; stopping is SIGTERM then SIGKILL after the grace, and a drained
worker (grace 0) is killed at once."""

from __future__ import annotations

import asyncio
import sys
import time

import psutil

from opta_lmx.engine.worker import Worker, WorkerSpec
from tests.engine.standins import health_server

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


def test_two_workers_never_get_the_same_port_even_if_the_kernel_offers_it_twice(monkeypatch):
    """Seen in CI: two cold workers started together were both given one port by bind(0)."""
    from opta_lmx.engine import ports as worker_module

    offered = iter([40001, 40001, 40001, 40002])

    class KernelOffersTwice:
        def __init__(self, *_args):
            self.port = next(offered)

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            return False

        def bind(self, _address):
            """Binding succeeds; the port comes from getsockname."""

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(worker_module.socket, "socket", KernelOffersTwice)
    first = worker_module.free_tcp_port()
    second = worker_module.free_tcp_port()
    assert (first, second) == (40001, 40002)
    worker_module.release_port(first)
    worker_module.release_port(second)


def test_readiness_is_this_workers_own_server_not_whatever_answers_on_its_port(tmp_path):
    """A /health that names another served model (another worker on the port) is not this worker's."""
    with health_server(b'{"status": "healthy", "model_loaded": true, "model_name": "b"}') as port:
        assert asyncio.run(Worker(WorkerSpec("a", "/m/a"), run_dir=tmp_path, port=port).healthy()) is False
        assert asyncio.run(Worker(WorkerSpec("b", "/m/b"), run_dir=tmp_path, port=port).healthy()) is True

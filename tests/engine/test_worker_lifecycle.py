"""A worker process's own port, its readiness and its stop (stand-in processes and servers).

A port is never given to two live workers; readiness is this worker's server answering, not
whatever listens on its port; stopping is SIGTERM then SIGKILL after the grace, and a drained
worker (grace 0) is killed at once."""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import time

import psutil
import pytest

from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
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
    def command(self, *_fds) -> list[str]:
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


def test_a_workers_port_is_bound_by_the_control_plane_before_the_worker_exists(tmp_path):
    """Issue 22: no one can take a worker's port first (and the kernel never hands one port to
    two workers, as bind(0) once did to two cold workers started together)."""
    first = Worker(WorkerSpec("a", "/m/a"), run_dir=tmp_path)
    second = Worker(WorkerSpec("b", "/m/b"), run_dir=tmp_path)
    try:
        assert first.port != second.port
        for port in (first.port, second.port):
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError) as refused:
                squatter.bind(("127.0.0.1", port))
            squatter.close()
            assert refused.value.errno == errno.EADDRINUSE
    finally:
        first.close_listener()
        second.close_listener()


def test_a_stand_in_served_on_the_inherited_socket_is_the_only_server_on_the_port(tmp_path):
    """The cold launcher's half: the worker serves on the socket it is given (fd), never binds."""
    worker = FdWorker(WorkerSpec("a", "/m/a"), run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    worker.spawn()
    try:
        assert asyncio.run(worker.wait_ready(30)) is None and asyncio.run(worker.healthy())
    finally:
        asyncio.run(worker.stop(grace=0))


# A stand-in that serves /health on the socket it inherits (the fd after --listen-fd), like worker_main.
FD_SCRIPT = """
import http.server, json, socket, sys
fd = int(sys.argv[sys.argv.index("--listen-fd") + 1])
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "healthy", "model_loaded": True, "model_name": "a"}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer(("127.0.0.1", 0), Health, bind_and_activate=False)
server.socket.close()
server.socket = socket.socket(fileno=fd)
server.serve_forever()
"""


class FdWorker(Worker):
    def command(self, announce_fd: int, listen_fd: int) -> list[str]:
        return [sys.executable, "-c", FD_SCRIPT, "--listen-fd", str(listen_fd)]


def test_readiness_is_this_workers_own_server_not_whatever_answers_on_its_port(tmp_path):
    """A /health that names another served model (another worker on the port) is not this worker's."""
    with health_server(b'{"status": "healthy", "model_loaded": true, "model_name": "b"}') as port:
        assert asyncio.run(Worker(WorkerSpec("a", "/m/a"), run_dir=tmp_path, port=port).healthy()) is False
        assert asyncio.run(Worker(WorkerSpec("b", "/m/b"), run_dir=tmp_path, port=port).healthy()) is True


def test_a_server_that_cannot_prove_the_workers_key_is_never_ready(tmp_path):
    """Readiness proves identity: a process answering /health for the model on the worker's own
    socket, but without the worker's key (it cannot answer /lmx/identity), is not the worker."""
    from opta_lmx.engine.worker_auth import ensure_secret

    ensure_secret(tmp_path / "run")
    worker = FdWorker(WorkerSpec("a", "/m/a"), run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    assert worker.api_key()
    worker.spawn()
    try:
        with pytest.raises(WorkerStartError, match="not ready after 2s"):
            asyncio.run(worker.wait_ready(2))
        assert not asyncio.run(worker.healthy())
    finally:
        asyncio.run(worker.stop(grace=0))

"""Measuring every worker each pass (issue 19): concurrently, off the event loop, bounded; on Metal
each worker's MLX active + cache memory is asked for, so a growing KV cache reaches the plan."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import threading
import time

import pytest

from opta_lmx.engine import pool as pool_module
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import WorkerSpec
from tests.engine.test_worker_lifecycle import ScriptWorker, _started

GiB = 1024**3


@contextlib.contextmanager
def status_server(metal: dict):
    """A stand-in worker's /v1/status reporting `metal` (a dict the test may change meanwhile)."""

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            body = json.dumps({"metal": metal}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            """No access log on the test's output."""

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def _pool_with(tmp_path, *workers) -> WorkerPool:
    pool = WorkerPool(tmp_path / "pool")
    for worker in workers:
        pool._workers[worker.id] = worker  # started by the test, measured by the pool
    return pool


def test_every_live_worker_is_measured_and_the_helpers_too(tmp_path):
    first, _ = _started(tmp_path, "one")
    second, _ = _started(tmp_path, "two")
    pool = _pool_with(tmp_path, first, second)
    try:
        figures = asyncio.run(pool.measure())
        assert set(figures.workers) == {first.id, second.id}
        assert all(f.process_bytes > 1024**2 and f.mlx_bytes == 0 for f in figures.workers.values())
        assert figures.helper.mode == "cold" and figures.helper.forked_workers == 0
    finally:
        asyncio.run(pool.stop_all(0))


def test_on_metal_the_mlx_buffers_are_read_every_pass_so_kv_growth_is_seen(tmp_path, monkeypatch):
    """Run on Linux against recorded Metal figures: vllm-mlx's /v1/status shape, `metal` block."""
    monkeypatch.setattr(pool_module, "metal_backend", lambda: True)
    metal = {"active_memory_gb": 1.5, "cache_memory_gb": 0.5}
    worker, _ = _started(tmp_path, "metal")
    with status_server(metal) as port:
        worker.address, worker.ready_at = f"http://127.0.0.1:{port}", time.time()
        pool = _pool_with(tmp_path, worker)
        try:
            first = asyncio.run(pool.measure()).workers[worker.id]
            assert first.mlx_bytes == 2 * GiB and first.counted_bytes == first.process_bytes + 2 * GiB
            metal["active_memory_gb"] = 3.5  # the KV cache grew
            assert asyncio.run(pool.measure()).workers[worker.id].mlx_bytes == 4 * GiB
        finally:
            asyncio.run(pool.stop_all(0))


def test_a_worker_that_cannot_be_measured_is_left_out_and_a_hung_read_does_not_hold_the_pass(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "MEASURE_TIMEOUT", 0.5)
    good, _ = _started(tmp_path, "good")
    broken, _ = _started(tmp_path, "broken")
    hung, _ = _started(tmp_path, "hung")

    def raises():
        raise OSError("no /proc")

    broken.memory_bytes = raises
    hung.memory_bytes = lambda: time.sleep(3) or 1
    pool = _pool_with(tmp_path, good, broken, hung)
    try:
        started = time.monotonic()
        figures = asyncio.run(pool.measure())
        assert time.monotonic() - started < 2.5  # bounded: the hung read is abandoned, not awaited
        assert set(figures.workers) == {good.id}
    finally:
        asyncio.run(pool.stop_all(0))


@pytest.mark.parametrize("through", ["template", "cold"])
def test_a_forked_worker_is_measured_by_its_own_pages(tmp_path, through, monkeypatch):
    """`Worker.memory_bytes` asks for unique pages when the worker was forked from the template."""
    calls = []
    monkeypatch.setattr("opta_lmx.engine.worker.tree_bytes", lambda pid, private=False: calls.append(private) or 1)
    worker = ScriptWorker(WorkerSpec("f", "/models/x"), run_dir=tmp_path / "run")
    worker.started_through = through
    worker.alive = lambda: True
    worker._adopted = type("P", (), {"pid": 4242})()
    assert worker.memory_bytes() == 1 and calls == [through == "template"]

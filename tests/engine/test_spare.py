"""Spare workers and the worker template, with real processes and tiny generated models.

A spare (or template) that dies is replaced; a worker started through either serves its own
model under its own name; nothing outlives a stop or the control plane; such a worker is
adopted after a control-plane crash like a cold one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.spare import SpareWorkers, worker_environment
from opta_lmx.engine.template import WorkerTemplate, fork_supported
from opta_lmx.engine.worker import Worker, WorkerSpec

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e
PATHS = ["spare", pytest.param("template", marks=pytest.mark.skipif(not fork_supported(), reason="Linux only"))]


def wait_for(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def waiting_spare(spares: SpareWorkers, other_than: int | None = None):
    return wait_for(lambda: next((s for s in spares.spares()
                                  if s.waiting and s.alive() and s.pid != other_than), None),
                    what="a waiting spare")


def ask(address: str, name: str) -> httpx.Response:
    return httpx.post(f"{address}/v1/chat/completions", timeout=60, json={
        "model": name, "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6, "temperature": 0})


def test_a_spare_that_dies_is_replaced(tmp_path):
    spares = SpareWorkers(tmp_path / "spares", worker_environment(), count=1)
    try:
        spares.fill()
        first = waiting_spare(spares)
        os.killpg(first.pid, signal.SIGKILL)
        second = waiting_spare(spares, other_than=first.pid)
        assert spares.replaced == 1 and gone(first.pid)
        assert [s.pid for s in spares.spares()] == [second.pid]
    finally:
        spares.close()
    assert gone(second.pid)


@pytest.mark.parametrize("path", PATHS)
def test_workers_started_fast_serve_their_own_model_under_their_own_name(tmp_path, tiny_model, tiny_model_b, path):
    async def scenario():
        spares = SpareWorkers(tmp_path / "spares", worker_environment(), count=1, refill_delay=0.5)
        template = WorkerTemplate(tmp_path / "template", worker_environment()) if path == "template" else None
        workers: list[Worker] = []
        try:
            if template is not None:
                template.ensure()
                await asyncio.to_thread(wait_for, template.waiting.is_set, 180, "the template")
            else:
                spares.fill()
            for name, source in (("alpha", tiny_model), ("beta", tiny_model_b)):
                worker = Worker(WorkerSpec(name, str(source)), run_dir=tmp_path / "run")
                if template is not None:
                    prepared = template
                else:
                    prepared = await asyncio.to_thread(waiting_spare, spares)
                    assert spares.take(worker.environment()) is prepared
                worker.spawn(prepared)
                workers.append(worker)
                await worker.wait_ready(120)
                assert worker.spare_id == prepared.id and os.getpgid(worker.pid) == worker.pid
                assert (worker.pid == prepared.pid) == (path == "spare")
            answers = {}
            for worker in workers:
                name = worker.spec.name
                response = await asyncio.to_thread(ask, worker.address, name)
                assert response.status_code == 200, response.text
                assert response.json()["model"] == name
                answers[name] = response.json()["choices"][0]["message"]["content"]
                listed = httpx.get(f"{worker.address}/v1/models", timeout=10).json()
                assert [m["id"] for m in listed["data"]] == [name]
                assert f"Loading model: {worker.spec.source}" in worker.log_tail(20000)
            # Different weights and tokenizers: a worker serving the wrong files would answer alike.
            assert answers["alpha"] != answers["beta"]
            pids = [w.pid for w in workers] + [s.pid for s in spares.spares()] + [template.pid if template else None]
        finally:
            for worker in workers:
                await worker.stop(grace=5)
            spares.close()
            if template is not None:
                template.close()
        assert all(gone(pid) for pid in pids if pid is not None)

    asyncio.run(scenario())


CONTROL_PLANE = textwrap.dedent("""
    import asyncio, json, sys, time
    from pathlib import Path
    from opta_lmx.engine.pool import WorkerPool
    from opta_lmx.engine.spare import SpareWorkers, worker_environment
    from opta_lmx.engine.worker import Worker, WorkerSpec

    from opta_lmx.engine.template import WorkerTemplate

    run, source, path = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    async def main():
        pool = WorkerPool(run)
        spares = SpareWorkers(run / "spares", worker_environment(), count=1)
        spares.fill()
        template = WorkerTemplate(run / "template", worker_environment())
        template.ensure()
        while not [s for s in spares.spares() if s.waiting] or not template.waiting.is_set():
            time.sleep(0.05)
        worker = Worker(WorkerSpec("tiny", source), run_dir=pool.run_dir)
        worker.spawn(spares.take(worker.environment()) if path == "spare" else template)
        pool.records.write(worker.record())
        await worker.wait_ready(120)
        pool.records.write(worker.record())
        spares.fill()
        while not [s for s in spares.spares() if s.waiting]:
            time.sleep(0.05)
        print(json.dumps({"worker": worker.pid, "spares": [s.pid for s in spares.spares()] + [template.pid]}),
              flush=True)
        time.sleep(600)

    asyncio.run(main())
""")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
@pytest.mark.parametrize("path", PATHS)
def test_control_plane_death_leaves_no_spare_and_its_worker_is_adopted(tmp_path, tiny_model, how, path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", CONTROL_PLANE, str(tmp_path / "run"), str(tiny_model), path],
                            stdout=subprocess.PIPE, env=env, cwd=REPO)
    try:
        line = wait_for(proc.stdout.readline, timeout=180, what="the control plane's report")
        pids = json.loads(line)
    finally:
        proc.send_signal(how)
        proc.wait(timeout=30)
    assert pids["spares"]
    wait_for(lambda: all(gone(pid) for pid in pids["spares"]), timeout=30, what="spares and template to exit")

    async def adopt():
        pool = WorkerPool(tmp_path / "run")
        [worker] = pool.recover().workers
        try:
            assert worker.pid == pids["worker"] and worker.adopted
            assert await worker.healthy()
            response = await asyncio.to_thread(ask, worker.address, "tiny")
            assert response.status_code == 200 and response.json()["model"] == "tiny"
        finally:
            await pool.stop(worker, grace=5)
        assert gone(pids["worker"])

    asyncio.run(adopt())


@pytest.mark.skipif(not fork_supported(), reason="Linux only")
def test_a_template_that_dies_is_restarted(tmp_path):
    template = WorkerTemplate(tmp_path / "template", worker_environment())
    try:
        template.ensure()
        wait_for(template.waiting.is_set, what="the template")
        first = template.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not template.alive(), timeout=10, what="the template to die")
        template.ensure()
        wait_for(template.waiting.is_set, what="the restarted template")
        second = template.pid
        assert second != first and template.restarts == 1
    finally:
        template.close()
    assert gone(first) and gone(second)


@pytest.mark.skipif(not fork_supported(), reason="Linux only")
def test_a_template_closed_while_it_warms_up_stops_at_once_with_its_warm_up(tmp_path, tiny_model):
    template = WorkerTemplate(tmp_path / "template", worker_environment(), warm_up_model=tiny_model)
    template.ensure()
    first = template.pid
    warm_up = wait_for(lambda: psutil.Process(first).children(), timeout=60, what="the warm-up child")
    closer = threading.Thread(target=template.close)
    closer.start()
    closer.join(30)
    assert not closer.is_alive(), "close() hung on a template that was still warming up"
    wait_for(lambda: gone(first) and all(gone(c.pid) for c in warm_up), timeout=10, what="template and warm-up gone")

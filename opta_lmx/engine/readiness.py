"""When a worker counts as serving, and why one that does not is a permanent failure or a retry.

A worker is ready once it said it serves (engine/worker_main.py announces on its pipe), `/health`
answers with its model loaded under its own served name, and it proves it holds its key
(engine/worker_auth.py): another process answering on its port, or the one a planted record
names, is never taken for it. One that ends before that says why (`failed permanent|temporary`)
or its exit code does (PERMANENT_EXIT); a worker that dies without saying (killed, out of
memory) is worth a retry. Never guessed from words in its log (issue 20).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpx
import psutil

from opta_lmx.engine.worker_auth import loopback_client, proves_identity
from opta_lmx.engine.worker_log import last_error_line
from opta_lmx.engine.worker_main import PERMANENT_EXIT

if TYPE_CHECKING:
    from opta_lmx.engine.worker import Worker


class WorkerStartError(Exception):
    """A worker did not become ready. `permanent` errors are not worth retrying unchanged."""

    def __init__(self, message: str, *, permanent: bool, log_tail: str = ""):
        super().__init__(message)
        self.permanent = permanent
        self.log_tail = log_tail


async def wait_ready(worker: Worker, timeout: float) -> None:
    """Return once `worker` is ready (above); raise WorkerStartError otherwise."""
    deadline = time.monotonic() + timeout
    announced = asyncio.Event()
    loop = asyncio.get_running_loop()
    def wake() -> None:
        loop.call_soon_threadsafe(announced.set)

    worker._wake = wake
    if worker._served_announced:
        announced.set()
    async with loopback_client(2.0) as client:
        while True:
            if worker.failure is not None or not worker.alive():
                raise await start_error(worker)
            if (announced.is_set() or not worker._announces) and await serves(client, worker) \
                    and await proves(client, worker):
                worker.ready_at = time.time()
                return
            if time.monotonic() > deadline:
                tail = worker.log_tail()
                await worker.stop(grace=2.0)
                raise WorkerStartError(f"worker not ready after {timeout:.0f}s", permanent=False, log_tail=tail)
            if announced.is_set():  # announced but /health not yet right: poll, do not spin
                await asyncio.sleep(0.05)
                continue
            try:  # it announces when it serves: no polling delay
                async with asyncio.timeout(0.1):
                    await announced.wait()
            except TimeoutError:
                pass


async def start_error(worker: Worker) -> WorkerStartError:
    """Why `worker` did not become ready, as it said; its log gives the message a person reads."""
    if worker.failure is None and worker._announcements is not None:
        await asyncio.to_thread(worker._announcements.ended.wait, 1.0)  # its last words may be in the pipe
    await asyncio.to_thread(worker._exited.wait, 2.0)
    tail = worker.log_tail()
    if worker.failure is not None:
        permanent, reason = worker.failure
    else:
        code = worker.returncode
        permanent, reason = code == PERMANENT_EXIT, f"worker exited with code {code} while loading"
    if worker.alive():
        await worker.stop(grace=2.0)
    line = last_error_line(tail)
    return WorkerStartError(f"{reason}: {line}" if line and line not in reason else reason,
                            permanent=permanent, log_tail=tail)


async def serves(client: httpx.AsyncClient, worker: Worker) -> bool:
    """`/health` answers 200 with the model loaded, under this worker's served name (another
    process on the port, say another model's worker, is not this one)."""
    try:
        response = await client.get(f"{worker.address}/health")
        body = response.json()
        return (response.status_code == 200 and bool(body.get("model_loaded"))
                and body.get("model_name") in (None, worker.spec.name))
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


async def proves(client: httpx.AsyncClient, worker: Worker) -> bool:
    """The server on the worker's port holds the worker's key; without a secret (a pool with no
    keys) there is nothing to prove."""
    key = worker.api_key()
    return True if key is None else await proves_identity(client, worker.address, key)


async def healthy(worker: Worker, timeout: float = 2.0) -> bool:
    """Serves and proves (used to adopt a previous run's worker)."""
    async with loopback_client(timeout) as client:
        return await serves(client, worker) and await proves(client, worker)


def owns_port(pid: int | None, port: int) -> bool:
    """Whether process `pid` (not another) listens on `port` (reads /proc: off the event loop)."""
    if pid is None:
        return False
    try:
        listening = [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except (psutil.Error, TypeError, ValueError):
        return False
    return any(c.laddr and c.laddr.port == port for c in listening)

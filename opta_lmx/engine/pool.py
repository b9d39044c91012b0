"""The set of running workers, and the only code that starts or stops them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import psutil

from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        run_dir: Path,
        *,
        worker_env: dict[str, str] | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._workers: dict[str, Worker] = {}
        self._exit_listeners: list[Callable[[Worker], None]] = []
        self._worker_env = worker_env or {}

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    async def start(self, spec: WorkerSpec, ready_timeout: float) -> Worker:
        """Start a worker and wait until it serves; on failure nothing is left running."""
        worker = Worker(spec, run_dir=self.run_dir, env=self._worker_env, on_exit=self._exited)
        self._workers[worker.id] = worker
        try:
            worker.spawn()
            await worker.wait_ready(ready_timeout)
        except WorkerStartError:
            await worker.stop(grace=2.0)
            self._workers.pop(worker.id, None)
            raise
        except BaseException:  # cancelled while loading: leave nothing behind
            await asyncio.shield(worker.stop(grace=2.0))
            self._workers.pop(worker.id, None)
            raise
        return worker

    async def stop(self, worker: Worker, grace: float) -> None:
        await worker.stop(grace=grace)
        self._workers.pop(worker.id, None)

    def forget(self, worker: Worker) -> None:
        """Drop a worker that has exited by itself."""
        self._workers.pop(worker.id, None)

    async def stop_all(self, grace: float) -> None:
        await asyncio.gather(*(self.stop(w, grace) for w in self.workers()), return_exceptions=True)

    def stop_all_sync(self, grace: float) -> None:
        for worker in self.workers():
            worker.stop_sync(grace)
            self._workers.pop(worker.id, None)

    def add_exit_listener(self, listener: Callable[[Worker], None]) -> None:
        """Called (from a waiter thread) whenever a worker process exits."""
        self._exit_listeners.append(listener)

    def _exited(self, worker: Worker) -> None:
        for listener in self._exit_listeners:
            listener(worker)


def machine_memory() -> dict[str, int]:
    vm = psutil.virtual_memory()
    return {"total": vm.total, "available": vm.available, "used": vm.total - vm.available}

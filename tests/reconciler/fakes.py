"""A stand-in pool of workers (no processes) that satisfies engine.pool.Pool, for the loop's tests."""

from __future__ import annotations

import asyncio
import itertools
from typing import TYPE_CHECKING

from opta_lmx.engine.memory import WorkerMemory
from opta_lmx.engine.pool import Measurements, Recovered
from opta_lmx.engine.prepared import HelperMemory

MiB = 1024**2
_pids = itertools.count(50000)


class FakeWorker:
    """A worker without a process (engine.pool.WorkerHandle; the type checker holds it to it)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.id: str = f"{spec.name}-{next(_pids)}" if spec is not None else "w"
        self.pid: int | None = next(_pids)
        self.address: str = "http://127.0.0.1:9"
        self.port: int = 9
        self.started_at: float | None = 0.0
        self.ready_at: float | None = 0.0
        self.load_seconds: float | None = 0.1
        self.started_through: str = "cold"
        self.spare_id: str | None = None
        self.stopping: bool = False
        self.adopted: bool = False
        self.unadoptable: str | None = None
        self.returncode: int | None = None
        self._alive = True
        self.forked: bool = False  # started through a waiting template (the pool's `helper` says so)
        self.memory = 100 * MiB

    def alive(self) -> bool:
        return self._alive

    def api_key(self) -> str | None:
        return None  # a pool without a secret: its workers have no key

    def owns_port(self) -> bool:
        return self._alive

    async def healthy(self, timeout: float = 2.0) -> bool:
        return self._alive

    def memory_bytes(self) -> int | None:
        return self.memory if self._alive else None

    def crash(self) -> None:
        self._alive, self.returncode = False, -9


class FakePool:
    """Starts FakeWorkers at once; a test may set `start_error` to make starts raise."""

    def __init__(self):
        self.clock = lambda: 1.0
        self._workers = {}
        self.started, self.stopped = [], []
        self.graces: list[float] = []  # the grace each stop was given (0: killed at once, drained)
        self.attempts = 0
        self.start_error: BaseException | None = None
        self.helper = HelperMemory()  # what the fast starts hold (none by default)...
        self.helpers: dict[str, HelperMemory] = {}  # ...and once configured to a mode: a test's figures
        self.configured: list[str] = []  # every mode the loop asked for, in order

    def add_exit_listener(self, _listener):
        return None  # the tests drive exits themselves

    def recover(self):
        return Recovered()

    def workers(self):
        return list(self._workers.values())

    def get(self, worker_id):
        return self._workers.get(worker_id)

    async def start(self, spec, _timeout):
        self.attempts += 1
        if self.start_error is not None:
            raise self.start_error
        worker = FakeWorker(spec)
        worker.forked = self.helper.mode == "template" and self.helper.waiting > 0
        worker.started_at = worker.ready_at = self.clock()
        self._workers[worker.id] = worker
        self.started.append(spec.name)
        return worker

    async def stop(self, worker, grace):
        self.graces.append(grace)
        worker.stopping, worker._alive = True, False
        self._workers.pop(worker.id, None)
        self.stopped.append(worker.spec.name)

    def forget(self, worker):
        self._workers.pop(worker.id, None)

    def configure_starts(self, wanted):
        self.engine_start = wanted
        mode = wanted.mode if wanted is not None else "cold"
        if not self.configured or self.configured[-1] != mode:
            self.configured.append(mode)
        if mode in self.helpers:
            self.helper = self.helpers[mode]
        elif mode == "cold":
            self.helper = HelperMemory(forked_workers=self.helper.forked_workers)

    def configure_caches(self, per_model, total):
        self.cache_budgets = (per_model, total)

    async def clear_caches(self, model):
        return [], []

    async def measure(self):
        """Each live worker at its `memory_bytes()` (one that raises is left out, as the real pool
        does: it keeps its last figure); the helpers as a test sets `helper`."""
        figures = {}
        for worker in [w for w in self._workers.values() if w.alive()]:
            try:
                figures[worker.id] = WorkerMemory(worker.memory_bytes())
            except Exception:  # noqa: BLE001 - the fault injection's own
                continue
        return Measurements(figures, self.helper)

    async def stop_all(self, grace):
        for worker in self.workers():
            await self.stop(worker, grace)


async def until(condition, bound=20.0):
    """Poll until `condition()` holds; a bound, not a measurement: the test fails if it never does."""
    async with asyncio.timeout(bound):
        while not condition():
            await asyncio.sleep(0.01)


if TYPE_CHECKING:  # the type checker holds the fakes to the Protocols they stand in for (tests/test_types.py)
    from opta_lmx.engine.pool import Pool, WorkerHandle

    _pool: Pool = FakePool()
    _worker: WorkerHandle = FakeWorker(None)

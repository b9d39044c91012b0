"""The set of running workers, and the only code that starts or stops them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from opta_lmx.engine.memory import ModelDirectoryError, WorkerMemory, metal_backend, mlx_memory_bytes, model_directory
from opta_lmx.engine.prefix_cache import CacheFigures, KeptCaches, cache_key, warm_prompts_problem
from opta_lmx.engine.distributed import DistributedWorker
from opta_lmx.engine.prepared import HelperMemory, PreparedStarts
from opta_lmx.engine.records import WorkerRecords, belongs_to_us
from opta_lmx.engine.template import TemplateError
from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
from opta_lmx.state.statedir import inside
from opta_lmx.state.spec import EngineStart

log = logging.getLogger(__name__)

#: How long one pass's measurement of every worker may take; a worker not measured by then keeps
#: its last figure (a stuck /proc read or a slow /v1/status never holds the pass up longer).
MEASURE_TIMEOUT = 5.0
#: Kept prefix caches are read from disk (a directory walk) at most this often.
CACHE_FIGURES_EVERY = 10.0


@dataclass(frozen=True)
class Measurements:
    """One pass's figures: each worker measured now (missing: could not be), and the helpers."""

    workers: dict[str, WorkerMemory] = field(default_factory=dict)
    helper: HelperMemory = field(default_factory=HelperMemory)
    caches: dict[str, CacheFigures] = field(default_factory=dict)  # each model's kept prefix cache


@dataclass(frozen=True)
class RejectedRecord:
    """A worker record that did not prove its process is ours: deleted, its pid never signalled."""

    worker_id: str
    name: str
    why: str


@dataclass(frozen=True)
class Recovered:
    """A previous run's workers (to adopt or stop) and the records that were rejected."""

    workers: Sequence[WorkerHandle] = field(default_factory=list)
    rejected: list[RejectedRecord] = field(default_factory=list)


class WorkerHandle(Protocol):
    """What the loop and the gateway use of a worker (engine/worker.py's Worker; the tests' FakeWorker)."""

    id: str
    spec: WorkerSpec
    address: str
    port: int
    started_at: float | None
    ready_at: float | None
    started_through: str
    spare_id: str | None
    stopping: bool
    adopted: bool
    unadoptable: str | None  # a previous run's worker whose record could not be read: stopped, not adopted

    @property
    def pid(self) -> int | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def load_seconds(self) -> float | None: ...

    @property
    def forked(self) -> bool: ...

    def alive(self) -> bool: ...

    def api_key(self) -> str | None: ...

    def memory_bytes(self) -> int | None: ...

    def owns_port(self) -> bool: ...

    async def healthy(self, timeout: float = 2.0) -> bool: ...


@runtime_checkable
class Pool(Protocol):
    """What the control loop needs of a pool of workers, so its tests can stand in a fake one."""

    def workers(self) -> Sequence[WorkerHandle]: ...

    def get(self, worker_id: str) -> WorkerHandle | None: ...

    async def start(self, spec: WorkerSpec, ready_timeout: float) -> WorkerHandle: ...

    def recover(self) -> Recovered: ...

    async def stop(self, worker: WorkerHandle, grace: float) -> None: ...

    def forget(self, worker: WorkerHandle) -> None: ...

    async def stop_all(self, grace: float) -> None: ...

    def add_exit_listener(self, listener: Callable[[WorkerHandle], None]) -> None: ...

    def configure_starts(self, wanted: EngineStart | None) -> None: ...

    async def measure(self) -> Measurements: ...

    def configure_caches(self, per_model: int, total: int) -> None: ...

    async def clear_caches(self, model: str | None) -> tuple[list[str], list[str]]: ...


class WorkerPool:
    """The pool of real worker processes (implements `Pool`)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        worker_env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        warm_up_model: Path | None = None,
        caches: KeptCaches | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Kept prefix caches (engine/prefix_cache.py): a worker of a model that keeps one is linked
        # to it as it starts, and gives it up once its process is gone (saved, or crashed).
        self.caches = caches
        self._cache_figures: dict[str, CacheFigures] = {}
        self._cache_figures_at = float("-inf")
        # Records live beside the workers' directories so a restart on this state dir finds them.
        self.records = WorkerRecords(self.run_dir / "records")
        self.log_dir = Path(log_dir) if log_dir else None
        self._workers: dict[str, Worker] = {}
        self._exit_listeners: list[Callable[[Worker], None]] = []
        self._worker_env = worker_env or {}
        self._stopping: set[asyncio.Future] = set()  # stops of cancelled starts, kept until done
        # The template or spares that start workers faster (cold until configure_starts).
        self.prepared = PreparedStarts(self.run_dir, self._worker_env, warm_up_model=warm_up_model)
        # Nothing that blocks runs on the event loop that relays every token (issue 20), and each
        # kind of work has threads of its own, so that none waits behind another: measuring (/proc,
        # a forked worker's smaps), starting (process starts, the template's fork handshake of up
        # to 10 s, record writes with fsync), cleaning up (removing a worker's home), and switching
        # the fast starts (closing a template waits for it to exit).
        self._measuring = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmx-measure")
        self._starting = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lmx-start")
        self._cleaning = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmx-cleanup")
        self._configuring = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmx-configure")

    def configure_starts(self, wanted: EngineStart | None) -> None:
        """models.yaml's `engine_start` as the loop chose it, applied every pass (also restarts a
        template or spares that died), in a thread of its own: the pass does not wait for it."""
        try:
            self._configuring.submit(self.prepared.configure, wanted)
        except RuntimeError:  # shut down: the server is stopping
            pass

    async def measure(self) -> Measurements:
        """Every live worker and the helpers, measured concurrently off the event loop, at most
        MEASURE_TIMEOUT seconds; on Metal each worker's MLX active + cache memory is asked too, so a
        growing KV cache reaches the plan."""
        loop = asyncio.get_running_loop()
        workers = [w for w in self.workers() if w.alive()]
        reads = {w.id: loop.run_in_executor(self._measuring, w.memory_bytes) for w in workers}
        helper = loop.run_in_executor(self._measuring, self._helper_memory)
        metal = {w.id: asyncio.ensure_future(mlx_memory_bytes(w.address, key=w.api_key()))
                 for w in workers if metal_backend() and w.ready_at is not None}
        pending: list[asyncio.Future] = [*reads.values(), helper, *metal.values()]
        done, late = await asyncio.wait(pending, timeout=MEASURE_TIMEOUT)
        for future in late:
            future.cancel()
        figures = {}
        for worker_id, read in reads.items():
            measured = read.result() if read in done and read.exception() is None else None
            if measured is not None:
                mlx = metal.get(worker_id)
                mlx_bytes = mlx.result() if mlx is not None and mlx in done and mlx.exception() is None else 0
                figures[worker_id] = WorkerMemory(measured, mlx_bytes)
            elif read in done and read.exception() is not None:
                log.warning("measuring worker %s raised: %r", worker_id, read.exception())
        measured_helper = helper.result() if helper in done and helper.exception() is None else HelperMemory()
        return Measurements(figures, measured_helper, await self._kept_cache_figures())

    async def _kept_cache_figures(self) -> dict[str, CacheFigures]:
        """Each model's kept cache as last read (a directory walk, in the cleanup thread, at most
        every CACHE_FIGURES_EVERY seconds)."""
        if self.caches is None:
            return {}
        loop = asyncio.get_running_loop()
        if loop.time() - self._cache_figures_at >= CACHE_FIGURES_EVERY:
            self._cache_figures_at = loop.time()
            try:
                async with asyncio.timeout(MEASURE_TIMEOUT):
                    self._cache_figures = await loop.run_in_executor(self._cleaning, self.caches.figures)
            except (TimeoutError, OSError, RuntimeError) as error:
                log.warning("reading the kept prefix caches: %r", error)
        return self._cache_figures

    def configure_caches(self, per_model: int, total: int) -> None:
        """models.yaml's `prefix_caches` budgets, applied every pass (in the cleanup thread)."""
        if self.caches is None or (self.caches.per_model, self.caches.total) == (per_model, total):
            return
        self.caches.set_budgets(per_model, total)
        self._cache_figures_at = float("-inf")
        try:
            self._cleaning.submit(self.caches.enforce)
        except RuntimeError:
            pass

    async def clear_caches(self, model: str | None) -> tuple[list[str], list[str]]:
        """Remove kept caches (of `model`, else all) that no running worker uses: (removed, held)."""
        if self.caches is None:
            return [], []
        self._cache_figures_at = float("-inf")
        return await asyncio.get_running_loop().run_in_executor(self._cleaning, self.caches.clear, model)

    def _helper_memory(self) -> HelperMemory:
        """The helpers' figures, with the workers forked from a template (a family sharing its pages)."""
        figures = self.prepared.memory()
        current = self.prepared.template_id()
        forked = [w for w in self.workers() if w.started_through == "template" and w.alive()]
        orphans = [w for w in forked if w.spare_id is None or w.spare_id != current]
        return HelperMemory(**{**figures.to_dict(), "forked_workers": len(forked), "orphan_forked": len(orphans)})

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def get(self, worker_id: str) -> Worker | None:
        return self._workers.get(worker_id)

    async def start(self, spec: WorkerSpec, ready_timeout: float) -> Worker:
        """Start a worker and wait until it serves; on failure nothing is left running."""
        kind = DistributedWorker if spec.ranks else Worker  # one model across hosts: mlx.launch (docs/fleet.md)
        worker = kind(spec, run_dir=self.run_dir, env=self._worker_env, on_exit=self._exited, log_dir=self.log_dir)
        self._workers[worker.id] = worker
        loop = asyncio.get_running_loop()
        spawning = loop.run_in_executor(self._starting, self._spawn_and_record, worker)
        try:
            await asyncio.shield(spawning)  # a cancel must not leave a process starting unwatched
            await worker.wait_ready(ready_timeout)
            await loop.run_in_executor(self._starting, self.records.write, worker.record())
        except WorkerStartError:
            await worker.stop(grace=2.0)
            self._drop(worker)
            raise
        except BaseException:  # cancelled while loading: leave nothing behind
            # The record goes once the worker is stopped, even if a second cancel cuts this wait short;
            # a start still under way in its thread is let finish first, then stopped.
            stopping = asyncio.ensure_future(self._stop_started(worker, spawning))
            self._stopping.add(stopping)
            stopping.add_done_callback(lambda done: self._stopped(done, worker))
            await asyncio.shield(stopping)
            raise
        return worker

    def _stopped(self, done: asyncio.Future, worker: Worker) -> None:
        self._stopping.discard(done)
        self._drop(worker)

    def _spawn_and_record(self, worker: Worker) -> None:
        """In a start thread: its kept cache linked, the process, then its record (before it is
        ready: a crash of the control plane from here on still leaves no orphan)."""
        if worker.spec.warm_prompts and (problem := warm_prompts_problem(worker.spec.warm_prompts)):
            raise WorkerStartError(problem, permanent=False)  # retried with backoff: fixing the file is enough
        self._attach_cache(worker)
        self._spawn(worker)
        self.records.write(worker.record())

    def _attach_cache(self, worker: Worker) -> None:
        """Link the worker's HOME to its model's kept prefix cache (engine/prefix_cache.py)."""
        if self.caches is None or not worker.spec.kept_cache:
            return
        try:
            directory = model_directory(worker.spec.source)
        except ModelDirectoryError:
            directory = None
        key = cache_key(worker.spec.source, worker.spec.engine.model_dump(mode="json", exclude_none=True), directory)
        worker.ssd_cache_max_gb = max(self.caches.per_model / 2 / 1024**3, 0.01)
        self.caches.attach(worker.id, worker.spec.name, key, worker.run_dir / "home")
        self._cache_figures_at = float("-inf")

    @staticmethod
    async def _stop_started(worker: Worker, spawning: asyncio.Future) -> None:
        with contextlib.suppress(BaseException):
            await spawning
        await worker.stop(grace=2.0)

    def _spawn(self, worker: Worker) -> None:
        """Through the template or a waiting spare when one suits, else cold."""
        prepared = self.prepared.take(worker.environment()) if worker.fast_starts else None
        if prepared is not None:
            try:
                worker.spawn(prepared)
                return
            except (TemplateError, OSError) as error:  # the template or spare died meanwhile
                log.warning("worker %s starts cold: %s", worker.id, error)
        worker.spawn()

    def recover(self) -> Recovered:
        """Workers a previous (killed) control plane left running, rebuilt from their records.

        Records of processes that are gone, or whose pid now belongs to another process (create
        time differs), are deleted. So is a record whose process is not a worker this user started
        or that names paths outside this state directory (`records.belongs_to_us`): it is reported
        in `rejected` and its pid is never signalled. The caller adopts or stops each returned worker.
        """
        recovered, rejected = [], []
        for record in self.records.load_all():
            if record.worker_id in self._workers:
                continue
            process = record.process()
            if process is None:
                log.info("worker %s (pid %s) from a previous run is gone", record.worker_id, record.pid)
                self.records.remove(record.worker_id)
                continue
            problem = belongs_to_us(record, process, self.run_dir, self.log_dir)
            if problem is not None:
                log.warning("worker record %s rejected (nothing is signalled or removed): %s", record.worker_id, problem)
                self.records.remove(record.worker_id)
                rejected.append(RejectedRecord(record.worker_id, record.name, problem))
                continue
            worker = Worker.from_record(record, process, on_exit=self._exited)
            self._workers[worker.id] = worker
            if self.caches is not None and worker.spec.kept_cache:
                self.caches.adopt(worker.id, worker.run_dir / "home")
            recovered.append(worker)
        return Recovered(recovered, rejected)

    async def stop(self, worker: WorkerHandle, grace: float) -> None:
        own = self._own(worker)
        await own.stop(grace=grace)
        self._drop(own)

    def forget(self, worker: WorkerHandle) -> None:
        """Drop a worker that has exited by itself."""
        self._drop(self._own(worker))

    @staticmethod
    def _own(worker: WorkerHandle) -> Worker:
        """Every worker a pool hands out is one of its Workers (the loop sees them as WorkerHandles)."""
        assert isinstance(worker, Worker), f"not a worker of this pool: {worker!r}"
        return worker

    def _drop(self, worker: Worker) -> None:
        self._workers.pop(worker.id, None)
        self.records.remove(worker.id)
        worker.close_listener()  # a worker that never started: its socket (and port) go
        if worker.alive():
            return  # a worker dropped while alive keeps its directory (and its kept cache's lease)
        if self.caches is not None and worker.spec.kept_cache:
            # Gone (saved, or crashed): its kept cache passes on, budgets applied (a disk walk).
            self._cache_figures_at = float("-inf")
            try:
                self._cleaning.submit(self.caches.release, worker.id)
            except RuntimeError:
                self.caches.release(worker.id)
        if self.log_dir is not None and worker.run_dir.parent == self.run_dir and inside(worker.run_dir, self.run_dir):
            # Its HOME (vllm-mlx's prefix cache) is never reused by another worker id: over
            # weeks of a service these directories would pile up. Its log lives in log_dir/<model>/.
            # Only ever a directory of ours: a record's run_dir is a claim (adoption checks it too).
            # In the cleanup thread: a home with a cache in it takes a while to remove.
            try:
                self._cleaning.submit(shutil.rmtree, worker.run_dir, True)
            except RuntimeError:  # shut down (the server is stopping): now, then
                shutil.rmtree(worker.run_dir, ignore_errors=True)

    async def stop_all(self, grace: float) -> None:
        """Stop every worker, and the template or spares (nothing outlives the control plane)."""
        await asyncio.gather(asyncio.to_thread(self.prepared.close), *(self.stop(w, grace) for w in self.workers()),
                             return_exceptions=True)
        for executor in (self._measuring, self._configuring, self._starting):
            executor.shutdown(wait=False, cancel_futures=True)
        self._cleaning.shutdown(wait=True)  # the homes of the workers just stopped: removed before exit

    def stop_all_sync(self, grace: float) -> None:
        self.prepared.close()
        for worker in self.workers():
            worker.stop_sync(grace)
            self._drop(worker)

    def add_exit_listener(self, listener: Callable[[Worker], None]) -> None:
        """Called (from a waiter thread) whenever a worker process exits."""
        self._exit_listeners.append(listener)

    def _exited(self, worker: Worker) -> None:
        for listener in self._exit_listeners:
            listener(worker)


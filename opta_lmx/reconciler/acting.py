"""Acting on a plan: loads and unloads run as tasks so a slow load never blocks the loop.

Every way a load can end is handled here: ready (a route), cancelled (its entry changed), or
failed, whatever raised (a Failure with backoff, so the loop never retries in a tight cycle).
`Actions` is handed the parts it acts on (the ledger, the pool, the route table, the downloads,
the event log), never the controller; phases change only through `Ledger.move`, and statuses are
written by statuses.py (`on_settled` asks it to show a model's new state at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine.download import DownloadError
from opta_lmx.engine.pool import Pool, WorkerHandle
from opta_lmx.engine.worker import WorkerSpec, WorkerStartError
from opta_lmx.reconciler.downloads import Downloads
from opta_lmx.reconciler.ledger import Ledger, WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import LoadModel, UnloadModel, UnloadReason
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import ModelSpec
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)

ROUTE_WAIT_S = 5.0  # how long a load waits for its route to be set before it lets that finish alone

_UNLOAD_EVENT = {
    UnloadReason.REMOVED: "Removed",
    UnloadReason.UNLOADED: "Unloading",
    UnloadReason.EVICTED: "Evicted",
    UnloadReason.IDLE: "IdleUnload",
    UnloadReason.PRESSURE: "MemoryPressure",
    UnloadReason.REPLACED: "Replaced",
    UnloadReason.DEMAND: "EvictedByDemand",
}


@dataclass(frozen=True)
class ActingSettings:
    """The deadlines acting keeps (from the loop's settings)."""

    ready_timeout: float
    memory_wait_timeout: float
    drain_timeout: float
    stop_grace: float


class Actions:
    """Starts and tracks the load and unload tasks of one loop."""

    def __init__(self, ledger: Ledger, pool: Pool, routes: RouteTable, downloads: Downloads, events: EventLog,
                 settings: ActingSettings, *, spec_of: Callable[[ModelSpec], WorkerSpec],
                 on_ready: Callable[[str], None], on_settled: Callable[[str], None], nudge: Callable[[], None]):
        self.ledger, self.pool, self.routes, self.downloads, self.events = ledger, pool, routes, downloads, events
        self.settings = settings
        self.spec_of = spec_of
        self.on_ready = on_ready  # a model became Ready (its demand is met)
        self.on_settled = on_settled  # show a model's status now (Ready, BackOff, Failed, Loading)
        self.nudge = nudge
        self.tasks: dict[str, asyncio.Task] = {}  # "load:<name>" or "unload:<worker id>" -> task
        self._background: set[asyncio.Future] = set()
        self.freed = asyncio.Event()  # set when a ledger entry leaves: loads waiting for memory re-check
        self.save_timeout = 30.0  # models.yaml's prefix_caches.save_timeout (set every pass)
        ledger.on_gone = self.freed.set

    def apply(self, actions) -> None:
        """Start each action; one that raises fails alone (a load backs off), the others still start."""
        for action in actions:
            try:
                if isinstance(action, UnloadModel):
                    self.start_unload(action)
                elif isinstance(action, LoadModel):
                    self.start_load(action)
            except Exception as error:  # noqa: BLE001 - one model's fault must not stop the others
                log.exception("starting %s raised", action)
                message = f"{type(error).__name__}: {error}"
                if isinstance(action, LoadModel):
                    self.fail(action.name, action.fingerprint, message, permanent=False)
                else:
                    self.events.record(action.name, "UnloadFailed", message, kind="Warning")

    # -- loads ----------------------------------------------------------------------
    def start_load(self, action: LoadModel) -> None:
        key = f"load:{action.name}"
        if key in self.tasks:
            return
        spec = self.spec_of(action.spec)
        if spec.source.startswith("/") and not Path(spec.source).exists():
            self.fail(action.name, action.fingerprint, f"source path does not exist: {spec.source}", permanent=True)
            return
        if spec.source.startswith("~"):  # resolve_source could not expand it: `~nosuchuser/x`
            self.fail(action.name, action.fingerprint, f"cannot resolve {spec.source}: no such user", permanent=True)
            return
        why = (f"waiting for {len(action.after)} worker(s) to drain and unload to free memory "
               f"({format_size(action.bytes)} needed)") if action.after else ""
        if self.downloads.will_download(spec.source):  # a hub model not in the cache: fetched first
            entry = self.ledger.begin_load(action.name, action.fingerprint, why, None, download=True,
                                           planned_bytes=action.bytes)
        elif action.after:
            entry = self.ledger.begin_load(action.name, action.fingerprint, why, ("WaitingForMemory", why),
                                           planned_bytes=action.bytes)
        else:
            entry = self.ledger.begin_load(action.name, action.fingerprint, "", (
                "Loading", f"loading {spec.source} ({action.reason}; planned at {format_size(action.bytes)})"),
                planned_bytes=action.bytes)
        task = asyncio.create_task(self._load(entry, spec, action.after), name=key)
        task.add_done_callback(lambda done: self._load_done(key, done, entry))  # also if cancelled before it ran
        self.tasks[key] = task

    def _load_done(self, key: str, task: asyncio.Task, entry: WorkerEntry) -> None:
        """A load task ended, however: its entry leaves the ledger if it never became a worker."""
        self._end_load(entry)
        if self.tasks.get(key) is task:
            del self.tasks[key]
            self.nudge()

    async def _load(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...] = ()) -> None:
        name = entry.model
        try:
            if entry.phase == WorkerPhase.DOWNLOADING:
                await self._download(entry, spec, after)
            if entry.phase == WorkerPhase.WAITING:
                await self._wait_for_memory(entry, spec, after)
            worker = await self.pool.start(spec, self.settings.ready_timeout)
            self.ledger.move(entry, WorkerPhase.READY, (
                "Ready", f"serving at {worker.address} (pid {worker.pid}, loaded in {worker.load_seconds:.1f}s)"),
                worker=worker)
            self.on_ready(name)
            log.info("model %s ready at %s in %.1fs", name, worker.address, worker.load_seconds or 0)
            await self.route_ready(entry, worker)
        except asyncio.CancelledError:
            self._end_load(entry)
            return
        except DownloadError as error:
            self._end_load(entry)
            self.fail(name, entry.fingerprint, f"download failed: {error.message}", permanent=error.permanent)
        except WorkerStartError as error:
            self._end_load(entry)
            self.fail(name, entry.fingerprint, str(error), permanent=error.permanent, log_tail=error.log_tail)
        except Exception as error:  # noqa: BLE001 - whatever raised (OSError, ValueError...), back off
            self._end_load(entry)
            log.exception("loading %s raised", name)
            self.fail(name, entry.fingerprint, f"{type(error).__name__}: {error}", permanent=False)
        finally:
            self.tasks.pop(f"load:{name}", None)
            self._settled(name)
            self.nudge()

    def _settled(self, name: str) -> None:
        """Ready, BackOff or Failed in status now, not at the next pass (which writes it anyway)."""
        try:
            self.on_settled(name)
        except Exception:  # noqa: BLE001 - a status is not worth a lost nudge
            log.exception("refreshing the status of %s raised", name)

    async def _download(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...]) -> None:
        """Fetch a hub model's files before its worker starts: the readiness deadline covers only the load."""
        await self.downloads.fetch(entry.model, spec.source)
        if after and any(self.ledger.present(w) for w in after):
            self.ledger.move(entry, WorkerPhase.WAITING, ("WaitingForMemory", entry.why))
        else:
            self.ledger.move(entry, WorkerPhase.LOADING, ("Loading", f"loading {spec.source} (downloaded)"))
        self._settled(entry.model)
        self.nudge()

    async def _wait_for_memory(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...]) -> None:
        deadline = time.monotonic() + self.settings.memory_wait_timeout
        while any(self.ledger.present(w) for w in after):
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"memory was not freed within {self.settings.memory_wait_timeout:.0f}s", permanent=False
                )
            self.freed.clear()  # woken the moment an unload ends (was: the next 50 ms poll)
            try:
                async with asyncio.timeout(0.05):
                    await self.freed.wait()
            except TimeoutError:
                pass
        self.ledger.move(entry, WorkerPhase.LOADING, ("Loading", f"loading {spec.source} (memory freed)"))
        self._settled(entry.model)

    def _end_load(self, entry: WorkerEntry) -> None:
        if entry.loading:
            self.ledger.move(entry, WorkerPhase.GONE)

    def fail(self, name: str, fingerprint: str, message: str, *, permanent: bool, log_tail: str = "") -> None:
        self.ledger.fail(name, fingerprint, message, permanent=permanent)
        log.error("model %s failed to load: %s%s", name, message, ("\n" + log_tail[-1500:]) if log_tail else "")

    # -- unloads --------------------------------------------------------------------
    def start_unload(self, action: UnloadModel) -> None:
        entry = self.ledger.get(action.worker_id)
        if entry is None:
            return
        if entry.loading:  # still loading (its spec changed, it was removed or evicted): cancel the load
            task = self.tasks.get(f"load:{entry.model}")
            if task and not task.cancelling():  # one cancel (a second would cut the pool's shielded stop short)
                self.events.record(entry.model, "LoadCancelled", action.message or action.reason.value)
                task.cancel()
            return
        key = f"unload:{action.worker_id}"
        if key in self.tasks or entry.phase != WorkerPhase.READY:
            return
        worker = self.pool.get(action.worker_id)
        why = action.message or action.reason.value
        kind = "Warning" if action.reason in (UnloadReason.EVICTED, UnloadReason.PRESSURE) else "Normal"
        self.ledger.move(entry, WorkerPhase.DRAINING, (
            _UNLOAD_EVENT[action.reason], f"draining and stopping worker pid {worker.pid if worker else '?'}: {why}"),
            kind)
        entry.why = why
        self.drop_route(entry)  # no new requests from here on
        self.tasks[key] = asyncio.create_task(self._unload(entry, worker), name=key)

    async def _unload(self, entry: WorkerEntry, worker: WorkerHandle | None) -> None:
        """Drain (in-flight requests finish, bounded by drain_timeout), then stop: at once once drained,
        else SIGTERM bounded by stop_grace. A worker with a kept prefix cache is stopped with SIGTERM
        and `save_timeout` to save it (vllm-mlx's own save at shutdown), and the save's cost is an event."""
        name, traffic = entry.model, entry.traffic
        try:
            if traffic.in_flight:
                self.events.record(name, "Draining", f"waiting for {traffic.in_flight} request(s) in flight")
                deadline = time.monotonic() + self.settings.drain_timeout
                while traffic.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if traffic.in_flight:
                    self.events.record(name, "DrainTimeout", f"{traffic.in_flight} request(s) still in flight after "
                                       f"{self.settings.drain_timeout:.0f}s; stopping anyway", kind="Warning")
            self.ledger.move(entry, WorkerPhase.STOPPING)
            if worker is not None and worker.spec.kept_cache:
                await self._stop_saving(entry, worker, traffic.in_flight > 0)
            elif worker is not None:  # drained: nothing to finish or save, so no SIGTERM (Worker.stop)
                await self.pool.stop(worker, 0.0 if not traffic.in_flight else self.settings.stop_grace)
            self.ledger.move(entry, WorkerPhase.GONE, ("Unloaded", f"worker {entry.worker_id} stopped"))
        finally:
            if entry.phase != WorkerPhase.GONE:
                self.ledger.move(entry, WorkerPhase.GONE)
            self.tasks.pop(f"unload:{entry.worker_id}", None)
            self.nudge()

    async def _stop_saving(self, entry: WorkerEntry, worker: WorkerHandle, busy: bool) -> None:
        """Stop a worker that saves its prefix cache as it shuts down, and say what the save cost."""
        grace = max(self.save_timeout, self.settings.stop_grace if busy else 0.0)
        began = time.monotonic()
        await self.pool.stop(worker, grace)
        took = time.monotonic() - began
        if grace > 0 and took >= grace:
            self.events.record(entry.model, "CacheSaveTimeout", f"worker {entry.worker_id} did not save its prefix "
                               f"cache within {grace:.0f}s and was killed; the kept cache keeps its last save and "
                               "SSD tier", kind="Warning")
        else:
            self.events.record(entry.model, "CacheSaved", f"worker {entry.worker_id} saved its prefix cache and "
                               f"stopped in {took:.2f}s")

    # -- routes ---------------------------------------------------------------------
    # (soak bug 2: a ready worker must be routed or stopped, never left alive and unrouted)
    async def route_ready(self, entry: WorkerEntry, worker: WorkerHandle) -> None:
        """Route a worker that just became ready. Setting the route waits for the table's lock
        (the gateway's waiters contend for it), so it is shielded: a cancel of this task meanwhile
        does not leave the worker unrouted. If a pass unloaded the worker meanwhile, its route is
        dropped again once set. Bounded: after ROUTE_WAIT_S the setting finishes in the background."""
        setting = asyncio.ensure_future(self.routes.set(Route(entry.model, worker.address, worker.id, entry.traffic,
                                                                 getattr(worker, "served_as", None))))
        self._background.add(setting)
        setting.add_done_callback(self._background.discard)
        setting.add_done_callback(lambda _done: None if entry.serving else self.drop_route(entry))
        try:
            async with asyncio.timeout(ROUTE_WAIT_S):
                await asyncio.shield(setting)
        except TimeoutError:
            log.warning("routing %s to worker %s took over %.0fs; it finishes in the background",
                        entry.model, worker.id, ROUTE_WAIT_S)

    def drop_route(self, entry: WorkerEntry) -> None:
        """Stop routing to `entry`'s worker; fall back to another ready worker of the model (mid-swap)."""
        other = self.ledger.serving(entry.model, besides=entry.worker_id)
        fallback = None
        if other is not None and other.worker_id and other.address:
            fallback = Route(entry.model, other.address, other.worker_id, other.traffic,
                             getattr(self.pool.get(other.worker_id), "served_as", None))
        self.routes.drop(entry.model, entry.worker_id or "", fallback)

    async def cancel_all(self) -> None:
        for task in list(self.tasks.values()) + list(self._background):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), *self._background, return_exceptions=True)

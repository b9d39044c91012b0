"""Acting on a plan: loads and unloads run as tasks so a slow load never blocks the loop.

Every way a load can end is handled here: ready (a route), cancelled (its entry changed), or
failed, whatever raised (a Failure with backoff, so the loop never retries in a tight cycle).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from opta_lmx.engine.download import DownloadError
from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
from opta_lmx.reconciler import statuses
from opta_lmx.reconciler.ledger import WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import LoadModel, UnloadModel, UnloadReason
from opta_lmx.reconciler.routes import Route
from opta_lmx.state.quantities import format_size
from opta_lmx.state.status import ModelStatus, Phase

if TYPE_CHECKING:
    from opta_lmx.reconciler.controller import Reconciler

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


class Actions:
    """Starts and tracks the load and unload tasks of one reconciler."""

    def __init__(self, rec: Reconciler):
        self.rec = rec
        self.tasks: dict[str, asyncio.Task] = {}  # "load:<name>" or "unload:<worker id>" -> task
        self._background: set[asyncio.Task] = set()
        self.freed = asyncio.Event()  # set when a ledger entry leaves: loads waiting for memory re-check
        rec.ledger.on_gone = self.freed.set

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
                    self.rec.events.record(action.name, "UnloadFailed", message, kind="Warning")

    # -- loads ----------------------------------------------------------------------
    def start_load(self, action: LoadModel) -> None:
        rec = self.rec
        key = f"load:{action.name}"
        if key in self.tasks:
            return
        spec = rec.worker_spec(action.spec)
        if spec.source.startswith("/") and not Path(spec.source).exists():
            self.fail(action.name, action.fingerprint, f"source path does not exist: {spec.source}", permanent=True)
            return
        if spec.source.startswith("~"):  # resolve_source could not expand it: `~nosuchuser/x`
            self.fail(action.name, action.fingerprint, f"cannot resolve {spec.source}: no such user", permanent=True)
            return
        why = (f"waiting for {len(action.after)} worker(s) to drain and unload to free memory "
               f"({format_size(action.bytes)} needed)") if action.after else ""
        if rec.downloads.will_download(spec.source):  # a hub model not in the cache: fetched first
            rec.statuses.setdefault(action.name, ModelStatus()).phase = Phase.DOWNLOADING
            entry = rec.ledger.begin_load(action.name, action.fingerprint, why, None, download=True,
                                          planned_bytes=action.bytes)
        elif action.after:
            entry = rec.ledger.begin_load(action.name, action.fingerprint, why, ("WaitingForMemory", why),
                                          planned_bytes=action.bytes)
        else:
            rec.statuses.setdefault(action.name, ModelStatus()).phase = Phase.LOADING
            entry = rec.ledger.begin_load(action.name, action.fingerprint, "", (
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
            self.rec.nudge()

    async def _load(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...] = ()) -> None:
        rec, name = self.rec, entry.model
        try:
            if entry.phase == WorkerPhase.DOWNLOADING:
                await self._download(entry, spec, after)
            if entry.phase == WorkerPhase.WAITING:
                await self._wait_for_memory(entry, spec, after)
            worker = await rec.pool.start(spec, rec.settings.ready_timeout)
            rec.ledger.move(entry, WorkerPhase.READY, (
                "Ready", f"serving at {worker.address} (pid {worker.pid}, loaded in {worker.load_seconds:.1f}s)"),
                worker=worker)
            rec.demand.pop(name, None)
            rec.statuses.setdefault(name, ModelStatus()).load_seconds = worker.load_seconds
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
            try:  # Ready, BackOff or Failed in status now, not at the next pass (which rewrites it anyway)
                statuses.refresh_status(rec, name)
            except Exception:  # noqa: BLE001 - a status is not worth a lost nudge
                log.exception("refreshing the status of %s raised", name)
            rec.nudge()

    async def _download(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...]) -> None:
        """Fetch a hub model's files before its worker starts: the readiness deadline covers only the load."""
        rec = self.rec
        await rec.downloads.fetch(entry.model, spec.source)
        if after and any(rec.ledger.present(w) for w in after):
            rec.ledger.move(entry, WorkerPhase.WAITING, ("WaitingForMemory", entry.why))
        else:
            rec.statuses.setdefault(entry.model, ModelStatus()).phase = Phase.LOADING
            rec.ledger.move(entry, WorkerPhase.LOADING, ("Loading", f"loading {spec.source} (downloaded)"))
        rec.nudge()  # a pass rewrites the status (no download block, the new phase's message)

    async def _wait_for_memory(self, entry: WorkerEntry, spec: WorkerSpec, after: tuple[str, ...]) -> None:
        rec = self.rec
        deadline = time.monotonic() + rec.settings.memory_wait_timeout
        while any(rec.ledger.present(w) for w in after):
            if time.monotonic() > deadline:
                raise WorkerStartError(
                    f"memory was not freed within {rec.settings.memory_wait_timeout:.0f}s", permanent=False
                )
            self.freed.clear()  # woken the moment an unload ends (was: the next 50 ms poll)
            try:
                async with asyncio.timeout(0.05):
                    await self.freed.wait()
            except TimeoutError:
                pass
        rec.statuses.setdefault(entry.model, ModelStatus()).phase = Phase.LOADING
        rec.ledger.move(entry, WorkerPhase.LOADING, ("Loading", f"loading {spec.source} (memory freed)"))

    def _end_load(self, entry: WorkerEntry) -> None:
        if entry.loading:
            self.rec.ledger.move(entry, WorkerPhase.GONE)

    def fail(self, name: str, fingerprint: str, message: str, *, permanent: bool, log_tail: str = "") -> None:
        self.rec.ledger.fail(name, fingerprint, message, permanent=permanent)
        self.rec.statuses.setdefault(name, ModelStatus()).last_error = message
        log.error("model %s failed to load: %s%s", name, message, ("\n" + log_tail[-1500:]) if log_tail else "")

    # -- unloads --------------------------------------------------------------------
    def start_unload(self, action: UnloadModel) -> None:
        rec = self.rec
        entry = rec.ledger.get(action.worker_id)
        if entry is None:
            return
        if entry.loading:  # still loading (its spec changed, it was removed or evicted): cancel the load
            task = self.tasks.get(f"load:{entry.model}")
            if task and not task.cancelling():  # one cancel (a second would cut the pool's shielded stop short)
                rec.events.record(entry.model, "LoadCancelled", action.message or action.reason.value)
                task.cancel()
            return
        key = f"unload:{action.worker_id}"
        if key in self.tasks or entry.phase != WorkerPhase.READY:
            return
        worker = rec.pool.get(action.worker_id)
        why = action.message or action.reason.value
        kind = "Warning" if action.reason in (UnloadReason.EVICTED, UnloadReason.PRESSURE) else "Normal"
        rec.ledger.move(entry, WorkerPhase.DRAINING, (
            _UNLOAD_EVENT[action.reason], f"draining and stopping worker pid {worker.pid if worker else '?'}: {why}"),
            kind)
        entry.why = why
        self.drop_route(entry)  # no new requests from here on
        self.tasks[key] = asyncio.create_task(self._unload(entry, worker), name=key)

    async def _unload(self, entry: WorkerEntry, worker: Worker | None) -> None:
        """Drain (in-flight requests finish, bounded by drain_timeout), then stop: at once once drained,
        else SIGTERM bounded by stop_grace."""
        rec, name, traffic = self.rec, entry.model, entry.traffic
        try:
            if traffic.in_flight:
                rec.events.record(name, "Draining", f"waiting for {traffic.in_flight} request(s) in flight")
                deadline = time.monotonic() + rec.settings.drain_timeout
                while traffic.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if traffic.in_flight:
                    rec.events.record(name, "DrainTimeout", f"{traffic.in_flight} request(s) still in flight after "
                                      f"{rec.settings.drain_timeout:.0f}s; stopping anyway", kind="Warning")
            rec.ledger.move(entry, WorkerPhase.STOPPING)
            if worker is not None:  # drained: nothing to finish or save, so no SIGTERM (Worker.stop)
                await rec.pool.stop(worker, 0.0 if not traffic.in_flight else rec.settings.stop_grace)
            rec.ledger.move(entry, WorkerPhase.GONE, ("Unloaded", f"worker {entry.worker_id} stopped"))
        finally:
            if entry.phase != WorkerPhase.GONE:
                rec.ledger.move(entry, WorkerPhase.GONE)
            self.tasks.pop(f"unload:{entry.worker_id}", None)
            rec.nudge()

    # -- routes ---------------------------------------------------------------------
    # (soak bug 2: a ready worker must be routed or stopped, never left alive and unrouted)
    async def route_ready(self, entry: WorkerEntry, worker: Worker) -> None:
        """Route a worker that just became ready. Setting the route waits for the table's lock
        (the gateway's waiters contend for it), so it is shielded: a cancel of this task meanwhile
        does not leave the worker unrouted. If a pass unloaded the worker meanwhile, its route is
        dropped again once set. Bounded: after ROUTE_WAIT_S the setting finishes in the background."""
        setting = asyncio.ensure_future(self.rec.routes.set(self.route_to(entry.model, worker, entry)))
        self._background.add(setting)
        setting.add_done_callback(self._background.discard)
        setting.add_done_callback(lambda _done: None if entry.serving else self.drop_route(entry))
        try:
            async with asyncio.timeout(ROUTE_WAIT_S):
                await asyncio.shield(setting)
        except TimeoutError:
            log.warning("routing %s to worker %s took over %.0fs; it finishes in the background",
                        entry.model, worker.id, ROUTE_WAIT_S)

    def route_to(self, name: str, worker: Worker, entry: WorkerEntry) -> Route:
        """A route to `worker`, carrying its one in-flight counter (the drain and idle TTL read it)."""
        return Route(name, worker.address, worker.id, entry.traffic)

    def drop_route(self, entry: WorkerEntry) -> None:
        """Stop routing to `entry`'s worker; fall back to another ready worker of the model (mid-swap)."""
        rec = self.rec
        other = rec.ledger.serving(entry.model, besides=entry.worker_id)
        worker = rec.pool.get(other.worker_id) if other and other.worker_id else None
        fallback = self.route_to(entry.model, worker, other) if worker and other else None
        rec.routes.drop(entry.model, entry.worker_id or "", fallback)

    async def cancel_all(self) -> None:
        for task in list(self.tasks.values()) + list(self._background):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), *self._background, return_exceptions=True)

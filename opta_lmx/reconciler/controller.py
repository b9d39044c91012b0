"""The level-triggered control loop.

A file change, a worker exit, a finished load and a periodic resync all just say
"reconcile"; every pass re-reads the desired state and the engine's workers, plans, and
acts. Loads and unloads run as tasks so a slow load never blocks the loop from reacting
to the next edit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
from opta_lmx.reconciler.plan import LoadModel, ObservedWorker, UnloadModel, plan
from opta_lmx.state.document import ConfigError, Document, read_document
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import ConfigStatus, EventLog, ModelStatus, Phase

log = logging.getLogger(__name__)


@dataclass
class Failure:
    fingerprint: str
    message: str
    permanent: bool
    attempts: int = 1
    retry_at: float = 0.0


@dataclass(frozen=True)
class Route:
    """Where requests for a model go now."""

    name: str
    address: str
    worker_id: str


@dataclass(frozen=True)
class LoopSettings:
    resync_interval: float = 30.0
    ready_timeout: float = 600.0
    stop_grace: float = 10.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 120.0  # a worker up this long resets its crash backoff
    watch_debounce_ms: int = 100


class Reconciler:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        pool: WorkerPool,
        *,
        settings: LoopSettings = LoopSettings(),
        events: EventLog | None = None,
        clock=time.time,
    ):
        self.config_path = Path(config_path)
        self.pool = pool
        self.settings = settings
        self.events = events or EventLog(clock=clock)
        self.clock = clock
        self.desired: DesiredState | None = None
        self.document: Document | None = None
        self.generation = 0
        self.observed_generation = 0
        self.config_status = ConfigStatus(path=str(self.config_path))
        self.statuses: dict[str, ModelStatus] = {}
        self._workers: dict[str, tuple[str, str]] = {}  # worker id -> (model, fingerprint)
        self._ready: set[str] = set()  # ids of workers that serve
        self._tasks: dict[str, asyncio.Task] = {}  # worker id or "load:<name>" -> task
        self._loading: dict[str, str] = {}  # model -> fingerprint being loaded
        self._failures: dict[str, Failure] = {}
        self._routes: dict[str, Route] = {}
        self._wake = asyncio.Event()
        self._routes_changed = asyncio.Condition()
        self._stopping = False
        self._pass_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recovered: list[Worker] | None = None  # a previous run's workers, until adopted or stopped
        self.passes = 0
        self.last_request: dict[str, float] = {}  # model -> time of its latest request (idle TTLs)
        self.pass_listeners: list = []  # called with each pass's duration in seconds
        pool.add_exit_listener(self._worker_exited)

    # -- signals ------------------------------------------------------------------
    def nudge(self) -> None:
        """Ask for a pass soon. Safe to call from any coroutine on the loop."""
        self._wake.set()

    async def accept_now(self) -> int:
        """Read models.yaml and reconcile right away; the generation now in force.

        For a writer (the admin API) that just wrote the file and must answer with the
        generation its content was accepted as, without waiting for the file watcher.
        """
        await self.reconcile_once()
        return self.generation

    def _worker_exited(self, _worker: Worker) -> None:
        """A worker's waiter thread saw it exit: reconcile on the loop's thread."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake.set)

    # -- the loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Reconcile until cancelled: on file changes, nudges, and every resync interval."""
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._watch_file(), name="watch-models-yaml")
        try:
            while not self._stopping:
                await self.reconcile_once()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.resync_interval)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
        finally:
            watcher.cancel()

    async def _watch_file(self) -> None:
        """Nudge on any change to models.yaml, including replace-by-rename and symlink targets."""
        watched = {self.config_path.parent.resolve()}
        names = {self.config_path.name}
        if self.config_path.is_symlink():
            target = self.config_path.resolve()
            watched.add(target.parent)
            names.add(target.name)
        try:
            async for _changes in watchfiles.awatch(
                *watched,
                watch_filter=lambda _change, path: Path(path).name in names,
                debounce=self.settings.watch_debounce_ms,
                step=50,
                recursive=False,
            ):
                self.nudge()
        except Exception:  # the periodic resync still converges without the watcher
            log.exception("watching %s failed; relying on periodic resync", self.config_path)

    async def reconcile_once(self) -> None:
        started = time.perf_counter()
        try:
            await self._reconcile_once()
        finally:
            self.passes += 1
            for listener in self.pass_listeners:
                listener(time.perf_counter() - started)

    async def _reconcile_once(self) -> None:
        async with self._pass_lock:
            self._read_desired()
            if self._recovered is None:
                self._recovered = self.pool.recover()
            if self._recovered and self.desired is not None:
                await self._adopt_recovered()
            self._reap_exited()
            if self.desired is None:
                return
            desired = self.desired
            fingerprints = {m.name: self.worker_spec(m).fingerprint for m in desired.models}
            observed = [
                ObservedWorker(name, wid, fp, wid in self._ready)
                for wid, (name, fp) in self._workers.items()
            ]
            now = self.clock()
            blocked = frozenset(
                name
                for name, failure in self._failures.items()
                if failure.fingerprint == fingerprints.get(name)
                and (failure.permanent or failure.retry_at > now)
            )
            actions = plan(desired, fingerprints, observed, blocked)
            for action in actions:
                if isinstance(action, UnloadModel):
                    self._start_unload(action)
                elif isinstance(action, LoadModel):
                    self._start_load(action)
            self._update_statuses(fingerprints, blocked)
            self.observed_generation = self.generation
            retry_times = [f.retry_at for f in self._failures.values() if not f.permanent and f.retry_at > now]
            if retry_times:
                asyncio.get_running_loop().call_later(min(retry_times) - now + 0.01, self.nudge)

    # -- observe ------------------------------------------------------------------
    def _read_desired(self) -> None:
        try:
            document = read_document(self.config_path)
        except ConfigError as error:
            if self.config_status.valid or self.config_status.error != error.to_dict():
                log.error("models.yaml rejected; the last good state stays live:\n%s", error.describe())
                self.events.record("config", "InvalidConfig", error.describe(), kind="Warning")
            self.config_status = ConfigStatus(
                path=str(self.config_path), valid=False, error=error.to_dict(),
                last_good_etag=self.document.etag if self.document else None, checked_at=self.clock(),
            )
            return
        if self.document is None or document.etag != self.document.etag:
            self.generation += 1
            self.events.record("config", "ConfigAccepted", f"generation {self.generation} ({len(document.state.models)} models)")
            log.info("models.yaml accepted as generation %d", self.generation)
            self.document = document
            self.desired = document.state
            for name in list(self._failures):
                model = document.state.model(name)
                if model is None or self.worker_spec(model).fingerprint != self._failures[name].fingerprint:
                    del self._failures[name]  # the entry changed: try again from scratch
        self.config_status = ConfigStatus(
            path=str(self.config_path), valid=True, last_good_etag=document.etag, checked_at=self.clock()
        )

    def _reap_exited(self) -> None:
        for worker in self.pool.workers():
            if worker.alive() or worker.stopping or worker.id not in self._ready:
                continue
            name, fingerprint = self._workers.pop(worker.id)
            self._ready.discard(worker.id)
            self.pool.forget(worker)
            self._drop_route(name, worker.id)
            uptime = self.clock() - (worker.ready_at or self.clock())
            previous = self._failures.get(name)
            attempts = 1 if previous is None or uptime > self.settings.stable_after else previous.attempts + 1
            delay = min(self.settings.backoff_base * 2 ** (attempts - 1), self.settings.backoff_max)
            message = f"worker exited unexpectedly with code {worker.returncode}; restarting in {delay:.0f}s"
            if attempts > 1:
                message += f" (crash-looping: {attempts} crashes in a row)"
            self._failures[name] = Failure(fingerprint, message, False, attempts, self.clock() + delay)
            status = self.statuses.setdefault(name, ModelStatus())
            status.restarts += 1
            status.last_error = message
            self.events.record(name, "CrashLoopBackOff" if attempts > 1 else "WorkerExited", message, kind="Warning")

    async def _adopt_recovered(self) -> None:
        """Keep the previous run's workers that are healthy and still wanted as they are; stop the rest.

        Adopted workers are not reloaded (same pid). Of two workers of one model (a crash
        mid-swap) only the newer one is kept, so a restart never leaves a duplicate.
        """
        assert self.desired is not None
        recovered, self._recovered = self._recovered or [], []
        health = await asyncio.gather(*(w.healthy() for w in recovered))
        healthy = {w.id for w, ok in zip(recovered, health) if ok}
        adopted_names: set[str] = set()
        to_stop: list[tuple[Worker, str]] = []
        for worker in sorted(recovered, key=lambda w: w.started_at or 0.0, reverse=True):
            name = worker.spec.name
            model = self.desired.model(name)
            if model is None or model.state != DesiredModelState.LOADED:
                to_stop.append((worker, "no longer desired"))
            elif self.worker_spec(model).fingerprint != worker.spec.fingerprint:
                to_stop.append((worker, "its spec changed"))
            elif worker.id not in healthy:
                to_stop.append((worker, "not healthy"))
            elif name in adopted_names:
                to_stop.append((worker, "a duplicate"))
            else:
                adopted_names.add(name)
                self._workers[worker.id] = (name, worker.spec.fingerprint)
                self._ready.add(worker.id)
                status = self.statuses.setdefault(name, ModelStatus())
                status.load_seconds = worker.load_seconds
                self.events.record(name, "Adopted", f"kept worker pid {worker.pid} at {worker.address} from the previous run")
                log.info("adopted worker %s of %s (pid %s) at %s", worker.id, name, worker.pid, worker.address)
                await self._set_route(Route(name, worker.address, worker.id))
        for worker, why in to_stop:
            self.events.record(worker.spec.name, "StoppedLeftover", f"stopping worker pid {worker.pid} from the previous run: {why}")
            log.info("stopping worker %s (pid %s) from the previous run: %s", worker.id, worker.pid, why)
        await asyncio.gather(*(self.pool.stop(w, self.settings.stop_grace) for w, _ in to_stop))

    # -- act ----------------------------------------------------------------------
    def worker_spec(self, model: ModelSpec) -> WorkerSpec:
        assert self.desired is not None
        return WorkerSpec(
            name=model.name,
            source=self.resolve_source(model.source),
            engine=self.desired.effective_engine(model),
        )

    def resolve_source(self, source: str) -> str:
        """Local paths are taken relative to models.yaml; anything else is a hub id."""
        if source.startswith(("/", "./", "../", "~")):
            path = Path(source).expanduser()
            if not path.is_absolute():
                path = (self.config_path.parent / path).resolve()
            return str(path)
        return source

    def _start_load(self, action: LoadModel) -> None:
        key = f"load:{action.name}"
        if key in self._tasks:
            return
        spec = self.worker_spec(action.spec)
        if spec.source.startswith("/") and not Path(spec.source).exists():
            self._fail(action.name, action.fingerprint, f"source path does not exist: {spec.source}", permanent=True)
            return
        self._loading[action.name] = action.fingerprint
        status = self.statuses.setdefault(action.name, ModelStatus())
        status.phase = Phase.LOADING
        self.events.record(action.name, "Loading", f"loading {spec.source} ({action.reason})")
        self._tasks[key] = asyncio.create_task(self._load(action.name, action.fingerprint, spec), name=key)

    async def _load(self, name: str, fingerprint: str, spec: WorkerSpec) -> None:
        try:
            worker = await self.pool.start(spec, self.settings.ready_timeout)
        except WorkerStartError as error:
            self._fail(name, fingerprint, str(error), permanent=error.permanent, log_tail=error.log_tail)
            return
        except asyncio.CancelledError:
            return
        finally:
            self._tasks.pop(f"load:{name}", None)
            if self._loading.get(name) == fingerprint:
                self._loading.pop(name, None)
            self.nudge()
        self._workers[worker.id] = (name, fingerprint)
        self._ready.add(worker.id)
        status = self.statuses.setdefault(name, ModelStatus())
        status.load_seconds = worker.load_seconds
        self.events.record(name, "Ready", f"serving at {worker.address} (pid {worker.pid}, loaded in {worker.load_seconds:.1f}s)")
        log.info("model %s ready at %s in %.1fs", name, worker.address, worker.load_seconds or 0)
        await self._set_route(Route(name, worker.address, worker.id))

    def _fail(self, name: str, fingerprint: str, message: str, *, permanent: bool, log_tail: str = "") -> None:
        previous = self._failures.get(name)
        attempts = previous.attempts + 1 if previous and previous.fingerprint == fingerprint else 1
        delay = 0.0 if permanent else min(self.settings.backoff_base * 2 ** (attempts - 1), self.settings.backoff_max)
        self._failures[name] = Failure(fingerprint, message, permanent, attempts, self.clock() + delay)
        status = self.statuses.setdefault(name, ModelStatus())
        status.last_error = message
        self.events.record(
            name, "LoadFailed", message + ("" if permanent else f"; retrying in {delay:.0f}s"), kind="Warning"
        )
        log.error("model %s failed to load: %s%s", name, message, ("\n" + log_tail[-1500:]) if log_tail else "")

    def _start_unload(self, action: UnloadModel) -> None:
        if action.worker_id not in self._workers:
            return
        name, fingerprint = self._workers[action.worker_id]
        if action.worker_id not in self._ready:
            # Still loading (its spec changed or it was removed): cancel the load.
            task = self._tasks.get(f"load:{name}")
            if task and self._loading.get(name) == fingerprint:
                task.cancel()
            return
        key = f"unload:{action.worker_id}"
        if key in self._tasks:
            return
        worker = self.pool.get(action.worker_id)
        self._ready.discard(action.worker_id)
        self._drop_route(name, action.worker_id)
        self.events.record(name, "Unloading", f"stopping worker pid {worker.pid if worker else '?'} ({action.reason})")
        self._tasks[key] = asyncio.create_task(self._unload(action.worker_id, worker, name), name=key)

    async def _unload(self, worker_id: str, worker: Worker | None, name: str) -> None:
        try:
            if worker is not None:
                await self.pool.stop(worker, self.settings.stop_grace)
            self.events.record(name, "Unloaded", f"worker {worker_id} stopped")
        finally:
            self._workers.pop(worker_id, None)
            self._tasks.pop(f"unload:{worker_id}", None)
            self.nudge()

    # -- routing (read by the gateway) ---------------------------------------------
    async def _set_route(self, route: Route) -> None:
        async with self._routes_changed:
            self._routes[route.name] = route
            self._routes_changed.notify_all()

    def _drop_route(self, name: str, worker_id: str) -> None:
        route = self._routes.get(name)
        if route and route.worker_id == worker_id:
            # Fall back to another ready worker of the same model, if any (mid-swap).
            for wid, (other_name, _fp) in self._workers.items():
                worker = self.pool.get(wid)
                if other_name == name and wid in self._ready and wid != worker_id and worker:
                    self._routes[name] = Route(name, worker.address, wid)
                    return
            del self._routes[name]

    def resolve(self, name_or_alias: str) -> ModelSpec | None:
        return self.desired.resolve(name_or_alias) if self.desired else None

    def note_request(self, name: str) -> None:
        """The gateway saw a request for `name`: an observation the loop may read (idle, demand)."""
        self.last_request[name] = self.clock()

    def route(self, name: str) -> Route | None:
        return self._routes.get(name)

    def expects_ready(self, name: str) -> bool:
        """Whether `name` is desired loaded and may still become ready (so waiting is worthwhile)."""
        model = self.desired.model(name) if self.desired else None
        if model is None or model.state != DesiredModelState.LOADED:
            return False
        failure = self._failures.get(name)
        return not (failure and failure.permanent)

    async def wait_route(self, name: str, timeout: float) -> Route | None:
        """The route for `name`, waiting up to `timeout` seconds while it is loading."""
        deadline = time.monotonic() + timeout
        async with self._routes_changed:
            while (route := self._routes.get(name)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.expects_ready(name):
                    return None
                try:
                    await asyncio.wait_for(self._routes_changed.wait(), min(remaining, 1.0))
                except asyncio.TimeoutError:
                    pass
            return route

    # -- status -------------------------------------------------------------------
    def _update_statuses(self, fingerprints: dict[str, str], blocked: frozenset[str]) -> None:
        assert self.desired is not None
        now = self.clock()
        desired_names = {m.name for m in self.desired.models}
        for model in self.desired.models:
            status = self.statuses.setdefault(model.name, ModelStatus())
            route = self._routes.get(model.name)
            worker = self.pool.get(route.worker_id) if route else None
            failure = self._failures.get(model.name)
            if model.state != DesiredModelState.LOADED:
                busy = any(n == model.name for n, _ in self._workers.values())
                phase = Phase.UNLOADING if busy else Phase.UNLOADED
                reason, message = ("Unloading", "stopping its worker") if busy else ("Unloaded", "state is unloaded")
            elif failure and failure.fingerprint == fingerprints[model.name] and model.name in blocked and (
                failure.permanent or route is None
            ):
                phase = Phase.FAILED if failure.permanent else Phase.PENDING
                reason = "LoadFailed" if failure.permanent else "BackOff"
                message = failure.message
                if route is not None:
                    message += " (the previous spec keeps serving)"
            elif model.name in self._loading:
                phase, reason, message = Phase.LOADING, "Loading", "starting a worker"
            elif route is not None and self._workers.get(route.worker_id, ("", ""))[1] == fingerprints[model.name]:
                phase, reason, message = Phase.READY, "Ready", f"serving at {route.address}"
            else:
                phase, reason, message = Phase.PENDING, "Pending", "waiting to be loaded"
            if phase != status.phase:
                status.phase = phase
            status.reason, status.message = reason, message
            status.pid = worker.pid if worker else None
            status.address = worker.address if worker else None
            status.started_at = worker.started_at if worker else None
            status.measured_bytes = worker.memory_bytes() if worker else None
            status.observed_generation = self.generation
            status.set_condition("Ready", phase == Phase.READY, reason, message, self.generation, now)
        for name in list(self.statuses):
            if name not in desired_names:
                busy = any(n == name for n, _ in self._workers.values())
                if busy:
                    self.statuses[name].phase = Phase.UNLOADING
                else:
                    del self.statuses[name]

    def desired_phase(self, model: ModelSpec) -> Phase:
        return Phase.READY if model.state == DesiredModelState.LOADED else Phase.UNLOADED

    def converged(self) -> bool:
        if self.desired is None or self.observed_generation != self.generation or self._tasks:
            return False
        return all(
            self.statuses.get(m.name, ModelStatus()).phase == self.desired_phase(m) for m in self.desired.models
        )

    # -- shutdown -----------------------------------------------------------------
    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.pool.stop_all(self.settings.stop_grace)

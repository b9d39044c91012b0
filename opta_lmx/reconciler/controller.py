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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
from opta_lmx.reconciler.view import LoopHealth
from opta_lmx.reconciler.plan import (
    LoadModel,
    MemoryFigures,
    ObservedWorker,
    Plan,
    UnloadModel,
    UnloadReason,
    Unschedulable,
    plan,
)
from opta_lmx.state.document import ConfigError, Document, read_document
from opta_lmx.state.quantities import format_size
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


def resolve_source(config_path: Path, source: str) -> str:
    """Local paths are taken relative to models.yaml; anything else is a hub id."""
    if source.startswith(("/", "./", "../", "~")):
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = (Path(config_path).parent / path).resolve()
        return str(path)
    return source


class Traffic:
    """A worker's in-flight requests, counted by the gateway and read by the loop (drain, idle)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self.in_flight = 0
        self.last_used = clock()

    def begin(self) -> None:
        self.in_flight += 1
        self.last_used = self._clock()

    def end(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_used = self._clock()

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.in_flight else max(0.0, now - self.last_used)


@dataclass(frozen=True)
class Route:
    """Where requests for a model go now, and the counter of what is in flight there."""

    name: str
    address: str
    worker_id: str
    traffic: Traffic = field(compare=False)


_UNLOAD_EVENT = {
    UnloadReason.REMOVED: "Removed",
    UnloadReason.UNLOADED: "Unloading",
    UnloadReason.EVICTED: "Evicted",
    UnloadReason.IDLE: "IdleUnload",
    UnloadReason.PRESSURE: "MemoryPressure",
    UnloadReason.REPLACED: "Replaced",
}


@dataclass(frozen=True)
class LoopSettings:
    resync_interval: float = 30.0
    ready_timeout: float = 600.0
    stop_grace: float = 10.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 120.0  # a worker up this long resets its crash backoff
    watch_debounce_ms: int = 100
    drain_timeout: float = 30.0  # in-flight requests of a worker being unloaded get this long
    memory_wait_timeout: float = 300.0  # a load waiting for unloads to free memory gives up after this
    demand_ttl: float = 120.0  # an on-demand request counts as demand this long (its wait bound)
    memory_check_interval: float = 2.0  # how often free memory is compared with the reserve


class Reconciler:
    def __init__(
        self,
        config_path: str | os.PathLike[str],
        pool: WorkerPool,
        *,
        settings: LoopSettings = LoopSettings(),
        events: EventLog | None = None,
        clock=time.time,
        memory_probe: Callable[[], tuple[int, int]] = engine_memory.machine_memory,
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
        self.memory_probe = memory_probe  # () -> (physical bytes, available bytes)
        self.memory = MemoryFigures()
        self.physical_bytes = 0
        self.last_plan: Plan | None = None
        self._estimates: dict[str, MemoryEstimate] = {}  # fingerprint -> estimate
        self._measured_max: dict[str, int] = {}  # fingerprint -> most measured for a worker of it
        self._fp_override: dict[str, int] = {}  # fingerprint -> the `memory:` override it was planned with
        self._measured: dict[str, int] = {}  # worker id -> last measurement
        self._mlx_bytes: dict[str, int] = {}  # worker id -> MLX active+cache bytes it reported
        self._traffic: dict[str, Traffic] = {}  # worker id -> in-flight counter
        self._draining: dict[str, str] = {}  # worker id -> why (still finishing requests)
        self._stopping_ids: set[str] = set()  # worker ids being stopped
        self._waiting: dict[str, str] = {}  # model -> why its load waits for memory
        self._demand: dict[str, float] = {}  # on-demand model -> when a request last asked for it
        self._verdicts: dict[str, Unschedulable] = {}
        self._background: set[asyncio.Task] = set()
        self._recovered: list[Worker] | None = None  # a previous run's workers, until adopted or stopped
        self.passes = 0
        self._running = False
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
        self._running = True
        watcher = asyncio.create_task(self._watch_file(), name="watch-models-yaml")
        monitor = asyncio.create_task(self._watch_memory(), name="watch-memory")
        try:
            while not self._stopping:
                await self.reconcile_once()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.settings.resync_interval)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()
        finally:
            self._running = False
            watcher.cancel()
            monitor.cancel()

    def health(self) -> LoopHealth:
        """Whether the loop runs (read by readiness and /metrics)."""
        return LoopHealth(running=self._running)

    async def _watch_memory(self) -> None:
        """Nudge when the machine's free memory falls below the reserve (pressure), between resyncs."""
        was_short = False
        while not self._stopping:
            await asyncio.sleep(self.settings.memory_check_interval)
            if self.desired is None:
                continue
            try:
                _physical, available = self.memory_probe()
            except Exception:  # noqa: BLE001 - a failed probe must not stop the loop
                log.exception("reading the machine's memory failed")
                continue
            short = available < self.desired.memory.reserve_bytes()
            if short and not was_short:
                log.warning("free memory %s is below the reserve %s", format_size(available),
                            format_size(self.desired.memory.reserve_bytes()))
            if short:
                self.nudge()
            was_short = short

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
            now = self.clock()
            observed = self._observe(fingerprints)
            self.memory = self._memory_figures()
            blocked = frozenset(
                name
                for name, failure in self._failures.items()
                if failure.fingerprint == fingerprints.get(name)
                and (failure.permanent or failure.retry_at > now)
            )
            result = plan(
                desired, fingerprints, observed, blocked, memory=self.memory,
                estimates=self._planning_estimates(fingerprints), demand=self.active_demand(),
                idle=self._idle_seconds(now),
            )
            self.last_plan = result
            self._verdicts = result.unschedulable
            for action in result.actions:
                if isinstance(action, UnloadModel):
                    self._start_unload(action)
                elif isinstance(action, LoadModel):
                    self._start_load(action)
            self._update_statuses(fingerprints, blocked)
            self.observed_generation = self.generation
            wake_times = [f.retry_at for f in self._failures.values() if not f.permanent and f.retry_at > now]
            wake_times += self._idle_deadlines(now)
            wake_times += [t + self.settings.demand_ttl for t in self._demand.values()]
            wake_times = [t for t in wake_times if t > now]
            if wake_times:
                asyncio.get_running_loop().call_later(min(wake_times) - now + 0.01, self.nudge)

    # -- memory and demand (observations the planner reads) ---------------------------
    def estimate(self, model: ModelSpec) -> MemoryEstimate:
        """The footprint `model` is planned with before it runs (cached per fingerprint)."""
        spec = self.worker_spec(model)
        override = model.memory_bytes()
        key = spec.fingerprint + (f":{override}" if override is not None else "")
        if key not in self._estimates:
            self._estimates[key] = engine_memory.estimate(spec.source, spec.engine, override)
        if override is not None:
            self._fp_override[spec.fingerprint] = override
        else:
            self._fp_override.pop(spec.fingerprint, None)
        return self._estimates[key]

    def _planning_estimates(self, fingerprints: dict[str, str]) -> dict[str, int]:
        """Estimates, raised to what a worker of the same spec was measured at (no re-admission on a guess)."""
        assert self.desired is not None
        result = {}
        for model in self.desired.models:
            estimate = self.estimate(model)
            if estimate.override_bytes is not None:
                result[model.name] = estimate.override_bytes
            else:
                result[model.name] = max(estimate.total_bytes, self._measured_max.get(fingerprints[model.name], 0))
        return result

    def _worker_bytes(self, name: str, fingerprint: str, worker_id: str) -> int:
        """What a worker counts for in planning: the entry's `memory:` override, else its measurement."""
        assert self.desired is not None
        model = self.desired.model(name)
        if model is not None and self.worker_spec(model).fingerprint == fingerprint:
            estimate = self.estimate(model)
            if estimate.override_bytes is not None:
                return estimate.override_bytes
            measured = self._measured.get(worker_id)
            return measured if measured is not None else estimate.total_bytes
        if fingerprint in self._fp_override:  # an old spec keeps the override it was planned with
            return self._fp_override[fingerprint]
        return self._measured.get(worker_id) or self._measured_max.get(fingerprint, 0)

    def _observe(self, fingerprints: dict[str, str]) -> list[ObservedWorker]:
        """The engine's workers (serving, draining, loading) with what each holds, measured now."""
        observed = []
        for wid, (name, fingerprint) in self._workers.items():
            worker = self.pool.get(wid)
            rss = worker.memory_bytes() if worker else None
            if rss is not None:
                measured = rss + self._mlx_bytes.get(wid, 0)
                self._measured[wid] = measured
                self._measured_max[fingerprint] = max(self._measured_max.get(fingerprint, 0), measured)
            traffic = self._traffic.get(wid)
            observed.append(ObservedWorker(name, wid, fingerprint, True, self._worker_bytes(name, fingerprint, wid),
                                           traffic.in_flight if traffic else 0))
        assert self.desired is not None
        estimates = self._planning_estimates(fingerprints) if self._loading else {}
        for name, fingerprint in self._loading.items():
            model = self.desired.model(name)
            if model is not None and fingerprints.get(name) == fingerprint:
                size = estimates.get(name, 0)
            else:
                size = self._measured_max.get(fingerprint, 0)
            observed.append(ObservedWorker(name, f"loading:{name}:{fingerprint}", fingerprint, False, size))
        return observed

    def _memory_figures(self) -> MemoryFigures:
        assert self.desired is not None
        physical, available = self.memory_probe()
        self.physical_bytes = physical
        return MemoryFigures(self.desired.memory.budget_bytes(physical), self.desired.memory.reserve_bytes(),
                             available)

    def request_model(self, name: str) -> None:
        """A request is waiting for on-demand model `name`: an observation the next pass reads."""
        self._demand[name] = self.clock()
        self.nudge()

    def active_demand(self) -> frozenset[str]:
        now = self.clock()
        for name, since in list(self._demand.items()):
            if now - since > self.settings.demand_ttl or name in self._routes:
                del self._demand[name]
        return frozenset(self._demand)

    def _idle_seconds(self, now: float) -> dict[str, float]:
        """Per model, seconds since its workers last served (0 while any request is in flight)."""
        idle: dict[str, float] = {}
        for wid, (name, _fp) in self._workers.items():
            traffic = self._traffic.get(wid)
            seconds = traffic.idle_seconds(now) if traffic else 0.0
            idle[name] = min(idle.get(name, seconds), seconds)
        return idle

    def _idle_deadlines(self, now: float) -> list[float]:
        """When running on-demand models reach their idle_ttl (so a pass unloads them on time)."""
        assert self.desired is not None
        times = []
        for name, seconds in self._idle_seconds(now).items():
            model = self.desired.model(name)
            ttl = model.idle_ttl_seconds() if model and model.state == DesiredModelState.ON_DEMAND else None
            if ttl is not None:
                times.append(now + max(ttl - seconds, 0.0))
        return times

    def worker_present(self, worker_id: str) -> bool:
        """Whether a worker (or a load, `loading:<name>:<fp>`) still holds memory."""
        if worker_id.startswith("loading:"):
            _, name, fingerprint = worker_id.split(":", 2)
            return self._loading.get(name) == fingerprint
        return worker_id in self._workers

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
            self._forget_worker(worker.id)
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
            if model is None or model.state == DesiredModelState.UNLOADED:  # on-demand ones are kept (idle TTL)
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
                await self._set_route(self._route_to(name, worker))
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
        return resolve_source(self.config_path, source)

    def _start_load(self, action: LoadModel) -> None:
        key = f"load:{action.name}"
        if key in self._tasks:
            return
        spec = self.worker_spec(action.spec)
        if spec.source.startswith("/") and not Path(spec.source).exists():
            self._fail(action.name, action.fingerprint, f"source path does not exist: {spec.source}", permanent=True)
            return
        self._loading[action.name] = action.fingerprint
        if action.after:
            self._waiting[action.name] = (
                f"waiting for {len(action.after)} worker(s) to drain and unload to free memory "
                f"({format_size(action.bytes)} needed)"
            )
            self.events.record(action.name, "WaitingForMemory", self._waiting[action.name])
        else:
            self.statuses.setdefault(action.name, ModelStatus()).phase = Phase.LOADING
            self.events.record(action.name, "Loading", f"loading {spec.source} ({action.reason}; "
                                                      f"planned at {format_size(action.bytes)})")
        self._tasks[key] = asyncio.create_task(
            self._load(action.name, action.fingerprint, spec, action.after), name=key
        )

    async def _load(self, name: str, fingerprint: str, spec: WorkerSpec, after: tuple[str, ...] = ()) -> None:
        try:
            if after:
                deadline = time.monotonic() + self.settings.memory_wait_timeout
                while any(self.worker_present(w) for w in after):
                    if time.monotonic() > deadline:
                        raise WorkerStartError(
                            f"memory was not freed within {self.settings.memory_wait_timeout:.0f}s", permanent=False
                        )
                    await asyncio.sleep(0.05)
                self._waiting.pop(name, None)
                self.statuses.setdefault(name, ModelStatus()).phase = Phase.LOADING
                self.events.record(name, "Loading", f"loading {spec.source} (memory freed)")
            worker = await self.pool.start(spec, self.settings.ready_timeout)
            self._workers[worker.id] = (name, fingerprint)
            self._ready.add(worker.id)
            self._demand.pop(name, None)
            status = self.statuses.setdefault(name, ModelStatus())
            status.load_seconds = worker.load_seconds
            self.events.record(name, "Ready", f"serving at {worker.address} (pid {worker.pid}, loaded in {worker.load_seconds:.1f}s)")
            log.info("model %s ready at %s in %.1fs", name, worker.address, worker.load_seconds or 0)
            await self._set_route(self._route_to(name, worker))
            measuring = asyncio.create_task(self._measure_mlx(worker.id, worker.address))
            self._background.add(measuring)
            measuring.add_done_callback(self._background.discard)
        except WorkerStartError as error:
            self._fail(name, fingerprint, str(error), permanent=error.permanent, log_tail=error.log_tail)
        except asyncio.CancelledError:
            return
        finally:
            self._tasks.pop(f"load:{name}", None)
            self._waiting.pop(name, None)
            if self._loading.get(name) == fingerprint:
                self._loading.pop(name, None)
            self.nudge()

    async def _measure_mlx(self, worker_id: str, address: str) -> None:
        """MLX's own figure (Metal active + cache) for a new worker; 0 on the CPU backend."""
        measured = await engine_memory.mlx_memory_bytes(address)
        if worker_id in self._workers:
            self._mlx_bytes[worker_id] = measured

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
        if action.worker_id.startswith("loading:"):
            # Still loading (its spec changed, it was removed or evicted): cancel the load.
            _, name, fingerprint = action.worker_id.split(":", 2)
            task = self._tasks.get(f"load:{name}")
            if task and self._loading.get(name) == fingerprint:
                self.events.record(name, "LoadCancelled", action.message or action.reason.value)
                task.cancel()
            return
        if action.worker_id not in self._workers:
            return
        name, _fingerprint = self._workers[action.worker_id]
        key = f"unload:{action.worker_id}"
        if key in self._tasks:
            return
        worker = self.pool.get(action.worker_id)
        self._ready.discard(action.worker_id)
        self._drop_route(name, action.worker_id)  # no new requests from here on
        self._draining[action.worker_id] = action.message or action.reason.value
        kind = "Warning" if action.reason in (UnloadReason.EVICTED, UnloadReason.PRESSURE) else "Normal"
        self.events.record(
            name, _UNLOAD_EVENT[action.reason],
            f"draining and stopping worker pid {worker.pid if worker else '?'}: {action.message or action.reason.value}",
            kind=kind,
        )
        self._tasks[key] = asyncio.create_task(self._unload(action.worker_id, worker, name), name=key)

    async def _unload(self, worker_id: str, worker: Worker | None, name: str) -> None:
        """Drain (in-flight requests finish, bounded by drain_timeout), then stop (bounded by stop_grace)."""
        try:
            traffic = self._traffic.get(worker_id)
            if traffic is not None and traffic.in_flight:
                self.events.record(name, "Draining", f"waiting for {traffic.in_flight} request(s) in flight")
                deadline = time.monotonic() + self.settings.drain_timeout
                while traffic.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if traffic.in_flight:
                    self.events.record(name, "DrainTimeout", f"{traffic.in_flight} request(s) still in flight after "
                                       f"{self.settings.drain_timeout:.0f}s; stopping anyway", kind="Warning")
            self._draining.pop(worker_id, None)
            self._stopping_ids.add(worker_id)
            if worker is not None:
                await self.pool.stop(worker, self.settings.stop_grace)
            self.events.record(name, "Unloaded", f"worker {worker_id} stopped")
        finally:
            self._workers.pop(worker_id, None)
            self._draining.pop(worker_id, None)
            self._stopping_ids.discard(worker_id)
            self._forget_worker(worker_id)
            self._tasks.pop(f"unload:{worker_id}", None)
            self.nudge()

    def _forget_worker(self, worker_id: str) -> None:
        self._traffic.pop(worker_id, None)
        self._measured.pop(worker_id, None)
        self._mlx_bytes.pop(worker_id, None)

    # -- routing (read by the gateway) ---------------------------------------------
    def _route_to(self, name: str, worker: Worker) -> Route:
        """A route to `worker`, carrying its one in-flight counter (the drain and idle TTL read it)."""
        return Route(name, worker.address, worker.id, self._traffic.setdefault(worker.id, Traffic(self.clock)))

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
                    self._routes[name] = self._route_to(name, worker)
                    return
            del self._routes[name]

    def resolve(self, name_or_alias: str) -> ModelSpec | None:
        return self.desired.resolve(name_or_alias) if self.desired else None

    def note_request(self, name: str) -> None:
        """The gateway saw a request for `name`: an observation the loop may read (idle, demand)."""
        model = self.desired.model(name) if self.desired else None
        if model is not None and model.state == DesiredModelState.ON_DEMAND and name not in self._routes:
            self.request_model(name)

    def route(self, name: str) -> Route | None:
        return self._routes.get(name)

    def expects_ready(self, name: str) -> bool:
        """Whether `name` may still become ready (so waiting is worthwhile): desired loaded, or
        on-demand and asked for; not failed for good, and not refused for want of memory."""
        model = self.desired.model(name) if self.desired else None
        if model is None or model.state == DesiredModelState.UNLOADED:
            return False
        if model.state == DesiredModelState.ON_DEMAND and name not in self._demand and name not in self._loading:
            return False
        if name in self._verdicts and name not in self._loading:
            return False
        failure = self._failures.get(name)
        return not (failure and failure.permanent and failure.fingerprint == self.worker_spec(model).fingerprint)

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
            phase, reason, message = self._phase_of(model, fingerprints[model.name], blocked)
            route = self._routes.get(model.name)
            worker = self.pool.get(route.worker_id) if route else None
            if phase != status.phase and phase == Phase.UNSCHEDULABLE:  # the other phases have their own events
                self.events.record(model.name, reason, message, kind="Warning")
            status.phase = phase
            status.reason, status.message = reason, message
            status.pid = worker.pid if worker else None
            status.address = worker.address if worker else None
            status.started_at = worker.started_at if worker else None
            status.estimated_bytes = self.estimate(model).total_bytes
            status.measured_bytes = self._measured.get(route.worker_id) if route else None
            status.observed_generation = self.generation
            status.set_condition("Ready", phase == Phase.READY, reason, message, self.generation, now)
            verdict = self._verdicts.get(model.name)
            if verdict is not None:
                scheduled = (False, "InsufficientMemory", verdict.message)
            elif phase == Phase.UNLOADED:
                scheduled = (False, "NotWanted", message)
            else:
                scheduled = (True, "Fits", f"planned at {format_size(self._planned_bytes(model))} "
                             f"within the {format_size(self.memory.budget_bytes)} budget")
            status.set_condition("Scheduled", *scheduled, self.generation, now)
        for name in list(self.statuses):
            if name not in desired_names:
                busy = any(n == name for n, _ in self._workers.values())
                if busy:
                    self.statuses[name].phase = Phase.UNLOADING
                else:
                    del self.statuses[name]

    def _planned_bytes(self, model: ModelSpec) -> int:
        route = self._routes.get(model.name)
        if route is not None and route.worker_id in self._workers:
            return self._worker_bytes(model.name, self._workers[route.worker_id][1], route.worker_id)
        estimate = self.estimate(model)
        return estimate.total_bytes

    def _phase_of(self, model: ModelSpec, fingerprint: str, blocked: frozenset[str]) -> tuple[Phase, str, str]:
        """The phase, reason and message of one model, from what the loop knows now."""
        name = model.name
        route = self._routes.get(name)
        mine = [wid for wid, (n, _fp) in self._workers.items() if n == name]
        failure = self._failures.get(name)
        if failure and failure.permanent and failure.fingerprint == fingerprint and model.state != DesiredModelState.UNLOADED:
            return Phase.FAILED, "LoadFailed", failure.message + (" (the previous spec keeps serving)" if route else "")
        if name in self._loading:
            if name in self._waiting:
                return Phase.PENDING, "WaitingForMemory", self._waiting[name]
            return Phase.LOADING, "Loading", "starting a worker"
        if route is not None and self._workers.get(route.worker_id, ("", ""))[1] == fingerprint:
            return Phase.READY, "Ready", f"serving at {route.address}"
        draining = [wid for wid in mine if wid in self._draining]
        if draining:
            return Phase.DRAINING, "Draining", self._draining[draining[0]]
        if any(wid in self._stopping_ids or f"unload:{wid}" in self._tasks for wid in mine):
            return Phase.UNLOADING, "Unloading", "stopping its worker"
        if failure and name in blocked:
            return Phase.PENDING, "CrashLoopBackOff" if "crash-looping" in failure.message else "BackOff", (
                failure.message + (" (the previous spec keeps serving)" if route else ""))
        verdict = self._verdicts.get(name)
        if verdict is not None:
            return Phase.UNSCHEDULABLE, "InsufficientMemory", verdict.message
        if model.state == DesiredModelState.UNLOADED:
            return Phase.UNLOADED, "Unloaded", "state is unloaded"
        if model.state == DesiredModelState.ON_DEMAND and name not in self._demand:
            return Phase.UNLOADED, "Standby", "on-demand: loads when a request asks for it"
        return Phase.PENDING, "Pending", "waiting to be loaded"

    def desired_phase(self, model: ModelSpec) -> Phase:
        return Phase.READY if model.state == DesiredModelState.LOADED else Phase.UNLOADED

    def converged(self) -> bool:
        if self.desired is None or self.observed_generation != self.generation or self._tasks:
            return False
        for model in self.desired.models:
            phase = self.statuses.get(model.name, ModelStatus()).phase
            if model.state == DesiredModelState.ON_DEMAND:
                if phase not in (Phase.READY, Phase.UNLOADED):
                    return False
            elif phase != self.desired_phase(model):
                return False
        return True

    def observation(self) -> dict:
        """What the loop observes, as plain data: enough for `lmx plan` to plan against this server."""
        now = self.clock()
        workers = []
        for wid, (name, fingerprint) in self._workers.items():
            traffic = self._traffic.get(wid)
            workers.append({
                "name": name, "worker_id": wid, "fingerprint": fingerprint, "ready": True,
                "bytes": self._worker_bytes(name, fingerprint, wid) if self.desired else self._measured.get(wid, 0),
                "measured_bytes": self._measured.get(wid), "in_flight": traffic.in_flight if traffic else 0,
                "draining": wid in self._draining or wid in self._stopping_ids,
            })
        fingerprints = {m.name: self.worker_spec(m).fingerprint for m in self.desired.models} if self.desired else {}
        for name, fingerprint in self._loading.items():
            size = self._planning_estimates(fingerprints).get(name, 0) if self.desired else 0
            workers.append({"name": name, "worker_id": f"loading:{name}:{fingerprint}", "fingerprint": fingerprint,
                            "ready": False, "bytes": size, "measured_bytes": None, "in_flight": 0, "draining": False})
        held = sum(w["bytes"] for w in workers)
        return {
            "memory": {
                "physical_bytes": self.physical_bytes, "budget_bytes": self.memory.budget_bytes,
                "reserve_bytes": self.memory.reserve_bytes, "available_bytes": self.memory.available_bytes,
                "held_bytes": held,
            },
            "workers": workers,
            "measured_max": dict(self._measured_max),
            "blocked": [
                {"name": n, "fingerprint": f.fingerprint} for n, f in self._failures.items()
                if f.permanent or f.retry_at > now
            ],
            "demand": sorted(self._demand),
            "idle_seconds": self._idle_seconds(now),
        }

    # -- shutdown -----------------------------------------------------------------
    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.pool.stop_all(self.settings.stop_grace)

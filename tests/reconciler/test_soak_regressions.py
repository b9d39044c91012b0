"""Regressions for what the soak (bench/soak.py, docs/benchmarks.md) found, each reproduced
deterministically: a stand-in pool, and delays injected where the real run had contention.

Bug 2: a worker that became ready must be routed or stopped, never left alive and unrouted, and
a pass stuck on an await must not freeze the loop. Bug 3: a load cancelled twice while its
worker is being stopped must not leave the worker's record behind."""

from __future__ import annotations

import asyncio

from opta_lmx.engine import pool as pool_module
from opta_lmx.engine.pool import WorkerPool
from opta_lmx.engine.records import WorkerRecord
from opta_lmx.engine.worker import WorkerSpec
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB, until

MODEL_A = "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n"
SETTINGS = LoopSettings(backoff_base=1, backoff_max=4, pass_backoff_base=0.05, pass_backoff_max=0.2,
                        resync_interval=0.2, memory_check_interval=0.1, pass_timeout=0.5, stop_grace=0.1)


def make(tmp_path, pool=None):
    (tmp_path / "models.yaml").write_text(MODEL_A)
    pool = pool or FakePool()
    return Reconciler(tmp_path / "models.yaml", pool, settings=SETTINGS,
                      memory_probe=lambda: (16_000 * MiB, 10_000 * MiB)), pool


def gate_route_setting(reconciler) -> asyncio.Event:
    """Setting a route waits until the returned event is set (the gateway's waiters holding the
    table's lock, as in the soak): the gap between a worker's Ready and its route, held open."""
    gate, real_set = asyncio.Event(), reconciler.routes.set

    async def slow_set(route):
        await gate.wait()
        await real_set(route)

    reconciler.routes.set = slow_set
    return gate


def test_a_load_cancelled_after_its_worker_became_ready_still_routes_it(tmp_path):
    reconciler, pool = make(tmp_path)

    async def scenario():
        gate = gate_route_setting(reconciler)
        await reconciler.reconcile_once()
        await until(lambda: reconciler.ledger.serving("a") is not None)  # Ready, route not set yet
        load = reconciler.actions.tasks["load:a"]
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        gate.set()
        await until(lambda: not reconciler.actions._background)
        await reconciler.reconcile_once()
        (worker,) = pool.workers()
        route = reconciler.route("a")
        assert route is not None and route.worker_id == worker.id and worker.alive()
        assert reconciler.statuses["a"].phase == Phase.READY
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_worker_unloaded_while_its_route_was_being_set_is_not_routed(tmp_path):
    reconciler, pool = make(tmp_path)

    async def scenario():
        gate = gate_route_setting(reconciler)
        await reconciler.reconcile_once()
        await until(lambda: reconciler.ledger.serving("a") is not None)
        (tmp_path / "models.yaml").write_text(MODEL_A.replace("}", ", state: unloaded}"))
        await reconciler.reconcile_once()  # a pass in the gap: the ready worker is unloaded
        await until(lambda: not any(k.startswith("unload:") for k in reconciler.actions.tasks))
        assert pool.stopped == ["a"] and not pool.workers()
        assert not [e for e in reconciler.events.since() if e.reason == "LoadCancelled"]
        gate.set()
        await until(lambda: not reconciler.actions.tasks and not reconciler.actions._background)
        assert reconciler.route("a") is None  # no route to the stopped worker
        await reconciler.reconcile_once()
        assert reconciler.statuses["a"].phase == Phase.UNLOADED
        await reconciler.shutdown()

    asyncio.run(scenario())


class MeasureHangsOncePool(FakePool):
    """The first pass awaits a measurement that never comes (the real pool bounds its own; the
    watchdog is what bounds every await of a pass, whatever it is)."""

    def __init__(self):
        super().__init__()
        self.hung = asyncio.Event()

    async def measure(self):
        if not self.hung.is_set():
            self.hung.set()
            await asyncio.Event().wait()  # never answers
        return await super().measure()


def test_a_pass_stuck_on_an_await_is_cut_by_the_watchdog_and_the_loop_goes_on(tmp_path):
    reconciler, pool = make(tmp_path, MeasureHangsOncePool())

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        await until(lambda: pool.hung.is_set())
        await until(lambda: reconciler.passes >= 5 and reconciler.route("a") is not None)
        health = reconciler.health()
        assert health.running and health.pass_failures == 1
        assert health.last_error.startswith("PassTimeout")
        (event,) = [e for e in reconciler.events.since() if e.reason == "ReconcileError"]
        assert event.kind == "Warning" and "did not finish within" in event.message
        await reconciler.shutdown()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


class SlowToStopWorker:
    """A worker that never becomes ready and takes a while to stop (the soak's 'did not stop
    within 2.0s; killing it'), standing in for engine.worker.Worker inside the real pool."""

    stop_gate: asyncio.Event
    fast_starts = False  # nothing prepared suits it: the pool starts it cold

    def __init__(self, spec, *, run_dir, **_options):
        self.spec, self.id, self.run_dir = spec, f"{spec.name}-slow", run_dir
        self.stopped = False

    def spawn(self, prepared=None):
        return None

    def environment(self):
        return {}

    def record(self):
        return WorkerRecord(worker_id=self.id, name=self.spec.name, fingerprint="f", source="/tmp", engine={},
                            pid=1, create_time=0.0, host="127.0.0.1", port=9, address="http://127.0.0.1:9",
                            log_path="", run_dir=str(self.run_dir))

    async def wait_ready(self, _timeout):
        await asyncio.Event().wait()

    async def stop(self, grace):
        await SlowToStopWorker.stop_gate.wait()
        self.stopped = True

    def alive(self):
        return not self.stopped

    def close_listener(self):
        return None


def test_a_load_cancelled_twice_while_its_worker_stops_leaves_no_record(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "Worker", SlowToStopWorker)
    pool = WorkerPool(tmp_path / "run")

    async def scenario():
        SlowToStopWorker.stop_gate = asyncio.Event()
        spec = WorkerSpec("a", "/tmp")
        start = asyncio.create_task(pool.start(spec, 600))
        await until(lambda: pool.records.load_all())  # spawned, record written, loading
        start.cancel()  # the load is cancelled: the pool stops the worker, shielded
        await asyncio.sleep(0.05)
        start.cancel()  # cancelled again during that stop (the next pass, or shutdown)
        await asyncio.gather(start, return_exceptions=True)
        SlowToStopWorker.stop_gate.set()
        await until(lambda: not pool.workers())
        assert pool.records.load_all() == []

    asyncio.run(scenario())

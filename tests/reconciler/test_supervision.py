"""The supervised loop, with a stand-in pool: a pass that raises is logged, recorded, counted and
retried until the loop converges; a load that fails, whatever raised, backs off instead of
spinning; shutdown always completes; a loop task that ends says so in health()."""

from __future__ import annotations

import asyncio

import pytest

from opta_lmx.engine.pool import Pool, Recovered, WorkerPool
from opta_lmx.reconciler import controller as controller_module
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB, until

MODELS = "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n  - {name: b, source: /tmp, memory: 10MiB}\n"
SETTINGS = LoopSettings(backoff_base=1, backoff_max=4, pass_backoff_base=0.05, pass_backoff_max=0.2,
                        resync_interval=0.2, memory_check_interval=0.1)


def make(tmp_path, pool=None):
    (tmp_path / "models.yaml").write_text(MODELS)
    pool = pool or FakePool()
    return Reconciler(tmp_path / "models.yaml", pool, settings=SETTINGS,
                      memory_probe=lambda: (16_000 * MiB, 10_000 * MiB)), pool


def ready(reconciler, *names):
    return all(reconciler.statuses.get(n) and reconciler.statuses[n].phase == Phase.READY for n in names)


class RecoverFailsOnce(FakePool):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def recover(self):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("records directory unreadable")
        return Recovered()


def test_a_pass_that_raises_is_recorded_counted_and_the_loop_converges(tmp_path):
    reconciler, pool = make(tmp_path, RecoverFailsOnce())

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        await until(lambda: ready(reconciler, "a", "b"))
        health = reconciler.health()
        assert health.running and health.pass_failures == 1
        assert health.last_error == "RuntimeError: records directory unreadable"
        (event,) = [e for e in reconciler.events.since() if e.reason == "ReconcileError"]
        assert event.kind == "Warning" and "records directory unreadable" in event.message
        await reconciler.shutdown()
        await asyncio.gather(task, return_exceptions=True)
        assert not reconciler.health().running

    asyncio.run(scenario())


def test_a_planner_fault_is_retried_with_backoff_until_it_clears(tmp_path, monkeypatch):
    reconciler, pool = make(tmp_path)
    real_plan, failures = controller_module.plan, [3]

    def flaky_plan(*args, **kwargs):
        if failures[0]:
            failures[0] -= 1
            raise ValueError("bad figure")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(controller_module, "plan", flaky_plan)

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        await until(lambda: ready(reconciler, "a", "b"))
        assert reconciler.health().pass_failures == 3
        assert reconciler.supervisor.failures_in_a_row == 0  # a good pass resets the backoff
        await reconciler.shutdown()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


def test_pass_backoff_is_exponential_and_capped(tmp_path):
    reconciler, _pool = make(tmp_path)
    supervisor = reconciler.supervisor

    async def failing():
        raise OSError("disk")

    async def scenario():
        supervisor.run_pass = failing
        delays = [await supervisor.guarded_pass() for _ in range(5)]
        assert delays == [0.05, 0.1, 0.2, 0.2, 0.2]
        supervisor.run_pass = reconciler.reconcile_once
        assert await supervisor.guarded_pass() == SETTINGS.resync_interval
        assert supervisor.pass_failures == 5 and supervisor.failures_in_a_row == 0

    asyncio.run(scenario())


def test_a_loop_task_that_ends_says_why(tmp_path):
    reconciler, _pool = make(tmp_path)

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        await until(lambda: reconciler.health().running and ready(reconciler, "a"))
        task.cancel()  # not a shutdown: nobody asked the loop to stop
        await asyncio.gather(task, return_exceptions=True)
        health = reconciler.health()
        assert not health.running and "cancelled" in (health.last_error or "")
        await reconciler.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("error", [OSError(24, "Too many open files"), ValueError("embedded null byte"),
                                   RuntimeError("record write failed")])
def test_a_load_failing_with_any_error_backs_off_instead_of_spinning(tmp_path, error):
    reconciler, pool = make(tmp_path)
    pool.start_error = error

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        await asyncio.sleep(2.0)  # a window to count attempts in (1,888 in 5 s before the fix)
        # backoff 1 s, 2 s...: each model tries at most twice in 2 s, whatever the nudges
        assert 2 <= pool.attempts <= 4, pool.attempts
        status = reconciler.statuses["a"]
        assert status.phase == Phase.PENDING and status.reason == "BackOff"
        assert type(error).__name__ in status.message and type(error).__name__ in status.last_error
        assert reconciler.statuses["b"].reason == "BackOff"  # each model has its own failure
        pool.start_error = None  # the fault clears: the backoff ends and the loop converges
        await until(lambda: ready(reconciler, "a", "b"))
        await reconciler.shutdown()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())


class HangingPool(FakePool):
    async def start(self, spec, _timeout):
        self.attempts += 1
        await asyncio.Event().wait()  # a load that never finishes


def test_shutdown_completes_while_loads_hang_and_nudges_keep_coming(tmp_path):
    reconciler, pool = make(tmp_path, HangingPool())

    async def nudging():
        while True:
            reconciler.nudge()  # the wake event is set whenever the loop waits
            await asyncio.sleep(0)

    async def scenario():
        task = asyncio.create_task(reconciler.run())
        spam = asyncio.create_task(nudging())
        await until(lambda: pool.attempts == 2)
        async with asyncio.timeout(3 * SETTINGS.stop_grace):  # fails the test if shutdown hangs
            await reconciler.shutdown()
            await asyncio.gather(task, return_exceptions=True)
        spam.cancel()
        assert task.done() and not reconciler.health().running and not reconciler.actions.tasks
        assert reconciler.health().last_error is None  # a requested stop is not an error

    asyncio.run(scenario())


def test_the_fake_and_the_real_pool_satisfy_the_pool_protocol(tmp_path):
    assert isinstance(FakePool(), Pool)
    assert isinstance(WorkerPool(tmp_path / "workers"), Pool)
    assert not isinstance(object(), Pool)


def test_an_action_that_raises_fails_its_model_alone(tmp_path, monkeypatch):
    reconciler, pool = make(tmp_path)
    monkeypatch.setattr(reconciler.actions, "start_load", _raising_for("a", reconciler.actions.start_load))

    async def scenario():
        await reconciler.reconcile_once()
        await until(lambda: not reconciler.actions.tasks)
        await reconciler.reconcile_once()
        assert reconciler.statuses["b"].phase == Phase.READY and pool.started == ["b"]
        status = reconciler.statuses["a"]
        assert status.reason == "BackOff" and "OSError" in status.message, status
        await reconciler.shutdown()

    asyncio.run(scenario())


def _raising_for(name, start_load):
    def start(action):
        if action.name == name:
            raise OSError(28, "No space left on device")
        return start_load(action)
    return start


def test_the_reconciler_offers_everything_the_api_view_names(tmp_path):
    from opta_lmx.reconciler.view import ControlLoopView

    from opta_lmx.reconciler.view import GatewayView

    reconciler, _pool = make(tmp_path)
    for view in (ControlLoopView, GatewayView):
        members = set(view.__annotations__) | {
            n for n, v in vars(view).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
        assert {"health", "statuses"} <= members
        assert [m for m in sorted(members) if not hasattr(reconciler, m)] == []


def test_engine_start_comes_from_the_file_else_lmx_engine_start(monkeypatch):
    from opta_lmx.reconciler.controller import engine_start
    from opta_lmx.state.spec import DesiredState

    monkeypatch.delenv("LMX_ENGINE_START", raising=False)
    assert engine_start(DesiredState()).mode == "auto"
    monkeypatch.setenv("LMX_ENGINE_START", "cold")
    assert engine_start(DesiredState()).mode == "cold"
    assert engine_start(DesiredState(engine_start={"mode": "spare"})).mode == "spare"  # the file wins
    monkeypatch.setenv("LMX_ENGINE_START", "warp")
    assert engine_start(DesiredState()).mode == "auto"  # a bad value is ignored, with a warning

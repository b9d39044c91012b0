"""Demand in the loop, with a stand-in pool: a swap evicts the idle on-demand model (counted by
reason), and a load whose every waiting request went away is cancelled (unless desired loaded)."""

from __future__ import annotations

import asyncio

from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB


class SlowPool(FakePool):
    """Starts hang until `release` is set, so a load can be abandoned while it runs."""

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()

    async def start(self, spec, timeout):
        await self.release.wait()
        return await super().start(spec, timeout)


def make(tmp_path, text, pool, now):
    (tmp_path / "models.yaml").write_text(text)
    pool.clock = lambda: now[0]
    return Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(demand_grace=2.0),
                      clock=lambda: now[0], memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))


async def settle(reconciler, passes=4):
    for _ in range(passes):
        await reconciler.reconcile_once()
        for _ in range(50):
            if not reconciler.actions.tasks:
                break
            await asyncio.sleep(0.01)


TWO = """memory: {budget: 150MiB, reserve: 0}
models:
  - {name: a, source: /tmp, state: on-demand, memory: 100MiB}
  - {name: b, source: /tmp, state: on-demand, memory: 100MiB}
"""


def test_a_request_evicts_the_idle_on_demand_model_and_the_swap_is_counted(tmp_path):
    now = [1000.0]
    pool = FakePool()
    reconciler = make(tmp_path, TWO, pool, now)

    async def scenario():
        reconciler.requests.asked("a")
        await settle(reconciler)
        assert reconciler.statuses["a"].phase == Phase.READY
        assert "resident on demand: last request at" in reconciler.statuses["a"].message
        now[0] += 60  # past a's min_residency (10s)
        token = reconciler.routes.register("b")
        reconciler.requests.asked("b")
        await settle(reconciler)
        assert pool.started == ["a", "b"] and pool.stopped == ["a"]
        assert reconciler.statuses["b"].phase == Phase.READY
        assert reconciler.unloads_by_reason["demand"] == 1 and reconciler.demand_evictions[("a", "b")] == 1
        assert "EvictedByDemand" in [e.reason for e in reconciler.events.since() if e.object == "a"]
        reconciler.routes.unregister("b", token)
        # a asks back at once: b is within its min_residency, so a waits (Pending), it is not refused.
        token = reconciler.routes.register("a")
        reconciler.requests.asked("a")
        await settle(reconciler)
        assert reconciler.statuses["a"].phase == Phase.PENDING
        assert reconciler.statuses["a"].reason == "WaitingForSwap"
        assert "b is resident for 0s of its 10s min_residency" in reconciler.statuses["a"].message
        assert reconciler.expects_ready("a")
        reconciler.routes.unregister("a", token)
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_load_nobody_waits_for_any_more_is_cancelled_but_a_loaded_one_goes_on(tmp_path):
    now = [1000.0]
    pool = SlowPool()
    text = ("models:\n  - {name: od, source: /tmp, state: on-demand, memory: 10MiB}\n"
            "  - {name: keep, source: /tmp, memory: 10MiB}\n")
    reconciler = make(tmp_path, text, pool, now)

    async def scenario():
        token = reconciler.routes.register("od")
        reconciler.requests.asked("od")
        await reconciler.reconcile_once()
        assert reconciler.statuses["od"].phase == Phase.LOADING
        now[0] += 5  # past the demand grace, but a request still waits: the load goes on
        await reconciler.reconcile_once()
        assert reconciler.statuses["od"].phase == Phase.LOADING
        reconciler.routes.unregister("od", token)  # its client went away
        await reconciler.reconcile_once()
        await asyncio.sleep(0.05)
        assert "LoadCancelled" in [e.reason for e in reconciler.events.since() if e.object == "od"]
        pool.release.set()
        await settle(reconciler)
        assert pool.started == ["keep"]
        assert reconciler.statuses["od"].phase == Phase.UNLOADED
        assert reconciler.statuses["keep"].phase == Phase.READY
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_the_model_can_be_asked_for_again_after_its_load_was_cancelled(tmp_path):
    now = [1000.0]
    pool = SlowPool()
    reconciler = make(tmp_path, "models:\n  - {name: od, source: /tmp, state: on-demand, memory: 10MiB}\n", pool, now)

    async def scenario():
        token = reconciler.routes.register("od")
        reconciler.requests.asked("od")
        await reconciler.reconcile_once()
        reconciler.routes.unregister("od", token)
        now[0] += 5
        await reconciler.reconcile_once()  # cancelled (here even before the load task ran)
        await asyncio.sleep(0.05)
        assert not reconciler.actions.tasks and not list(reconciler.ledger)
        pool.release.set()
        token = reconciler.routes.register("od")
        reconciler.requests.asked("od")
        await settle(reconciler)
        assert pool.started == ["od"] and reconciler.statuses["od"].phase == Phase.READY
        reconciler.routes.unregister("od", token)
        await reconciler.shutdown()

    asyncio.run(scenario())

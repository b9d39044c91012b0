"""The loop around the planner, with a stand-in pool (no processes): memory pressure, drain
before unload, on-demand demand, and crash backoff. Real workers are in tests/e2e."""

from __future__ import annotations

import asyncio

from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB, until


def make(tmp_path, text, available=[10_000 * MiB]):
    (tmp_path / "models.yaml").write_text(text)
    pool = FakePool()
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(backoff_base=1, backoff_max=4),
                            memory_probe=lambda: (16_000 * MiB, available[0]))
    return reconciler, pool


async def settle(reconciler, passes=4):
    for _ in range(passes):
        await reconciler.reconcile_once()
        for _ in range(50):
            if not reconciler.actions.tasks:
                break
            await asyncio.sleep(0.01)


MODELS = """memory: {budget: 1000MiB, reserve: 500MiB}
models:
  - {name: pin, source: /tmp, pinned: true, memory: 100MiB}
  - {name: hi, source: /tmp, priority: 9, memory: 100MiB}
  - {name: lo, source: /tmp, priority: 1, memory: 100MiB}
"""


def test_memory_pressure_unloads_lowest_priority_unpinned_with_an_event(tmp_path):
    available = [10_000 * MiB]
    reconciler, pool = make(tmp_path, MODELS, available)

    async def scenario():
        await settle(reconciler)
        assert {n: s.phase for n, s in reconciler.statuses.items()} == dict.fromkeys(["pin", "hi", "lo"], Phase.READY)
        available[0] = 450 * MiB  # 50 MiB below the reserve
        await settle(reconciler, passes=1)
        assert pool.stopped == ["lo"]
        available[0] = 550 * MiB  # lo's memory came back: above the reserve, but not by enough to reload it
        (pressure,) = [e for e in reconciler.events.since() if e.reason == "MemoryPressure"]
        assert pressure.object == "lo" and "memory pressure" in pressure.message
        await settle(reconciler)  # no flapping: not reloaded while memory is short
        assert pool.started.count("lo") == 1 and pool.stopped == ["lo"]
        assert reconciler.statuses["lo"].phase == Phase.UNSCHEDULABLE
        assert "reserve" in reconciler.statuses["lo"].message
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_unload_waits_for_requests_in_flight(tmp_path):
    reconciler, pool = make(tmp_path, "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")

    async def scenario():
        await settle(reconciler)
        route = reconciler.route("a")
        route.traffic.begin()
        (tmp_path / "models.yaml").write_text("models: []\n")
        await reconciler.reconcile_once()
        await asyncio.sleep(0.2)
        assert pool.stopped == [] and reconciler.route("a") is None  # no new requests, old one finishing
        assert "Draining" in [e.reason for e in reconciler.events.since()]
        route.traffic.end()
        await settle(reconciler)
        assert pool.stopped == ["a"]
        assert pool.graces == [0.0]  # drained: killed at once, no graceful shutdown to wait for
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_worker_still_busy_after_the_drain_timeout_gets_sigterm_and_the_stop_grace(tmp_path):
    (tmp_path / "models.yaml").write_text("models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")
    pool = FakePool()
    reconciler = Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(drain_timeout=0.1, stop_grace=7.0),
                            memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))

    async def scenario():
        await settle(reconciler)
        reconciler.route("a").traffic.begin()  # never ends
        (tmp_path / "models.yaml").write_text("models: []\n")
        await settle(reconciler)
        assert pool.stopped == ["a"] and pool.graces == [7.0]
        assert "DrainTimeout" in [e.reason for e in reconciler.events.since()]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_ready_worker_shows_in_status_before_the_next_pass(tmp_path):
    reconciler, pool = make(tmp_path, "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")

    async def scenario():
        await reconciler.reconcile_once()  # starts the load; its status says Loading
        assert reconciler.statuses["a"].phase == Phase.LOADING
        passes = reconciler.passes
        await until(lambda: not reconciler.actions.tasks)
        assert reconciler.passes == passes  # no pass ran meanwhile...
        status = reconciler.statuses["a"]  # ...and yet the status shows the worker that serves
        assert status.phase == Phase.READY and status.pid == pool.workers()[0].pid
        assert [c.status for c in status.conditions if c.type == "Ready"] == ["True"]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_on_demand_loads_on_request_only(tmp_path):
    reconciler, pool = make(tmp_path, "models:\n  - {name: od, source: /tmp, state: on-demand, memory: 10MiB}\n")

    async def scenario():
        await settle(reconciler)
        assert pool.started == [] and reconciler.statuses["od"].phase == Phase.UNLOADED
        assert not reconciler.expects_ready("od")
        reconciler.requests.asked("od")
        assert reconciler.expects_ready("od")
        await settle(reconciler)
        assert pool.started == ["od"] and reconciler.statuses["od"].phase == Phase.READY
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_crashes_back_off_exponentially_capped_and_say_crash_looping(tmp_path):
    now = [1000.0]
    reconciler, pool = make(tmp_path, "models:\n  - {name: a, source: /tmp, memory: 10MiB}\n")
    reconciler.clock = pool.clock = lambda: now[0]

    async def scenario():
        await settle(reconciler)
        delays = []
        for _ in range(4):
            pool.workers()[0].crash()
            await reconciler.reconcile_once()
            failure = reconciler.ledger.failures["a"]
            delays.append(failure.retry_at - now[0])
            assert reconciler.statuses["a"].phase == Phase.PENDING
            now[0] = failure.retry_at + 0.01
            await settle(reconciler)
            assert reconciler.statuses["a"].phase == Phase.READY
        assert delays == [1, 2, 4, 4]
        assert "crash-looping" in reconciler.ledger.failures["a"].message
        assert reconciler.statuses["a"].restarts == 4
        now[0] += 500  # stays up past stable_after: the backoff resets
        pool.workers()[0].crash()
        await reconciler.reconcile_once()
        assert reconciler.ledger.failures["a"].retry_at - now[0] == 1
        await reconciler.shutdown()

    asyncio.run(scenario())

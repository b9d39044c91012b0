"""The ledger's transition table and door, the route table, and the memory accounting rules."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from opta_lmx.engine.memory import MemoryEstimate
from opta_lmx.reconciler.accounting import held_bytes, planning_bytes
from opta_lmx.reconciler.ledger import Backoff, InvalidTransition, Ledger, WorkerPhase, is_valid_transition
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.state.status import EventLog

P = WorkerPhase
VALID = {
    (P.WAITING, P.LOADING), (P.WAITING, P.GONE), (P.LOADING, P.READY), (P.LOADING, P.GONE),
    (P.READY, P.DRAINING), (P.READY, P.GONE), (P.DRAINING, P.STOPPING), (P.DRAINING, P.GONE),
    (P.STOPPING, P.GONE), (P.DOWNLOADING, P.WAITING), (P.DOWNLOADING, P.LOADING), (P.DOWNLOADING, P.GONE),
}


@pytest.mark.parametrize("old", list(P))
@pytest.mark.parametrize("new", list(P))
def test_transition_table(old, new):
    assert is_valid_transition(old, new) == ((old, new) in VALID)


def _worker(wid="w-1"):
    return SimpleNamespace(id=wid, pid=4242, address="http://127.0.0.1:9", forked=False, started_at=1.0,
                           ready_at=2.0, load_seconds=1.0)


def test_a_worker_lives_through_the_door_and_each_step_records_its_event():
    events = EventLog()
    ledger = Ledger(events, clock=lambda: 10.0)
    entry = ledger.begin_load("a", "fp", "waiting for 1 worker(s)", ("WaitingForMemory", "waiting"))
    assert entry.key == "loading:a:fp" and ledger.load_of("a") is entry and ledger.present("loading:a:fp")
    ledger.move(entry, P.LOADING, ("Loading", "loading"))
    ledger.move(entry, P.READY, ("Ready", "serving"), worker=_worker())
    assert not ledger.present("loading:a:fp") and ledger.get("w-1") is entry and entry.pid == 4242
    assert ledger.serving("a") is entry and ledger.serving("a", besides="w-1") is None
    with pytest.raises(InvalidTransition):
        ledger.move(entry, P.LOADING)
    ledger.move(entry, P.DRAINING, ("Evicted", "draining"), "Warning")
    ledger.move(entry, P.STOPPING)
    ledger.move(entry, P.GONE, ("Unloaded", "stopped"))
    assert list(ledger) == [] and not ledger.present("w-1")
    assert [(e.reason, e.kind) for e in events.since()] == [
        ("WaitingForMemory", "Normal"), ("Loading", "Normal"), ("Ready", "Normal"),
        ("Evicted", "Warning"), ("Unloaded", "Normal")]


def test_failures_back_off_per_model_and_only_for_their_fingerprint():
    now = [100.0]
    ledger = Ledger(EventLog(), clock=lambda: now[0], backoff=Backoff(1, 4))
    delays = [ledger.fail("a", "fp1", "boom", permanent=False).retry_at - now[0] for _ in range(4)]
    assert delays == [1, 2, 4, 4]
    assert ledger.blocked({"a": "fp1"}, now[0]) == {"a"}
    assert ledger.blocked({"a": "fp2"}, now[0]) == frozenset()  # a changed entry is not blocked
    assert ledger.blocked({"a": "fp1"}, now[0] + 5) == frozenset()  # the backoff ended
    ledger.fail("a", "fp2", "bad source", permanent=True)
    assert ledger.failures["a"].attempts == 1 and ledger.blocked({"a": "fp2"}, now[0] + 1e6) == {"a"}
    crash = ledger.crashed("b", "fp", -9, uptime=1.0, stable_after=120)
    again = ledger.crashed("b", "fp", -9, uptime=1.0, stable_after=120)
    assert (crash.attempts, again.attempts) == (1, 2) and "crash-looping" in again.message
    assert ledger.crashed("b", "fp", -9, uptime=500.0, stable_after=120).attempts == 1  # stable: reset


def test_route_table_waits_for_a_route_and_counts_in_flight():
    expected = {"a"}
    table = RouteTable(lambda name: name in expected)
    traffic = Ledger(EventLog()).begin_load("a", "fp", "", ("Loading", "")).traffic

    async def scenario():
        waiter = asyncio.create_task(table.wait("a", timeout=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        route = Route("a", "http://127.0.0.1:9", "w-1", traffic)
        await table.set(route)
        assert await waiter is route
        table.begin(route)
        table.begin(route)
        table.end(route)
        assert traffic.in_flight == 1 and table.in_flight("a") == 1  # one owner: per worker and per model
        assert await table.wait("never", timeout=10) is None  # not expected to become ready: no wait
        assert await table.wait("a", timeout=0) is route
        table.drop("a", "other-worker")  # not the routed worker: nothing changes
        assert table.get("a") is route
        fallback = Route("a", "http://127.0.0.1:10", "w-2", traffic)
        table.drop("a", "w-1", fallback)
        assert table.get("a") is fallback
        table.drop("a", "w-2")
        assert "a" not in table

    asyncio.run(scenario())


def _estimate(total, override=None):
    return MemoryEstimate(weights_bytes=total, kv_cache_bytes=0, overhead_bytes=0, override_bytes=override)


@pytest.mark.parametrize(
    ("estimate", "measured_max", "expected"),
    [(_estimate(100), 0, 100), (_estimate(100), 150, 150), (_estimate(100, override=80), 150, 80)],
)
def test_planning_bytes(estimate, measured_max, expected):
    assert planning_bytes(estimate, measured_max) == expected


@pytest.mark.parametrize(
    ("current", "old_override", "measured", "measured_max", "expected"),
    [
        (_estimate(100), None, 120, 0, 120),  # current spec: its measurement
        (_estimate(100), None, None, 0, 100),  # not measured yet: its estimate
        (_estimate(100, override=80), None, 120, 0, 80),  # the override wins
        (None, 70, 120, 0, 70),  # an old spec keeps the override it was planned with
        (None, None, 120, 200, 120),  # else its measurement
        (None, None, None, 200, 200),  # else the most measured for its spec
    ],
)
def test_held_bytes(current, old_override, measured, measured_max, expected):
    assert held_bytes(current, old_override, measured, measured_max) == expected


def test_an_entry_that_leaves_wakes_whoever_waits_for_memory():
    gone = []
    ledger = Ledger(EventLog(), on_gone=lambda: gone.append(True))
    entry = ledger.begin_load("a", "fp", "", None)
    ledger.move(entry, P.READY, worker=_worker("w1"))
    assert gone == []
    ledger.move(entry, P.DRAINING)
    ledger.move(entry, P.STOPPING)
    assert gone == []
    ledger.move(entry, P.GONE)
    assert gone == [True] and list(ledger) == []

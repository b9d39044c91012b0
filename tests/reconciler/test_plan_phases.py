"""Each phase of the planner on its own, table-driven: admit, relieve_pressure, plan_unloads, plan_loads."""

from __future__ import annotations

import pytest

from opta_lmx.reconciler.plan import (
    Admission,
    MemoryFigures,
    ObservedWorker,
    UnloadReason,
    Workers,
    admit,
    plan_loads,
    plan_unloads,
    relieve_pressure,
    wanted_models,
)
from opta_lmx.state.spec import DesiredState


def _state(*entries: dict) -> DesiredState:
    return DesiredState.model_validate({"models": list(entries)})


def _setup(entries, observed=(), estimates=None, blocked=(), changed=None):
    desired = _state(*entries)
    fingerprints = {m.name: (changed or {}).get(m.name, "fp-" + m.name) for m in desired.models}
    workers = Workers(tuple(observed), fingerprints, frozenset(blocked), estimates or {})
    return desired, workers, wanted_models(desired, workers.names(), frozenset(), {})


def _w(name, size, fp=None, ready=True, wid=None):
    return ObservedWorker(name, wid or f"w-{name}-{fp or 'cur'}", fp or "fp-" + name, ready, size)


@pytest.mark.parametrize(
    ("entries", "observed", "estimates", "blocked", "budget", "admitted", "refused", "drop_stale"),
    [
        # file order when everything is equal; the third does not fit
        ([{"name": "a"}, {"name": "b"}, {"name": "c"}], [], {"a": 40, "b": 40, "c": 40}, set(), 100, ["a", "b"], ["c"], []),
        # priority beats file order
        ([{"name": "a"}, {"name": "b", "priority": 5}], [], {"a": 60, "b": 60}, set(), 100, ["b"], ["a"], []),
        # pinned beats priority
        ([{"name": "a", "priority": 9}, {"name": "b", "pinned": True}], [], {"a": 60, "b": 60}, set(), 100, ["b"], ["a"], []),
        # an incumbent beats an equal newcomer
        ([{"name": "a"}, {"name": "b"}], [_w("b", 60)], {"a": 60}, set(), 100, ["b"], ["a"], []),
        # mid-swap: old+new do not fit, the new one alone does (old worker must go now)
        ([{"name": "a"}], [_w("a", 60, fp="old"), _w("a", 60, ready=False)], {}, set(), 100, ["a"], [], ["a"]),
        # blocked with nothing serving: neither admitted nor refused
        ([{"name": "a"}], [], {"a": 10}, {"a"}, 100, [], [], []),
    ],
)
def test_admit(entries, observed, estimates, blocked, budget, admitted, refused, drop_stale):
    entries = [{"source": "/m", **e} for e in entries]
    _desired, workers, wanted = _setup(entries, observed, estimates, blocked)
    result = admit(wanted, workers, budget)
    assert sorted(result.admitted) == admitted
    assert sorted(result.unschedulable) == refused
    assert sorted(result.drop_stale) == drop_stale
    assert result.used <= budget


@pytest.mark.parametrize(
    ("available", "reserve", "dropped"),
    [
        (None, 100, []),  # unknown free memory: no pressure
        (500, 100, []),  # above the reserve
        (90, 100, ["od"]),  # 10 short: the on-demand model goes first
        (50, 100, ["od", "low"]),  # 50 short: then the lowest priority
        (0, 300, ["od", "low", "high"]),  # the pinned one always stays
    ],
)
def test_relieve_pressure(available, reserve, dropped):
    entries = [
        {"name": "pin", "source": "/m", "pinned": True},
        {"name": "high", "source": "/m", "priority": 5},
        {"name": "low", "source": "/m", "priority": 1},
        {"name": "od", "source": "/m", "state": "on-demand", "priority": 9},
    ]
    observed = [_w(n, 30) for n in ("pin", "high", "low", "od")]
    _desired, workers, wanted = _setup(entries, observed)
    admission = admit(wanted, workers, 1000)
    result = relieve_pressure(admission, wanted, workers, MemoryFigures(1000, reserve, available))
    assert sorted(result.pressure) == sorted(dropped)
    assert "pin" in result.admitted
    assert all("memory pressure" in result.unschedulable[n].message for n in dropped)


@pytest.mark.parametrize(
    ("entries", "observed", "admitted", "expected"),
    [
        ([], [_w("gone", 10)], {}, [("gone", UnloadReason.REMOVED)]),
        ([{"name": "a", "state": "unloaded"}], [_w("a", 10)], {}, [("a", UnloadReason.UNLOADED)]),
        ([{"name": "a"}], [_w("a", 10)], {}, [("a", UnloadReason.EVICTED)]),
        ([{"name": "a"}], [_w("a", 10)], {"a": 10}, []),  # admitted and current: stays
        # successor ready: the old worker is replaced
        ([{"name": "a"}], [_w("a", 10, fp="old"), _w("a", 10)], {"a": 10}, [("a", UnloadReason.REPLACED)]),
        # successor loading: the old worker keeps serving
        ([{"name": "a"}], [_w("a", 10, fp="old"), _w("a", 10, ready=False)], {"a": 20}, []),
    ],
)
def test_plan_unloads(entries, observed, admitted, expected):
    entries = [{"source": "/m", **e} for e in entries]
    desired, workers, wanted = _setup(entries, observed)
    unloads = plan_unloads(desired, wanted, workers, Admission(admitted=dict(admitted)), {})
    assert [(u.name, u.reason) for u in unloads] == expected


@pytest.mark.parametrize(
    ("fingerprint", "reason", "says"),
    [
        ("old", UnloadReason.REPLACED, "its entry changed"),  # the edit, not idleness, is why it goes
        (None, UnloadReason.IDLE, "idle for 400s"),  # the current spec, idle past its TTL
    ],
)
def test_an_on_demand_worker_no_longer_wanted_says_why(fingerprint, reason, says):
    entries = [{"name": "a", "source": "/m", "state": "on-demand", "idle_ttl": "5m"}]
    desired, workers, _ = _setup(entries, [_w("a", 10, fp=fingerprint)])
    not_wanted = wanted_models(desired, frozenset(), frozenset(), {})  # no demand, not resident as current
    (unload,) = plan_unloads(desired, not_wanted, workers, Admission(), {"a": 400.0})
    assert unload.reason == reason and says in unload.message


@pytest.mark.parametrize(
    ("observed", "unloads_first", "available", "now", "after", "refused"),
    [
        ([], False, None, ["a"], [], []),  # fits beside nothing: at once
        ([_w("b", 80)], True, None, [], ["a"], []),  # fits only once b's unload is done: after it
        ([], False, 30, [], [], ["a"]),  # the machine lacks the memory even after every unload
    ],
)
def test_plan_loads(observed, unloads_first, available, now, after, refused):
    entries = [{"name": "a", "source": "/m"}, {"name": "b", "source": "/m", "state": "unloaded"}]
    desired, workers, wanted = _setup(entries, observed, {"a": 50})
    admission = Admission(admitted={"a": 50})
    unloads = plan_unloads(desired, wanted, workers, admission, {}) if unloads_first else []
    result = plan_loads(wanted, workers, admission, unloads, MemoryFigures(100, 0, available), frozenset())
    assert [load.name for load in result.loads if not load.after] == now
    assert [load.name for load in result.loads if load.after] == after
    assert sorted(result.unschedulable) == refused
    for load in result.loads:
        assert set(load.after) == {u.worker_id for u in unloads}

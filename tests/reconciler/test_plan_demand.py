"""Demand swapping, rule by rule: who a request for an on-demand model may evict, when it waits,
and when it is refused (with who holds the memory and why). Pure planner tables."""

from __future__ import annotations

import pytest

from opta_lmx.reconciler.plan import MemoryFigures, ObservedWorker, UnloadReason, apply, plan
from opta_lmx.state.spec import DesiredState

MiB = 1024**2


def state(*models: dict, defaults: dict | None = None) -> DesiredState:
    return DesiredState.model_validate({
        "memory": {"budget": "100MiB", "reserve": "0"},
        "defaults": {"demand": defaults or {}},
        "models": [{"source": f"/m/{m['name']}", "memory": "60MiB", "state": "on-demand", **m} for m in models],
    })


def resident(name: str, *, mib: int = 60, ready_seconds: float = 600.0, in_flight: int = 0) -> ObservedWorker:
    return ObservedWorker(name, f"w-{name}", "fp-" + name, True, mib * MiB, in_flight, ready_seconds)


def run(desired, observed, demand, *, idle=None, waited=None):
    fingerprints = {m.name: "fp-" + m.name for m in desired.models}
    estimates = {m.name: m.memory_bytes() for m in desired.models}
    return plan(desired, fingerprints, list(observed), memory=MemoryFigures(100 * MiB), estimates=estimates,
                demand=frozenset(demand), idle=idle or {}, waited=waited or {})


def unloads(result):
    return [(u.name, u.reason) for u in result.unloads()]


def test_an_idle_equal_priority_model_is_evicted_and_the_request_loads_after_it():
    desired = state({"name": "a"}, {"name": "b"})
    result = run(desired, [resident("a")], {"b"})
    assert unloads(result) == [("a", UnloadReason.DEMAND)]
    assert "evicted by demand for b" in result.unloads()[0].message
    [load] = result.loads()
    assert (load.name, load.after) == ("b", ("w-a",))
    assert result.unschedulable == {} and result.waiting == {}


@pytest.mark.parametrize(
    ("holder", "why"),
    [
        ({"name": "a", "state": "loaded"}, "a (desired loaded in models.yaml)"),
        ({"name": "a", "pinned": True}, "a (pinned)"),
        ({"name": "a", "priority": 5}, "a (on-demand with priority 5, higher than b's 0)"),
    ],
)
def test_loaded_pinned_and_higher_priority_holders_are_never_evicted_by_demand(holder, why):
    desired = state(holder, {"name": "b"})
    result = run(desired, [resident("a")], {"b"})
    assert result.actions == []
    message = result.unschedulable["b"].message
    assert "needs 60.0 MiB but only 40.0 MiB" in message and why in message


def test_a_model_within_its_min_residency_makes_the_request_wait_not_fail():
    desired = state({"name": "a"}, {"name": "b"}, defaults={"min_residency": "30s"})
    result = run(desired, [resident("a", ready_seconds=12)], {"b"})
    assert result.actions == [] and "b" not in result.unschedulable
    assert "a is resident for 12s of its 30s min_residency" in result.waiting["b"].message
    assert result.waiting["b"].retry_after == pytest.approx(18)


@pytest.mark.parametrize(
    ("waited", "evicted"),
    [
        (2.0, False),  # a still serves its requests: the request for b waits
        (6.0, True),  # serve_queue (5s) is over: a drains and goes
    ],
)
def test_a_busy_model_serves_its_queue_for_serve_queue_before_it_is_swapped(waited, evicted):
    desired = state({"name": "a"}, {"name": "b"})
    result = run(desired, [resident("a", in_flight=3)], {"b"}, waited={"b": waited})
    assert bool(result.unloads()) is evicted
    assert ("b" in result.waiting) is not evicted
    if not evicted:
        assert "serves its 3 request(s) for up to 5s (serve_queue)" in result.waiting["b"].message


def test_the_holders_own_policy_protects_it():
    desired = state({"name": "a", "demand": {"min_residency": "1h"}}, {"name": "b"})
    result = run(desired, [resident("a", ready_seconds=600)], {"b"})
    assert result.actions == [] and "b" in result.waiting


def test_lower_priority_first_then_least_recently_used():
    desired = state({"name": "old", "memory": "30MiB"}, {"name": "recent", "memory": "30MiB"},
                    {"name": "low", "memory": "30MiB", "priority": -1}, {"name": "b", "memory": "70MiB"})
    observed = [resident("old", mib=30), resident("recent", mib=30), resident("low", mib=30)]
    result = run(desired, observed, {"b"}, idle={"old": 300, "recent": 5, "low": 1})
    assert sorted(unloads(result)) == [("low", UnloadReason.DEMAND), ("old", UnloadReason.DEMAND)]
    assert [load.name for load in result.loads()] == ["b"]


def test_may_evict_false_refuses_and_says_so():
    desired = state({"name": "a"}, {"name": "b", "demand": {"may_evict": False}})
    result = run(desired, [resident("a")], {"b"})
    assert result.actions == []
    assert "b's demand policy has may_evict: false" in result.unschedulable["b"].message


def test_a_model_with_waiting_requests_of_its_own_is_not_evicted():
    desired = state({"name": "a"}, {"name": "b"})
    result = run(desired, [resident("a")], {"a", "b"})
    assert result.actions == []
    assert "a (requests are waiting for it)" in result.unschedulable["b"].message


def test_when_even_protected_holders_could_not_make_room_the_request_is_refused_not_kept_waiting():
    desired = state({"name": "l", "state": "loaded", "memory": "50MiB"}, {"name": "a", "memory": "40MiB"},
                    {"name": "b", "memory": "80MiB"})
    result = run(desired, [resident("l", mib=50), resident("a", mib=40, ready_seconds=1)], {"b"})
    assert result.actions == [] and "b" in result.unschedulable and "b" not in result.waiting


def test_a_load_nobody_waits_for_any_more_is_cancelled_unless_desired_loaded():
    desired = state({"name": "od"}, {"name": "keep", "state": "loaded", "memory": "10MiB"})
    loading = [ObservedWorker("od", "loading:od", "fp-od", False, 60 * MiB),
               ObservedWorker("keep", "loading:keep", "fp-keep", False, 10 * MiB)]
    result = run(desired, loading, set())
    assert [(u.name, u.message) for u in result.unloads()] == [
        ("od", "load cancelled: no request waits for it any more")]


def test_swapping_back_waits_for_the_new_models_min_residency():
    desired = state({"name": "a"}, {"name": "b"})
    first = run(desired, [resident("a")], {"b"})
    second = run(desired, apply([resident("a")], first), {"a"})
    assert second.actions == [] and "b is resident for 0s" in second.waiting["a"].message


def test_while_the_victim_drains_the_requests_for_it_wait_and_the_new_load_goes_on():
    desired = state({"name": "a"}, {"name": "b"})
    draining = ObservedWorker("a", "w-a", "fp-a", True, 60 * MiB, 2, 600.0, draining=True)
    loading = ObservedWorker("b", "loading:b", "fp-b", False, 60 * MiB)
    result = run(desired, [draining, loading], {"a", "b"})
    assert [(u.name, u.worker_id) for u in result.unloads()] == [("a", "w-a")]  # already draining: no-op
    assert result.loads() == [] and result.unschedulable == {}


def test_a_request_behind_a_loading_model_waits_for_it():
    desired = state({"name": "a"}, {"name": "b"})
    result = run(desired, [ObservedWorker("b", "loading:b", "fp-b", False, 60 * MiB)], {"a", "b"})
    assert result.actions == [] and "b is loading" in result.waiting["a"].message


def test_requests_queued_for_a_just_ready_model_are_served_even_with_serve_queue_0():
    desired = state({"name": "a"}, {"name": "b"}, defaults={"min_residency": 0, "serve_queue": 0})
    woken = ObservedWorker("a", "w-a", "fp-a", True, 60 * MiB, 2, 0.0, queued=2)
    result = run(desired, [woken], {"b"})
    assert result.actions == [] and "a has 2 request(s) queued" in result.waiting["b"].message
    # Once they have begun (in flight, none queued), a is swapped at once: they finish while it drains.
    begun = ObservedWorker("a", "w-a", "fp-a", True, 60 * MiB, 2, 0.5)
    assert unloads(run(desired, [begun], {"b"})) == [("a", UnloadReason.DEMAND)]

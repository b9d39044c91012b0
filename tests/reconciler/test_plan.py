"""The planner, table by table: admission, swaps, priorities, on-demand, pressure."""

from __future__ import annotations

import pytest

from opta_lmx.reconciler.plan import (
    LoadModel,
    MemoryFigures,
    ObservedWorker,
    UnloadModel,
    UnloadReason,
    apply,
    plan,
)
from opta_lmx.state.spec import DesiredState

MiB = 1024**2


def state(*models: dict, budget: str = "100MiB", reserve: str = "0") -> DesiredState:
    return DesiredState.model_validate(
        {"memory": {"budget": budget, "reserve": reserve},
         "models": [{"source": f"/m/{m['name']}", **m} for m in models]}
    )


def fps(desired: DesiredState, **changed: str) -> dict[str, str]:
    return {m.name: changed.get(m.name, "fp-" + m.name) for m in desired.models}


def worker(name: str, mib: int, *, fp: str | None = None, ready: bool = True, wid: str | None = None) -> ObservedWorker:
    return ObservedWorker(name, wid or f"w-{name}", fp or "fp-" + name, ready, mib * MiB)


def run(desired, observed=(), *, budget_mib=100, estimates=None, available_mib=None, reserve_mib=0,
        blocked=frozenset(), demand=frozenset(), idle=None, fingerprints=None):
    memory = MemoryFigures(budget_mib * MiB, reserve_mib * MiB,
                           None if available_mib is None else available_mib * MiB)
    est = {k: v * MiB for k, v in (estimates or {}).items()}
    return plan(desired, fingerprints or fps(desired), list(observed), frozenset(blocked), memory=memory,
                estimates=est, demand=frozenset(demand), idle=idle or {})


def names(actions, kind):
    return [(a.name, getattr(a, "reason", None)) for a in actions if isinstance(a, kind)]


def test_loads_what_fits_in_file_order_and_says_what_is_missing():
    desired = state({"name": "a"}, {"name": "b"}, {"name": "c"})
    result = run(desired, estimates={"a": 60, "b": 60, "c": 30})
    assert [a.name for a in result.loads()] == ["a", "c"]
    verdict = result.unschedulable["b"]
    assert verdict.missing_bytes == 20 * MiB
    assert "20.0 MiB missing" in verdict.message and "beside a" in verdict.message
    assert result.after_bytes == 90 * MiB <= result.budget_bytes


def test_priority_then_pinned_order_admission():
    desired = state({"name": "low", "priority": 1}, {"name": "high", "priority": 5},
                    {"name": "pin", "pinned": True, "priority": -10})
    result = run(desired, estimates={"low": 40, "high": 40, "pin": 40})
    assert sorted(a.name for a in result.loads()) == ["high", "pin"]
    assert "low" in result.unschedulable


def test_higher_priority_evicts_unpinned_lower_running_one_first():
    desired = state({"name": "low", "priority": 1}, {"name": "high", "priority": 5})
    result = run(desired, [worker("low", 60)], estimates={"high": 60})
    (unload,) = result.unloads()
    assert (unload.name, unload.reason) == ("low", UnloadReason.EVICTED)
    (load,) = result.loads()
    assert load.name == "high" and load.after == ("w-low",)  # drain and unload, then load
    assert result.peak_bytes <= result.budget_bytes


def test_equal_priority_newcomer_does_not_evict_incumbent():
    desired = state({"name": "new"}, {"name": "old"})
    result = run(desired, [worker("old", 60)], estimates={"new": 60})
    assert result.actions == []
    assert "new" in result.unschedulable


def test_pinned_incumbent_is_never_evicted_for_another_model():
    desired = state({"name": "pin", "pinned": True, "priority": 0},
                    {"name": "vip", "pinned": True, "priority": 100})
    result = run(desired, [worker("pin", 60)], estimates={"vip": 60})
    assert result.actions == [] and "vip" in result.unschedulable


def test_swap_make_before_break_when_both_fit():
    desired = state({"name": "a"})
    result = run(desired, [worker("a", 30, fp="old")], estimates={"a": 30})
    (load,) = result.actions
    assert isinstance(load, LoadModel) and load.replaces == ("w-a",) and load.after == ()
    assert result.peak_bytes == 60 * MiB


def test_swap_drains_first_when_both_do_not_fit():
    desired = state({"name": "a"})
    result = run(desired, [worker("a", 60, fp="old")], estimates={"a": 60})
    unload, load = result.actions
    assert isinstance(unload, UnloadModel) and unload.reason == UnloadReason.REPLACED
    assert isinstance(load, LoadModel) and load.after == ("w-a",)
    assert result.peak_bytes == 60 * MiB


def test_successor_ready_unloads_the_old_worker():
    desired = state({"name": "a"})
    result = run(desired, [worker("a", 30, fp="old", wid="old"), worker("a", 30, wid="new")])
    assert [(u.worker_id, u.reason) for u in result.unloads()] == [("old", UnloadReason.REPLACED)]


def test_blocked_new_spec_keeps_the_old_worker_serving():
    desired = state({"name": "a"})
    result = run(desired, [worker("a", 30, fp="old")], blocked={"a"})
    assert result.actions == []


@pytest.mark.parametrize("entry,reason", [
    ({"name": "a", "state": "unloaded"}, UnloadReason.UNLOADED),
    ({"name": "a", "state": "on-demand", "idle_ttl": "10s"}, UnloadReason.IDLE),
])
def test_unload_reasons(entry, reason):
    result = run(state(entry), [worker("a", 10)], idle={"a": 11})
    assert [(u.name, u.reason) for u in result.unloads()] == [("a", reason)]


def test_removed_model_is_unloaded():
    result = run(state(), [worker("gone", 10)])
    assert [(u.name, u.reason) for u in result.unloads()] == [("gone", UnloadReason.REMOVED)]


def test_on_demand_loads_only_when_asked_and_stays_while_busy():
    desired = state({"name": "od", "state": "on-demand", "idle_ttl": "60s"})
    assert run(desired, estimates={"od": 10}).actions == []
    asked = run(desired, estimates={"od": 10}, demand={"od"})
    assert [(a.name, a.reason) for a in asked.loads()] == [("od", "requested (on-demand)")]
    assert run(desired, [worker("od", 10)], idle={"od": 5}).actions == []


def test_memory_pressure_unloads_on_demand_then_lowest_priority_unpinned():
    desired = state({"name": "pin", "pinned": True}, {"name": "hi", "priority": 9},
                    {"name": "lo", "priority": 1}, {"name": "od", "state": "on-demand"})
    observed = [worker("pin", 10), worker("hi", 10), worker("lo", 10), worker("od", 10)]
    result = run(desired, observed, available_mib=85, reserve_mib=100)  # 15 MiB short
    assert {(u.name, u.reason) for u in result.unloads()} == {
        ("od", UnloadReason.PRESSURE), ("lo", UnloadReason.PRESSURE)}
    assert "memory pressure" in result.unschedulable["lo"].message
    # Next pass, with the memory back but not enough to reload: nothing is reloaded (no flapping).
    again = run(desired, apply(observed, result), available_mib=105, reserve_mib=100, estimates={"lo": 10})
    assert again.loads() == [] and "reserve" in again.unschedulable["lo"].message


def test_machine_memory_limits_new_loads():
    desired = state({"name": "a"})
    result = run(desired, estimates={"a": 50}, available_mib=40, reserve_mib=0)
    assert result.loads() == [] and result.unschedulable["a"].missing_bytes == 10 * MiB


def test_shrunk_budget_evicts_lowest_ranked():
    desired = state({"name": "a", "priority": 2}, {"name": "b", "priority": 1})
    result = run(desired, [worker("a", 40), worker("b", 40)], budget_mib=50)
    assert [(u.name, u.reason) for u in result.unloads()] == [("b", UnloadReason.EVICTED)]


def test_plan_is_a_fixed_point_after_apply():
    desired = state({"name": "a", "priority": 3}, {"name": "b"}, {"name": "c", "priority": 1})
    observed = [worker("b", 50), worker("c", 30, fp="old")]
    first = run(desired, observed, estimates={"a": 40, "b": 50, "c": 30})
    assert first.after_bytes <= first.budget_bytes
    second = run(desired, apply(observed, first), estimates={"a": 40, "b": 50, "c": 30})
    assert second.actions == []

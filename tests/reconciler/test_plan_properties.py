"""Property tests: for any desired state, observation and budget, the plan stays within the
budget, and planning again on the planned result plans nothing."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opta_lmx.reconciler.plan import MemoryFigures, ObservedWorker, apply, plan
from opta_lmx.state.spec import DesiredState

NAMES = ["a", "b", "c", "d", "e"]


@st.composite
def scenarios(draw):
    chosen = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=5))
    models = []
    for name in chosen:
        models.append({
            "name": name, "source": f"/m/{name}",
            "state": draw(st.sampled_from(["loaded", "loaded", "unloaded", "on-demand"])),
            "priority": draw(st.integers(-2, 2)),
            "pinned": draw(st.booleans()),
            "idle_ttl": draw(st.sampled_from([None, 10, 100])),
        })
    desired = DesiredState.model_validate({"models": models})
    fingerprints = {m.name: "new-" + m.name for m in desired.models}
    observed = []
    for index, name in enumerate(draw(st.lists(st.sampled_from(NAMES), max_size=6))):
        stale = draw(st.booleans())
        fingerprint = ("old-" if stale else "new-") + name
        if not stale and any(w.fingerprint == fingerprint for w in observed):
            continue
        # ready_seconds and in_flight feed demand swapping (min_residency 10s, serve_queue 5s by default)
        observed.append(ObservedWorker(name, f"w{index}", fingerprint, draw(st.booleans()),
                                       draw(st.integers(1, 60)), draw(st.sampled_from([0, 0, 2])),
                                       draw(st.sampled_from([0.0, 7.0, 30.0, 500.0]))))
    estimates = {n: draw(st.integers(0, 60)) for n in NAMES}
    # The loop plans a model that ran before with what it measured (it remembers the larger of
    # estimate and measurement per spec), so an evicted model is never re-admitted on a smaller guess.
    for w in observed:
        if w.fingerprint == fingerprints.get(w.name):
            estimates[w.name] = max(estimates[w.name], w.bytes)
    budget = draw(st.integers(0, 200))
    blocked = frozenset(draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=2)))
    demand = frozenset(draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3)))
    idle = {n: draw(st.sampled_from([0, 50, 500])) for n in NAMES}
    waited = {n: draw(st.sampled_from([0.0, 3.0, 60.0])) for n in NAMES}
    return desired, fingerprints, observed, MemoryFigures(budget), estimates, blocked, demand, idle, waited


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(scenarios())
def test_never_commits_more_than_the_budget(scenario):
    desired, fingerprints, observed, memory, estimates, blocked, demand, idle, waited = scenario
    result = plan(desired, fingerprints, observed, blocked, memory=memory, estimates=estimates, demand=demand, idle=idle,
                  waited=waited)
    held = sum(w.bytes for w in observed)
    assert result.after_bytes <= memory.budget_bytes
    # Loads that start at once fit beside everything already running.
    immediate = sum(load.bytes for load in result.loads() if not load.after)
    if held <= memory.budget_bytes:
        assert held + immediate <= memory.budget_bytes
    assert sum(w.bytes for w in apply(observed, result)) == result.after_bytes


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(scenarios())
def test_planning_again_on_the_result_plans_nothing(scenario):
    desired, fingerprints, observed, memory, estimates, blocked, demand, idle, waited = scenario
    first = plan(desired, fingerprints, observed, blocked, memory=memory, estimates=estimates, demand=demand, idle=idle,
                  waited=waited)
    second = plan(desired, fingerprints, apply(observed, first), blocked, memory=memory, estimates=estimates,
                  demand=demand, idle=idle,
                  waited=waited)
    assert second.actions == [], (first.actions, second.actions)

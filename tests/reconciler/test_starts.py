"""Fast starts in the memory plan (issue 19): the helpers are a fixed cost counted once, estimates
know how their worker starts, and a helper yields whenever it would cost a model anything."""

from __future__ import annotations

import asyncio

import pytest

from opta_lmx.engine.memory import FORKED_OVERHEAD_BYTES, SPARE_BYTES, TEMPLATE_BYTES, TEMPLATE_WARMING_BYTES
from opta_lmx.engine.prepared import HelperMemory
from opta_lmx.reconciler.accounting import MemoryAccounts
from opta_lmx.reconciler.controller import LoopSettings, Reconciler
from opta_lmx.reconciler.plan import MemoryFigures, ObservedWorker, plan
from opta_lmx.reconciler.starts import HelperCosts, StartOption, choose, options, priorities
from opta_lmx.state.spec import DesiredState
from opta_lmx.state.status import Phase
from tests.reconciler.fakes import FakePool, MiB

COSTS = HelperCosts(400 * MiB, 900 * MiB, 450 * MiB)
WAITING = HelperMemory("template", waiting=1, waiting_bytes=410 * MiB)


@pytest.mark.parametrize(("mode", "spares", "helper", "expected"), [
    # a waiting template counts what it holds now, and new workers fork from it
    ("template", 1, WAITING, [("template", 0, 410, True), ("cold", 0, 0, False)]),
    # ...with children forked from it, the same figure (its anonymous memory does not swing); closing
    # it would not give the shared pages back, so cold still counts the family
    ("template", 1, HelperMemory("template", waiting=1, waiting_bytes=410 * MiB, forked_workers=2),
     [("template", 0, 410, True), ("cold", 0, 400, False)]),
    # starting, or not running: its warm-up's most (a template starts only where that fits); loads are cold
    ("template", 1, HelperMemory("template", starting=1, starting_bytes=700 * MiB), [("template", 0, 900, False),
                                                                                    ("cold", 0, 0, False)]),
    ("template", 1, HelperMemory("template", starting=1, starting_bytes=950 * MiB), [("template", 0, 950, False),
                                                                                    ("cold", 0, 0, False)]),
    ("template", 1, HelperMemory(), [("template", 0, 900, False), ("cold", 0, 0, False)]),
    # workers of a template that is gone still share its pages: counted once, in every option
    ("template", 1, HelperMemory("template", waiting=1, waiting_bytes=410 * MiB, forked_workers=1, orphan_forked=1),
     [("template", 0, 810, True), ("cold", 0, 400, False)]),
    # spares: n x one spare whether they wait or refill, then fewer, then none
    ("spare", 3, HelperMemory("spare", waiting=1, starting=1, waiting_bytes=460 * MiB, starting_bytes=100 * MiB),
     [("spare", 3, 1350, False), ("spare", 2, 900, False), ("spare", 1, 450, False), ("cold", 0, 0, False)]),
    ("cold", 1, HelperMemory(), [("cold", 0, 0, False)]),
])
def test_what_each_way_of_starting_costs(mode, spares, helper, expected):
    got = [(o.mode, o.spares, o.fixed_bytes // MiB, o.forked) for o in options(mode, spares, helper, COSTS)]
    assert got == expected


def _desired(budget: str, *models: dict) -> DesiredState:
    return DesiredState.model_validate({"memory": {"budget": budget, "reserve": 0}, "models": list(models)})


def _plan_for(desired: DesiredState, observed: list[ObservedWorker], sizes: dict[str, tuple[int, int]]):
    """A plan per option, the way the loop makes one: budget less the fixed cost, estimates by start."""
    fingerprints = {m.name: m.name for m in desired.models}

    def plan_for(option: StartOption):
        estimates = {n: (forked if option.forked else cold) for n, (cold, forked) in sizes.items()}
        budget = desired.memory.budget_bytes(2**40) - option.fixed_bytes
        return plan(desired, fingerprints, observed, memory=MemoryFigures(budget), estimates=estimates)

    return plan_for


def test_the_template_yields_when_it_and_the_model_do_not_fit_the_budget():
    desired = _desired("1000MiB", {"name": "coder", "source": "/m", "memory": "600MiB"})
    choice = choose(options("template", 1, WAITING, COSTS), _plan_for(desired, [], {"coder": (600 * MiB, 600 * MiB)}))
    assert choice.option.mode == "cold" and [a.name for a in choice.plan.loads()] == ["coder"]
    assert "coder would not fit" in choice.yielded and "using cold starts" in choice.yielded


def test_the_template_stays_where_forked_workers_fit_and_cold_ones_would_not():
    """Four models whose cold workers need 2 GiB fit a 1.5 GiB budget beside the template (forked)."""
    models = [{"name": n, "source": "/m"} for n in "abcd"]
    desired = _desired("1500MiB", *models)
    sizes = {n: (520 * MiB, 70 * MiB) for n in "abcd"}
    choice = choose(options("template", 1, WAITING, COSTS), _plan_for(desired, [], sizes))
    assert choice.option.mode == "template" and choice.yielded is None
    assert sorted(a.name for a in choice.plan.loads()) == list("abcd")


def test_a_helper_that_would_evict_a_serving_model_yields():
    desired = _desired("1000MiB", {"name": "a", "source": "/m", "memory": "700MiB"})
    serving = [ObservedWorker("a", "w1", "a", True, 700 * MiB)]
    choice = choose(options("template", 1, WAITING, COSTS), _plan_for(desired, serving, {"a": (700 * MiB, 700 * MiB)}))
    assert choice.option.mode == "cold" and choice.plan.actions == []
    assert "a would not fit" in choice.yielded


def test_a_helper_stays_when_cold_starts_would_refuse_a_model_of_higher_priority():
    """Found by hand (default start mode, budget 610 MiB): two forked workers serve, a model of
    priority 5 is added. Beside the template it fits by evicting a priority-0 one; cold, it would
    need 517 MiB and be refused while the forked family holds the template's pages. The template
    yielded, and the priority-5 model got nothing."""
    desired = _desired("610MiB", {"name": "demo", "source": "/m"}, {"name": "b", "source": "/m"},
                       {"name": "hi", "source": "/m", "priority": 5})
    serving = [ObservedWorker("demo", "w1", "demo", True, 69 * MiB), ObservedWorker("b", "w2", "b", True, 69 * MiB)]
    helper = HelperMemory("template", waiting=1, waiting_bytes=466 * MiB, forked_workers=2)
    sizes = {n: (517 * MiB, 69 * MiB) for n in ("demo", "b", "hi")}
    choice = choose(options("template", 1, helper, COSTS), _plan_for(desired, serving, sizes),
                    priorities(desired))
    assert choice.option.mode == "template" and choice.yielded is None
    assert [a.name for a in choice.plan.loads()] == ["hi"] and len(choice.plan.unloads()) == 1
    # without priorities (all equal) one model is lost either way: the helper yields, as before
    equal = choose(options("template", 1, helper, COSTS), _plan_for(desired, serving, sizes))
    assert equal.option.mode == "cold" and "would lose its worker" in equal.yielded


def test_spares_yield_one_at_a_time():
    desired = _desired("1500MiB", {"name": "a", "source": "/m", "memory": "600MiB"})
    choice = choose(options("spare", 3, HelperMemory("spare"), COSTS), _plan_for(desired, [], {"a": (600 * MiB,) * 2}))
    assert (choice.option.mode, choice.option.spares) == ("spare", 2) and "using 2 waiting spare(s)" in choice.yielded


def test_learned_helper_figures_replace_the_defaults():
    accounts = MemoryAccounts()
    assert accounts.helper_costs == HelperCosts(TEMPLATE_BYTES, TEMPLATE_WARMING_BYTES, SPARE_BYTES)
    accounts.learn_helper(HelperMemory("template", starting=1, starting_bytes=1500 * MiB))
    accounts.learn_helper(HelperMemory("template", waiting=1, waiting_bytes=420 * MiB))
    assert accounts.helper_costs.template_bytes == 420 * MiB
    assert accounts.helper_costs.template_warming_bytes == 1500 * MiB  # never below what was seen
    accounts.learn_helper(HelperMemory("spare", waiting=2, waiting_bytes=900 * MiB))
    assert accounts.helper_costs.spare_bytes == 450 * MiB


# -- the loop, with a stand-in pool whose helpers hold what a test says ------------------------------

def _loop(tmp_path, text: str, pool: FakePool) -> Reconciler:
    (tmp_path / "models.yaml").write_text(text)
    return Reconciler(tmp_path / "models.yaml", pool, settings=LoopSettings(),
                      memory_probe=lambda: (16_000 * MiB, 10_000 * MiB))


async def _settle(reconciler: Reconciler, passes: int = 4) -> None:
    for _ in range(passes):
        await reconciler.reconcile_once()
        for _ in range(100):
            if not reconciler.actions.tasks:
                break
            await asyncio.sleep(0.01)


def test_a_model_that_fits_alone_is_never_evicted_by_the_template(tmp_path, monkeypatch):
    """The issue's first case: one model of 600 MiB under a 1000 MiB budget, default start mode."""
    monkeypatch.delenv("LMX_ENGINE_START", raising=False)
    pool = FakePool()
    pool.helpers["template"] = WAITING
    reconciler = _loop(tmp_path, "memory: {budget: 1000MiB, reserve: 0}\nmodels:\n"
                       "  - {name: a, source: /tmp, memory: 600MiB}\n", pool)

    async def scenario():
        await _settle(reconciler, 6)
        assert reconciler.statuses["a"].phase == Phase.READY and pool.started == ["a"] and pool.stopped == []
        assert pool.configured == ["cold"]  # the template was never started
        (event,) = [e for e in reconciler.events.since() if e.reason == "FastStartYielded"]
        assert "a would not fit" in event.message
        start = reconciler.observation()["engine_start"]
        assert start["wanted"] == "template" and start["mode"] == "cold" and start["yielded"]
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_the_template_comes_back_when_the_budget_has_room_again(tmp_path, monkeypatch):
    monkeypatch.delenv("LMX_ENGINE_START", raising=False)
    pool = FakePool()
    pool.helpers["template"] = WAITING
    path = tmp_path / "models.yaml"
    reconciler = _loop(tmp_path, "memory: {budget: 1000MiB, reserve: 0}\nmodels:\n"
                       "  - {name: a, source: /tmp, memory: 600MiB}\n", pool)

    async def scenario():
        await _settle(reconciler)
        path.write_text("memory: {budget: 3000MiB, reserve: 0}\nmodels:\n  - {name: a, source: /tmp, memory: 600MiB}\n")
        await _settle(reconciler)
        assert pool.configured == ["cold", "template"] and pool.stopped == []
        assert "FastStartResumed" in [e.reason for e in reconciler.events.since()]
        memory = reconciler.observation()["memory"]
        assert memory["fixed_bytes"] == 410 * MiB and memory["budget_bytes"] == 3000 * MiB - 410 * MiB
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_forked_workers_are_planned_small_and_counted_at_their_own_pages(tmp_path, monkeypatch):
    monkeypatch.delenv("LMX_ENGINE_START", raising=False)
    pool = FakePool()
    pool.helper = pool.helpers["template"] = WAITING
    reconciler = _loop(tmp_path, "memory: {budget: 1000MiB, reserve: 0}\nmodels:\n"
                       + "".join(f"  - {{name: {n}, source: /tmp}}\n" for n in "abcd"), pool)

    async def scenario():
        await _settle(reconciler)
        # cold, each needs 512 MiB: one would fit; forked, 64 MiB each beside the 410 MiB template: all four
        assert {n: s.phase for n, s in reconciler.statuses.items()} == dict.fromkeys("abcd", Phase.READY)
        assert reconciler.statuses["a"].estimated_bytes == FORKED_OVERHEAD_BYTES
        workers = reconciler.observation()["workers"]
        assert all(w["forked"] and w["bytes"] == 100 * MiB for w in workers)
        await reconciler.shutdown()

    asyncio.run(scenario())


def test_a_source_swap_under_a_budget_for_one_completes_beside_the_template(tmp_path, monkeypatch):
    """The issue's fourth case: the old worker is drained for a same-size successor and the
    successor is never refused afterwards (the template's figure does not swing as workers exit)."""
    monkeypatch.delenv("LMX_ENGINE_START", raising=False)
    pool = FakePool()
    pool.helper = pool.helpers["template"] = WAITING
    path = tmp_path / "models.yaml"
    text = "memory: {budget: 1100MiB, reserve: 0}\nmodels:\n  - {name: a, source: SRC, memory: 600MiB}\n"
    reconciler = _loop(tmp_path, text.replace("SRC", "/tmp"), pool)
    (tmp_path / "other").mkdir()

    async def scenario():
        await _settle(reconciler)
        old = reconciler.statuses["a"].pid
        path.write_text(text.replace("SRC", str(tmp_path / "other")))
        await _settle(reconciler, 6)
        status = reconciler.statuses["a"]
        assert status.phase == Phase.READY and status.pid != old
        assert pool.started == ["a", "a"] and pool.stopped == ["a"]
        reasons = [e.reason for e in reconciler.events.since()]
        assert "LoadCancelled" not in reasons and "FastStartYielded" not in reasons
        await reconciler.shutdown()

    asyncio.run(scenario())

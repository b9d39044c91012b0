"""Fast starts in the memory plan: what the template or the spares cost, and when they yield.

An optimization never costs a model. The engine's helpers (the pre-imported template on Linux,
waiting spares elsewhere) hold memory of their own; that memory is a fixed cost, counted once
and taken off the budget before any model is admitted. Each pass plans once per way of starting
workers, in order of preference (the mode models.yaml asks for, then fewer spares, then cold),
and keeps the first whose plan refuses, evicts and drains nothing that the cold plan keeps, or
whose losses weigh less, by priority, than the cold plan's (cold workers cost memory too). So
when the budget cannot hold a helper and the models the file asks for, the helper yields (and the
status and events say so), and the model is served cold. Pure: no I/O, like plan.py.

The figures (docs/reconciler.md, "Memory accounting"):
- a waiting template counts what it holds now (its anonymous memory does not change as workers
  fork from it and exit); a template that is starting, or would be started, counts the most its
  warm-up holds (it runs a throwaway worker beside itself), so that a template is started only
  where its warm-up fits, and a started one never crowds out a model that fitted;
- spares count `spares x` one waiting spare, whether they wait now or refill;
- workers forked from a template share its pages: while any lives, that family is counted once
  (at the template's size) whatever else runs, also when the template itself is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from opta_lmx import settings

from opta_lmx.engine.memory import SPARE_BYTES, TEMPLATE_BYTES, TEMPLATE_WARMING_BYTES
from opta_lmx.engine.prepared import COLD, SPARE, TEMPLATE, HelperMemory
from opta_lmx.reconciler.plan import Plan
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DesiredState, EngineStart
from opta_lmx.state.status import EventLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HelperCosts:
    """What a helper was measured at in this run (the engine's defaults until then)."""

    template_bytes: int = TEMPLATE_BYTES  # a waiting template
    template_warming_bytes: int = TEMPLATE_WARMING_BYTES  # the most a template held while warming up
    spare_bytes: int = SPARE_BYTES  # one waiting spare

    def to_dict(self) -> dict:
        return {"template_bytes": self.template_bytes, "template_warming_bytes": self.template_warming_bytes,
                "spare_bytes": self.spare_bytes}

    @classmethod
    def from_dict(cls, data: dict | None) -> "HelperCosts":
        data = data or {}
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__ and isinstance(v, int)})


@dataclass(frozen=True)
class StartOption:
    """One way of starting new workers, with what it costs the budget."""

    mode: str  # template | spare | cold
    spares: int = 0
    fixed_bytes: int = 0  # the helpers (and a forked family) the plan counts off the budget
    forked: bool = False  # new workers fork from a waiting template: their own, smaller overhead

    def engine_start(self, wanted: EngineStart) -> EngineStart:
        """What the pool is told to run (engine/prepared.py): this option's mode and spares."""
        return EngineStart.model_validate({"mode": self.mode, "spares": self.spares or wanted.spares})

    def describe(self) -> str:
        what = {TEMPLATE: "the worker template", SPARE: f"{self.spares} waiting spare(s)", COLD: "cold starts"}[self.mode]
        return f"{what} ({format_size(self.fixed_bytes)})" if self.mode != COLD else what


@dataclass(frozen=True)
class StartChoice:
    option: StartOption
    plan: Plan
    wanted: StartOption  # the first option: what models.yaml asks for
    yielded: str | None = None  # why the helper yields, when `option` is not `wanted`


def family_bytes(helper: HelperMemory, costs: HelperCosts, *, template_kept: bool) -> int:
    """Pages that workers forked from a template share: counted once while any of them lives,
    unless the running template is kept (then its own figure counts them)."""
    if helper.orphan_forked or (helper.forked_workers and not template_kept):
        return costs.template_bytes
    return 0


def options(mode: str, spares: int, helper: HelperMemory, costs: HelperCosts) -> list[StartOption]:
    """The ways to start workers, in order of preference: `mode` (already resolved for this
    platform: template, spare or cold), then fewer spares, then cold."""
    result: list[StartOption] = []
    if mode == TEMPLATE:
        family = family_bytes(helper, costs, template_kept=True)
        if helper.mode == TEMPLATE and helper.waiting:
            result.append(StartOption(TEMPLATE, 0, helper.waiting_bytes + family, forked=True))
        else:
            warming = max(costs.template_warming_bytes, helper.starting_bytes if helper.mode == TEMPLATE else 0)
            result.append(StartOption(TEMPLATE, 0, warming + family))
    elif mode == SPARE:
        family = family_bytes(helper, costs, template_kept=False)
        held = helper.waiting_bytes + helper.starting_bytes if helper.mode == SPARE else 0
        for count in range(spares, 0, -1):
            result.append(StartOption(SPARE, count, max(count * costs.spare_bytes, held) + family))
            held = 0  # fewer spares than run now: the ones stopped give theirs back
    result.append(StartOption(COLD, 0, family_bytes(helper, costs, template_kept=False)))
    return result


def choose(candidates: list[StartOption], plan_for: Callable[[StartOption], Plan],
           priority: Callable[[str], int] = lambda _name: 0) -> StartChoice:
    """The first option whose plan costs no model anything the cold plan does not (cold is last),
    or that serves what matters more than what it costs: cold starts cost memory too (a cold
    worker's overhead), so the cold plan may refuse a model of higher priority than the one a
    helper would have evicted. Compared by priority, highest first, then by how many."""
    wanted, cold = candidates[0], candidates[-1]
    cold_plan = plan_for(cold)
    if wanted is cold:
        return StartChoice(cold, cold_plan, wanted)
    first_cost = ""
    for option in candidates[:-1]:
        result = plan_for(option)
        lost, spared = _lost(result, cold_plan), _lost(cold_plan, result)
        if not lost or _weight(spared, priority) > _weight(lost, priority):
            return StartChoice(option, result, wanted, None if option == wanted else _yield(wanted, option, first_cost))
        first_cost = first_cost or costs_models(result, cold_plan)
    return StartChoice(cold, cold_plan, wanted, _yield(wanted, cold, first_cost))


def priorities(desired: DesiredState) -> Callable[[str], int]:
    """Each model's priority, by name (a pinned model counts above every priority)."""
    ranks = {m.name: (2**32 if m.pinned else m.priority) for m in desired.models}
    return lambda name: ranks.get(name, 0)


def _weight(names: set[str], priority: Callable[[str], int]) -> list[int]:
    return sorted((priority(name) for name in names), reverse=True)


def _lost(result: Plan, other: Plan) -> set[str]:
    refused, cut = _losses(result, other)
    return set(refused) | set(cut)


def _losses(result: Plan, other: Plan) -> tuple[list[str], list[str]]:
    """The models `result` refuses (or keeps waiting), and those whose serving worker it evicts or
    drains, that `other` does not."""
    refused = sorted((set(result.unschedulable) | set(result.waiting)) - set(other.unschedulable)
                     - set(other.waiting))
    kept = {u.worker_id for u in other.unloads()}
    cut = sorted({u.name for u in result.unloads() if u.worker_id not in kept})
    return refused, cut


def costs_models(result: Plan, cold_plan: Plan) -> str:
    """What `result` does to models that `cold_plan` does not (empty: nothing): a model refused or
    kept waiting, or a serving worker evicted or drained."""
    refused, cut = _losses(result, cold_plan)
    parts = []
    if refused:
        parts.append(", ".join(refused) + " would not fit")
    if cut:
        parts.append(", ".join(cut) + " would lose its worker")
    return "; ".join(parts)


def announce(events: EventLog, yielded_before: str | None, choice: StartChoice) -> str | None:
    """Say when a helper yields (and when it comes back); the yield in force after this pass."""
    if choice.yielded and not yielded_before:
        log.warning("fast starts yield: %s", choice.yielded)
        events.record("engine", "FastStartYielded", choice.yielded, kind="Warning")
    elif yielded_before and not choice.yielded:
        events.record("engine", "FastStartResumed",
                      f"{choice.option.describe()} fit the budget beside the models again")
    return choice.yielded


def _yield(wanted: StartOption, chosen: StartOption, cost: str) -> str:
    return (f"{wanted.describe()} and the models in models.yaml do not fit the budget together ({cost}): "
            f"using {chosen.describe()} instead")


def engine_start(desired: DesiredState) -> EngineStart:
    """models.yaml's `engine_start`; where the file names none, LMX_ENGINE_START's mode, else `auto`.

    The suite sets LMX_ENGINE_START=cold so that each of its many short-lived servers does not
    pay for a template it never uses; the fast-start tests name their mode in models.yaml.
    """
    if "engine_start" in desired.model_fields_set:
        return desired.engine_start
    mode = settings.current().engine_start
    if not mode:
        return desired.engine_start
    try:
        return EngineStart.model_validate({"mode": mode})
    except ValueError:
        log.warning("LMX_ENGINE_START=%r is not one of auto, template, spare, cold; using auto", mode)
        return desired.engine_start

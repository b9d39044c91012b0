"""`lmx plan`: what the loop would do with a models.yaml, against a server's observation or
from nothing, without doing any of it. Uses the same planner and the same estimates as the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine import memory as engine_memory
from opta_lmx.engine.prepared import HelperMemory, resolve_mode
from opta_lmx.reconciler.accounting import MemoryAccounts, held_bytes, memory_figures, worker_spec
from opta_lmx.reconciler.starts import HelperCosts, StartChoice, StartOption, choose, priorities, engine_start, options
from opta_lmx.state.spec import EngineStart
from opta_lmx.reconciler.plan import LoadModel, MemoryFigures, ObservedWorker, Plan, UnloadModel, UnloadReason, plan
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DesiredState


@dataclass
class Preview:
    plan: Plan
    memory: MemoryFigures
    physical_bytes: int
    observed: list[ObservedWorker]
    estimates: dict[str, engine_memory.MemoryEstimate]
    request: str | None = None  # the on-demand model a request was supposed to ask for (`--request`)
    start: StartChoice | None = None  # how workers would start, and what the helpers cost


def preview(config_path: Path, desired: DesiredState, observation: dict | None = None,
            request: str | None = None) -> Preview:
    """Plan `desired` against `observation` (the `observed` part of GET /admin/models) or nothing.

    The memory rules are accounting.py's, the loop's own: a preview never plans with other figures.
    `request` names a model (or alias) a request asks for now: the plan shows what it would evict."""
    if request is not None:
        requested = desired.resolve(request)
        if requested is None:
            raise ValueError(f"no model or alias `{request}` in the file")
        if requested.state.value == "unloaded":
            raise ValueError(f"`{requested.name}` is desired unloaded: a request cannot load it")
        request = requested.name
    specs = {m.name: worker_spec(config_path, desired, m) for m in desired.models}
    fingerprints = {name: spec.fingerprint for name, spec in specs.items()}
    observation = observation or {}
    accounts = MemoryAccounts()
    accounts.measured_max.update(observation.get("measured_max", {}))
    estimates = {m.name: accounts.estimate(specs[m.name], m.memory_bytes()) for m in desired.models}
    observed = []
    for w in observation.get("workers", []):
        current = estimates.get(w["name"]) if w["fingerprint"] == fingerprints.get(w["name"]) else None
        # The server's figure is what the loop counts the worker at, unless this file's override wins.
        size = held_bytes(current, None, w["bytes"])
        observed.append(ObservedWorker(w["name"], w["worker_id"], w["fingerprint"], w["ready"], size,
                                       w.get("in_flight", 0), w.get("ready_seconds", 0.0)))
    physical, available = engine_memory.machine_memory()
    server_memory = observation.get("memory") or {}
    physical = server_memory.get("physical_bytes") or physical
    available = server_memory.get("available_bytes") or available
    blocked = frozenset(
        b["name"] for b in observation.get("blocked", []) if b["fingerprint"] == fingerprints.get(b["name"])
    )
    demand = frozenset(observation.get("demand", [])) | ({request} if request else set())

    def plan_for(option: StartOption) -> Plan:  # the loop's own choice of how workers start
        planning = {n: accounts.planning(e, fingerprints[n], option.forked) for n, e in estimates.items()}
        return plan(desired, fingerprints, observed, blocked,
                    memory=memory_figures(desired, physical, available, option.fixed_bytes), estimates=planning,
                    demand=demand, idle=observation.get("idle_seconds", {}),
                    waited=observation.get("waited_seconds", {}))

    server_start = observation.get("engine_start") or {}
    helper = HelperMemory(**{k: v for k, v in (server_start.get("helper") or {}).items()
                             if k in HelperMemory.__dataclass_fields__})
    wanted = engine_start(desired)
    if "engine_start" not in desired.model_fields_set and server_start.get("wanted"):
        wanted = EngineStart(mode=server_start["wanted"], spares=wanted.spares)  # the server's own default
    choice = choose(options(resolve_mode(wanted.mode), wanted.spares, helper,
                            HelperCosts.from_dict(server_start.get("costs"))), plan_for, priorities(desired))
    memory = memory_figures(desired, physical, available, choice.option.fixed_bytes)
    return Preview(choice.plan, memory, physical, observed, estimates, request, choice)


def describe(p: Preview, source: str) -> str:
    """The plan as a person reads it: memory before and after, each action, each refusal."""
    m, result = p.memory, p.plan
    lines = [
        f"Plan {source}",
        f"memory: budget {format_size(m.budget_bytes)} (of {format_size(p.physical_bytes)} physical), "
        f"reserve {format_size(m.reserve_bytes)}, machine available {format_size(m.available_bytes)}",
        f"  held now {format_size(result.held_bytes)} -> after {format_size(result.after_bytes)} "
        f"(peak {format_size(result.peak_bytes)})",
    ]
    if p.start is not None:
        lines.append(f"  workers start through {p.start.option.describe()}" + (
            ", counted off the budget" if p.start.option.fixed_bytes else "")
            + (f" (yielded: {p.start.yielded})" if p.start.yielded else ""))
    if p.request is not None:
        lines.append(_request_summary(p))
    if result.actions:
        lines.append("actions:")
    index = {}
    for number, action in enumerate(result.actions, 1):
        if isinstance(action, UnloadModel):
            index[action.worker_id] = number
            lines.append(f"  {number}. unload {action.name} [{action.reason.value}] worker {action.worker_id}, "
                         f"frees {format_size(action.bytes)}: {action.message}")
        elif isinstance(action, LoadModel):
            when = ""
            if action.after:
                steps = sorted({index[w] for w in action.after if w in index})
                when = " after " + (", ".join(map(str, steps)) if steps else "the replaced workers stop")
            swap = " (make-before-break: then unloads the old worker)" if action.replaces else ""
            est = p.estimates.get(action.name)
            lines.append(f"  {number}. load   {action.name}{when}: {format_size(action.bytes)}"
                         f"{' = ' + est.describe() if est else ''}; {action.reason}{swap}")
    for verdict in result.unschedulable.values():
        lines.append(f"  unschedulable {verdict.name}: {verdict.message}")
    for waiting in result.waiting.values():
        lines.append(f"  waiting {waiting.name} (about {waiting.retry_after:.0f}s): {waiting.message}")
    if not result.actions:
        lines.append("nothing to do: the running workers already match the file")
    return "\n".join(lines)


def _request_summary(p: Preview) -> str:
    """One line: what a request for `p.request` does now (load, evict whom, wait or be refused)."""
    name, result = p.request, p.plan
    evicted = [u.name for u in result.unloads() if u.reason == UnloadReason.DEMAND]
    if name in result.unschedulable:
        return f"a request for {name} now: refused (503): {result.unschedulable[name].message}"
    if name in result.waiting:
        return f"a request for {name} now: waits: {result.waiting[name].message}"
    if any(load.name == name for load in result.loads()):
        return f"a request for {name} now: loads it" + (f", evicting {', '.join(evicted)}" if evicted else
                                                         ", evicting nothing")
    return f"a request for {name} now: served by its resident worker"

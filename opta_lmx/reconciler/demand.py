"""Demand swapping, pure: which resident on-demand models a request for another may evict.

A request for an on-demand model that does not fit may evict resident on-demand models that
are not pinned, of no higher priority, not asked for themselves, and not protected by their
policy (`min_residency` after Ready; `serve_queue` while they still serve requests). Victims go
lowest priority first, then least recently used. Only unprotected victims are taken, and only
if they make enough room: otherwise the request waits (protected holders) or is refused with
who holds the memory and why. The evicted are then left out of admission and the requester
ranks as an incumbent, so the greedy admission of plan.py decides the rest; planning again on
the result finds the requester resident (and protected by its own min_residency).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import DemandPolicy, DesiredModelState, ModelSpec


QUEUE_FLOOR = 1.0  # seconds a model's queued requests protect it at least (they begin within a tick)


@dataclass(frozen=True)
class Waiting:
    """A requested model that will get memory once its holders' protection ends (`retry_after` s)."""

    name: str
    message: str
    retry_after: float


@dataclass(frozen=True)
class Resident:
    """What demand planning needs of a resident model's worker."""

    bytes: int
    ready_seconds: float  # since its worker became Ready
    in_flight: int  # requests in flight or queued for a slot
    idle_seconds: float  # since it last served (least recently used goes first)
    queued: int = 0  # requests about to begin on it (woken for its route, or waiting for a slot)


@dataclass
class DemandDecision:
    """Promoted requesters (rank as incumbents), evicted victims (why), waiting and refused ones."""

    promoted: set[str] = field(default_factory=set)
    evicted: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, Waiting] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)  # requester -> who holds the memory and why


def protection(name: str, resident: Resident | None, policy: DemandPolicy, waited: float) -> tuple[str, float] | None:
    """Why `name` may not be evicted by demand now, and in how many seconds that ends; None: it may."""
    if resident is None:
        return f"{name} is loading", 1.0
    residency = policy.min_residency_seconds()
    if resident.ready_seconds < residency:
        return (f"{name} is resident for {resident.ready_seconds:.0f}s of its {residency:g}s min_residency",
                residency - resident.ready_seconds)
    contested = min(waited, resident.ready_seconds - residency)
    queue_bound = max(policy.serve_queue_seconds(), QUEUE_FLOOR)
    if resident.queued > 0 and contested < queue_bound:
        # Requests that waited for this model are served before it goes, even with serve_queue 0.
        return f"{name} has {resident.queued} request(s) queued", queue_bound - contested
    if resident.in_flight > 0:
        if contested < policy.serve_queue_seconds():
            return (f"{name} serves its {resident.in_flight} request(s) for up to "
                    f"{policy.serve_queue_seconds():g}s (serve_queue)", policy.serve_queue_seconds() - contested)
    return None


def holder_reason(holder: ModelSpec, requester: ModelSpec, policies: Mapping[str, DemandPolicy],
                  in_demand: bool) -> str:
    """Why `holder` is not evicted for `requester`, in words."""
    if holder.state == DesiredModelState.LOADED:
        return "desired loaded in models.yaml"
    if holder.pinned:
        return "pinned"
    if holder.priority > requester.priority:
        return f"on-demand with priority {holder.priority}, higher than {requester.name}'s {requester.priority}"
    if in_demand:
        return "requests are waiting for it"
    return "on-demand"


def decide(
    unschedulable: list[str],
    admitted: Mapping[str, int],
    specs: Mapping[str, ModelSpec],
    policies: Mapping[str, DemandPolicy],
    residents: Mapping[str, Resident],
    needs: Mapping[str, int],
    budget: int,
    demand: frozenset[str],
    waited: Mapping[str, float],
) -> DemandDecision:
    """One round: for each refused requester (in rank order), evict unprotected victims if they suffice."""
    decision = DemandDecision()
    free = budget - sum(admitted.values())
    taken: set[str] = set()
    for name in unschedulable:
        spec = specs[name]
        if spec.state != DesiredModelState.ON_DEMAND or name not in demand or name in residents:
            continue
        need = needs[name]
        holders = [h for h in admitted if h not in taken]
        candidates = sorted(
            (h for h in holders if _evictable(specs[h], spec, h, residents, demand)),
            key=lambda h: (specs[h].priority, h not in residents, -_idle(residents.get(h))),
        )
        if not policies[name].may_evict_or_default():
            candidates = []
        room, chosen, blocked = free, [], []
        for holder in candidates:
            if room >= need:
                break
            guard = protection(holder, residents.get(holder), policies[holder], waited.get(name, 0.0))
            if guard is None:
                chosen.append(holder)
                room += admitted[holder]
            else:
                blocked.append((holder, guard))
        if room >= need and chosen:
            decision.promoted.add(name)
            taken.update(chosen)
            free = room - need
            for victim in chosen:
                decision.evicted[victim] = (f"evicted by demand for {name}: idle {residents[victim].idle_seconds:.0f}s,"
                                            f" priority {specs[victim].priority}")
            continue
        if blocked and room + sum(admitted[h] for h, _guard in blocked) >= need:
            messages = "; ".join(guard[0] for _h, guard in blocked)
            decision.waiting[name] = Waiting(name, f"waits for memory: {messages}",
                                             min(guard[1] for _h, guard in blocked))
            continue
        why = ", ".join(f"{h} ({holder_reason(specs[h], spec, policies, h in demand)})" for h in holders) or "nothing"
        if not policies[name].may_evict_or_default():
            why += f"; {name}'s demand policy has may_evict: false"
        decision.refusals[name] = (f"needs {format_size(need)} but only {format_size(max(free, 0))} of the "
                                   f"{format_size(budget)} budget is free; the rest is held by {why}")
    return decision


def _evictable(holder: ModelSpec, requester: ModelSpec, name: str, residents: Mapping[str, Resident],
               demand: frozenset[str]) -> bool:
    # A resident model that requests still wait for serves them first; a loading one is awaited.
    return (holder.state == DesiredModelState.ON_DEMAND and not holder.pinned
            and (name not in demand or name not in residents) and holder.priority <= requester.priority)


def _idle(resident: Resident | None) -> float:
    return resident.idle_seconds if resident else 0.0

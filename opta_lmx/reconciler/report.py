"""What the loop observes, as plain data: what `lmx plan` plans against (GET /admin/models
`observed`), the memory figures the admin API shows, and the fast starts' choice."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from opta_lmx.engine.prepared import HelperMemory
from opta_lmx.reconciler.accounting import MemoryAccounts
from opta_lmx.reconciler.ledger import Ledger, WorkerEntry, WorkerPhase
from opta_lmx.reconciler.plan import MemoryFigures
from opta_lmx.reconciler.starts import StartChoice


def observation(*, ledger: Ledger, accounts: MemoryAccounts, memory: MemoryFigures, physical_bytes: int,
                choice: StartChoice | None, helper: HelperMemory, worker_bytes: Callable[[WorkerEntry], int],
                demand: Mapping[str, float], waited: Mapping[str, float], idle: Mapping[str, float],
                now: float) -> dict:
    """The loop's observation as plain data: enough for `lmx plan` to plan against this server."""
    workers = []
    for entry in ledger.processes():
        workers.append({
            "name": entry.model, "worker_id": entry.worker_id, "fingerprint": entry.fingerprint, "ready": True,
            "bytes": worker_bytes(entry), "measured_bytes": entry.measured_bytes, "mlx_bytes": entry.mlx_bytes,
            "forked": entry.forked, "in_flight": entry.traffic.in_flight,
            "ready_seconds": max(0.0, now - entry.ready_at) if entry.ready_at else 0.0,
            "draining": entry.phase in (WorkerPhase.DRAINING, WorkerPhase.STOPPING),
        })
    for entry in ledger:
        if entry.loading:
            workers.append({"name": entry.model, "worker_id": entry.key, "fingerprint": entry.fingerprint,
                            "ready": False, "bytes": entry.planned_bytes, "measured_bytes": None,
                            "in_flight": 0, "draining": False})
    fixed = choice.option.fixed_bytes if choice else 0
    return {
        "memory": {
            "physical_bytes": physical_bytes, "budget_bytes": memory.budget_bytes,
            "reserve_bytes": memory.reserve_bytes, "available_bytes": memory.available_bytes,
            "held_bytes": sum(w["bytes"] for w in workers), "fixed_bytes": fixed,
            "total_budget_bytes": memory.budget_bytes + fixed,
        },
        "engine_start": {
            "wanted": choice.wanted.mode if choice else None, "mode": choice.option.mode if choice else None,
            "spares": choice.option.spares if choice else 0, "fixed_bytes": fixed,
            "measured_bytes": helper.waiting_bytes + helper.starting_bytes,
            "forked_loads": choice.option.forked if choice else False,
            "yielded": choice.yielded if choice else None,
            "helper": helper.to_dict(), "costs": accounts.helper_costs.to_dict(),
        },
        "workers": workers,
        "measured_max": dict(accounts.measured_max),
        "blocked": [{"name": n, "fingerprint": f.fingerprint} for n, f in ledger.failures.items()
                    if f.permanent or f.retry_at > now],
        "demand": sorted(demand),
        "waited_seconds": dict(waited),
        "idle_seconds": dict(idle),
    }

"""The admin API: reads status, and (later) edits the desired state. Never imports the engine."""

from __future__ import annotations

from fastapi import APIRouter, Request

from opta_lmx.api.errors import APIError
from opta_lmx.reconciler.controller import Reconciler

router = APIRouter(prefix="/admin")


def _model_view(reconciler: Reconciler, name: str) -> dict:
    spec = reconciler.desired.model(name) if reconciler.desired else None
    status = reconciler.statuses.get(name)
    return {
        "name": name,
        "spec": spec.model_dump(mode="json", exclude_unset=True) if spec else None,
        "status": status.model_dump(mode="json") if status else None,
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    reconciler: Reconciler = request.app.state.reconciler
    names = [m.name for m in reconciler.desired.models] if reconciler.desired else []
    names += [n for n in reconciler.statuses if n not in names]
    return {
        "generation": reconciler.generation,
        "observed_generation": reconciler.observed_generation,
        "converged": reconciler.converged(),
        "config": reconciler.config_status.model_dump(mode="json"),
        "models": [_model_view(reconciler, n) for n in names],
        "observed": reconciler.observation(),  # workers, memory figures, demand: what `lmx plan` plans against
    }


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> dict:
    reconciler: Reconciler = request.app.state.reconciler
    if (reconciler.desired is None or reconciler.desired.model(name) is None) and name not in reconciler.statuses:
        raise APIError(404, f"no model named `{name}` in models.yaml", "model_not_found")
    return _model_view(reconciler, name)


@router.get("/events")
async def events(request: Request, since: int = 0, limit: int = 200) -> dict:
    reconciler: Reconciler = request.app.state.reconciler
    return {"events": [e.model_dump(mode="json") for e in reconciler.events.since(since, limit)]}

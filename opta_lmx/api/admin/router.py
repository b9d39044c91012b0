"""The admin API's routes: HTTP in, HTTP out; the logic is in serving, the edits in edits.

Every write is an edit of models.yaml through the one store followed by a nudge of the loop.
A write answers 202 with the generation its content was accepted as, or with `?wait=ready`
blocks until the loop has converged on it.
"""

from __future__ import annotations

import asyncio
import difflib
import time

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from opta_lmx.api.admin import edits
from opta_lmx.api.admin import openapi as docs
from opta_lmx.api.admin.events import follow as follow_events
from opta_lmx.api.admin.protocol import (
    DEFAULT_WAIT,
    SetStateRequest,
    SwapRequest,
    json_object,
    read_body,
    wait_query,
)
from opta_lmx.api.admin.serving import AdminService, Answer
from opta_lmx.api.errors import APIError
from opta_lmx.state.spec import DesiredModelState, DesiredState

router = APIRouter(prefix="/admin")
probes = APIRouter()


def mount(app: FastAPI, service: AdminService) -> None:
    """Serve the admin API (and /readyz) of `service` on `app`."""
    app.state.admin = service
    app.include_router(router)
    app.include_router(probes)


def _service(request: Request) -> AdminService:
    return request.app.state.admin


def _send(answer: Answer) -> JSONResponse:
    return JSONResponse(answer.body, status_code=answer.status, headers={"ETag": answer.etag} if answer.etag else None)


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


async def _edit(request: Request, endpoint: str, mutate, *, subject="config", guarded: bool = True):
    """One edit; `?create=true` lets it start a new file where there is none (docs/admin-api.md)."""
    if_match = request.headers.get("if-match") if guarded else None
    return await _service(request).write(endpoint, mutate, if_match=if_match, subject=subject,
                                         create=_flag(request, "create"))


async def _edit_model(request: Request, verb: str, name: str, mutate) -> JSONResponse:
    """Edit one entry, then answer (waiting for it to settle if `?wait` asks)."""
    timeout = wait_query(dict(request.query_params)).seconds()
    result, generation = await _edit(request, f"{verb} /admin/models/{name}", mutate, subject=name)
    return _send(await _service(request).answer(result, generation, name, timeout))


async def _json(request: Request) -> dict:
    return json_object(await read_body(request))


# -- models -----------------------------------------------------------------------------
@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    body, etag = await _service(request).models()
    return JSONResponse(body, headers={"ETag": etag})


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> JSONResponse:
    body, etag = await _service(request).model(name)
    return JSONResponse(body, headers={"ETag": etag})


@router.put("/models/{name}", openapi_extra=docs.PUT_MODEL)
async def put_model(name: str, request: Request) -> JSONResponse:
    """Create or replace one entry; keys that stay keep their place and comments."""
    body = await _json(request)
    spec = body["spec"] if isinstance(body.get("spec"), dict) else body
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("name", name) != name:
        raise APIError(422, f"the body names `{spec['name']}` but the URL names `{name}`; rename by "
                            "DELETE and PUT", "name_mismatch", param="name")
    spec = {"name": name, **{k: v for k, v in spec.items() if k != "name"}}
    return await _edit_model(request, "PUT", name, lambda tree: edits.put_model(tree, name, spec))


@router.patch("/models/{name}", openapi_extra=docs.PATCH_MODEL)
async def patch_model(name: str, request: Request) -> JSONResponse:
    """JSON merge patch (RFC 7396) of one entry: null deletes a key, lists are replaced."""
    patch = await _json(request)
    if patch.get("name", name) != name:
        raise APIError(422, "a model cannot be renamed by PATCH; DELETE it and PUT the new name",
                       "name_mismatch", param="name")
    return await _edit_model(request, "PATCH", name, lambda tree: edits.patch_model(tree, name, patch))


@router.delete("/models/{name}", openapi_extra=docs.DELETE_MODEL)
async def delete_model(name: str, request: Request) -> JSONResponse:
    return await _edit_model(request, "DELETE", name, lambda tree: edits.delete_model(tree, name))


# -- imperative verbs, each one desired-state edit ----------------------------------------
async def _set_state(request: Request, verb: str, state: DesiredModelState) -> JSONResponse:
    body = await _json(request)
    model_id = SetStateRequest.model_validate(body).target()
    timeout = wait_query(dict(request.query_params), body).seconds(default_wait=True)
    touched: dict[str, str] = {}
    result, generation = await _edit(request, f"POST /admin/models/{verb}",
                                     lambda tree: edits.set_state(tree, model_id, verb, state, touched),
                                     subject=lambda: touched.get("name", model_id))
    return _send(await _service(request).answer(result, generation, touched["name"], timeout,
                                                extra={"model_id": model_id, "action": verb}))


@router.post("/models/load", openapi_extra=docs.SET_STATE)
async def load_model(request: Request) -> JSONResponse:
    """`{"model_id"}` -> set `state: loaded` and wait until it serves (a hub id or path is added)."""
    return await _set_state(request, "load", DesiredModelState.LOADED)


@router.post("/models/unload", openapi_extra=docs.SET_STATE)
async def unload_model(request: Request) -> JSONResponse:
    """`{"model_id"}` -> set `state: unloaded` and wait until its worker is gone."""
    return await _set_state(request, "unload", DesiredModelState.UNLOADED)


@router.post("/models/swap", openapi_extra=docs.SWAP)
async def swap_models(request: Request) -> JSONResponse:
    """`{"from", "to"}`: one edit. `{"alias", "to"}`: load `to`, and move the alias once it is Ready."""
    body = await _json(request)
    swap = SwapRequest.parse(body)
    timeout = wait_query(dict(request.query_params), body).seconds(default_wait=True)
    service = _service(request)
    names: dict = {}
    source = swap.source()
    if source is not None:
        result, generation = await _edit(request, "POST /admin/models/swap",
                                         lambda tree: edits.swap(tree, source, swap.to, names))
        deadline = time.monotonic() + (timeout or 0.0)
        if timeout is not None:  # the planner unloads first, so `from` settles before `to`
            await service.wait(names["from"], generation, timeout)
        remaining = None if timeout is None else max(0.0, deadline - time.monotonic())
        from_status = service.loop.statuses.get(names["from"])
        return _send(await service.answer(result, generation, names["to"], remaining, extra={
            "from": names["from"], "to": names["to"],
            "from_status": from_status.model_dump(mode="json") if from_status else None,
        }))
    alias = swap.alias_name()
    first, generation = await _edit(request, "POST /admin/models/swap",
                                    lambda tree: edits.load_for_alias(tree, swap.to, alias, names),
                                    subject=lambda: names.get("to", swap.to))
    outcome = await service.wait(names["to"], generation, timeout if timeout is not None else DEFAULT_WAIT)
    if outcome is not True:
        return _send(await service.answer(first, generation, names["to"], 0.0,
                                          extra={"alias": alias, "to": names["to"], "alias_moved": False}))
    # The first edit changed the file, so If-Match guards only that one; this one rebases.
    unload_previous = bool(swap.unload_previous)
    second, generation = await _edit(request, "POST /admin/models/swap",
                                     lambda tree: edits.move_alias(tree, alias, unload_previous, names),
                                     guarded=False, subject=lambda: names["to"])
    return _send(await service.answer(second, generation, names["to"], timeout, extra={
        "alias": alias, "to": names["to"], "from": names.get("previous"), "alias_moved": True}))


# -- the global part of the document -------------------------------------------------------
def _config_view(state: DesiredState | None) -> dict:
    state = state or DesiredState()
    return {"memory": state.memory.model_dump(mode="json"), "defaults": state.defaults.model_dump(
        mode="json", exclude_unset=True)}


@router.get("/config")
async def get_config(request: Request) -> JSONResponse:
    snap, state = await _service(request).current()
    body = _config_view(state) | {"generation": _service(request).loop.generation, "etag": snap.etag}
    return JSONResponse(body, headers={"ETag": snap.etag})


@router.patch("/config", openapi_extra=docs.PATCH_CONFIG)
async def patch_config(request: Request) -> JSONResponse:
    """Merge patch of `memory` and `defaults`; models are edited through /admin/models."""
    patch = await _json(request)
    if "models" in patch:
        raise APIError(422, "edit models through /admin/models/{name}", "invalid_request", param="models")
    timeout = wait_query(dict(request.query_params)).seconds()
    result, generation = await _edit(request, "PATCH /admin/config", lambda tree: edits.patch_config(tree, patch))
    answer = await _service(request).answer(result, generation, None, timeout)
    return _send(Answer(answer.status, answer.body | _config_view(result.state), result.etag))


@router.get("/desired")
async def get_desired(request: Request) -> Response:
    """models.yaml as it is on disk, with its ETag (what `lmx apply` diffs against)."""
    service = _service(request)
    snap = await asyncio.to_thread(service.store.snapshot)
    if snap.problem is not None:
        raise APIError(409, snap.problem, "document_unreadable")
    return Response(snap.data, media_type="application/yaml",
                    headers={"ETag": snap.etag, "X-Generation": str(service.loop.generation)})


@router.put("/desired", openapi_extra=docs.PUT_DESIRED)
async def put_desired(request: Request) -> JSONResponse:
    """Replace models.yaml whole (validated first); `?dry_run=true` only validates and diffs."""
    try:
        text = (await read_body(request)).decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the body must be UTF-8 YAML", "invalid_request") from None
    dry_run = _flag(request, "dry_run")
    timeout = wait_query(dict(request.query_params)).seconds()
    service = _service(request)
    old = await asyncio.to_thread(service.store.snapshot)
    if_match = request.headers.get("if-match")
    result, generation = await service.write("PUT /admin/desired", text=text, dry_run=dry_run, if_match=if_match)
    old_text = old.data.decode("utf-8", errors="replace")  # the old file may be anything: show what it was
    diff = "".join(difflib.unified_diff(old_text.splitlines(True), text.splitlines(True),
                                        "models.yaml (current)", "models.yaml (new)"))
    if dry_run:
        return JSONResponse({"valid": True, "changed": result.changed, "diff": diff, "etag": old.etag},
                            headers={"ETag": old.etag})
    return _send(await service.answer(result, generation, None, timeout, extra={"diff": diff}))


# -- read side ------------------------------------------------------------------------------
@router.get("/status")
async def status(request: Request) -> JSONResponse:
    body, etag = await _service(request).status()
    return JSONResponse(body, headers={"ETag": etag})


@router.get("/caches")
async def kept_caches(request: Request) -> dict:
    """Each model's kept prefix cache on disk (docs/reconciler.md, "Kept prefix caches"), and the budgets."""
    service = _service(request)
    _snap, state = await service.current()
    budgets = (state or DesiredState()).prefix_caches
    return {"caches": service.loop.kept_caches(),
            "budgets": {"enabled": budgets.enabled, "per_model_bytes": budgets.per_model_bytes(),
                        "total_bytes": budgets.total_bytes(), "save_timeout_seconds": budgets.save_timeout_seconds()}}


@router.delete("/caches")
async def clear_all_caches(request: Request) -> dict:
    """Remove every kept prefix cache that no running worker holds (a held one stays, and is said)."""
    return await _clear_caches(request, None)


@router.delete("/caches/{name}")
async def clear_model_cache(name: str, request: Request) -> dict:
    """Remove `name`'s kept prefix cache, unless a running worker holds it."""
    return await _clear_caches(request, name)


async def _clear_caches(request: Request, name: str | None) -> dict:
    loop = _service(request).loop
    known = loop.kept_caches()
    if name is not None and name not in known and (loop.desired is None or loop.desired.model(name) is None):
        raise APIError(404, f"no model and no kept prefix cache named {name!r}", "model_not_found", param="name")
    removed, held = await loop.clear_caches(name)
    return {"removed": removed, "in_use": held}


@router.get("/memory")
async def memory(request: Request) -> dict:
    _snap, state = await _service(request).current()
    return _service(request).memory(state)


@router.get("/events")
async def events(request: Request, since: int = Query(0, ge=0, le=2**63),
                 limit: int = Query(200, ge=1, le=100_000), follow: bool = False):
    """Recent events; `?follow=true` streams them as server-sent events (`id:` is the seq)."""
    log = _service(request).loop.events
    if not follow:
        return {"events": [e.model_dump(mode="json") for e in log.since(since, limit)]}
    last_id = request.headers.get("last-event-id", "")
    if last_id.isascii() and last_id.isdigit() and len(last_id) <= 19:  # anything else is ignored
        since = int(last_id)
    stream = follow_events(log, since, limit, stopping=lambda: getattr(request.app.state, "stopping", False),
                    disconnected=request.is_disconnected)
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/health")
async def health(request: Request) -> dict:
    """The overview the original Opta-LMX gave: models, memory, convergence and the loop's health."""
    return await _service(request).health()


@probes.get("/readyz", responses={503: {"description": "Not ready: `reasons` says why (no valid "
                                            "models.yaml yet, not converged, the loop stopped)"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready once the loop runs, a valid desired state is in force and every model is as desired."""
    body = _service(request).readiness()
    if not getattr(request.state, "lmx_authenticated", True):  # keys set, none sent: ready or not, nothing more
        body = {"ready": body["ready"]}
    return JSONResponse(body, status_code=200 if body["ready"] else 503)

"""The admin API: reads status and edits the desired state. Never imports the engine.

Every write is an edit of models.yaml through the one store (validated, atomic, guarded by
ETags) followed by a nudge of the loop; nothing here starts or stops a worker. A write answers
202 with the generation its content was accepted as, or with `?wait=ready` blocks until the
loop has converged on it.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import psutil
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from opta_lmx.api.errors import APIError
from opta_lmx.reconciler.controller import Reconciler
from opta_lmx.state.document import ConfigError, parse_document
from opta_lmx.state.spec import DesiredModelState, DesiredState, MemorySpec
from opta_lmx.state.status import Phase
from opta_lmx.state.store import (
    EditConflict,
    EditError,
    ModelsStore,
    PreconditionFailed,
    Snapshot,
    WriteResult,
    append_item,
    delete_item,
    describe_patch,
    find_model,
    merge_patch,
    models_of,
    replace_mapping,
    require_model,
    to_node,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/admin")
probes = APIRouter()

DEFAULT_WAIT = 300.0  # seconds an imperative call (load/unload/swap) waits by default
MAX_WAIT = 3600.0
_MEMORY_PHASES = {Phase.READY, Phase.LOADING, Phase.DRAINING, Phase.UNLOADING}


# -- plumbing ---------------------------------------------------------------------------
def _reconciler(request: Request) -> Reconciler:
    return request.app.state.reconciler


def _store(request: Request) -> ModelsStore:
    return request.app.state.store


def _current(request: Request) -> tuple[Snapshot, DesiredState | None]:
    """The file as it is now, and what it means if it is valid (else the loop's last good state)."""
    snap = _store(request).snapshot()
    accepted = _reconciler(request).document
    if accepted is not None and accepted.etag == snap.etag:
        return snap, accepted.state  # the loop already parsed these very bytes
    try:
        return snap, parse_document(snap.text, str(_store(request).path)).state
    except (ConfigError, UnicodeDecodeError):
        return snap, _reconciler(request).desired


def _model_view(reconciler: Reconciler, name: str, state: DesiredState | None) -> dict:
    spec = state.model(name) if state else None
    status = reconciler.statuses.get(name)
    return {
        "name": name,
        "spec": spec.model_dump(mode="json", exclude_unset=True) if spec else None,
        "status": status.model_dump(mode="json") if status else None,
    }


def _invalid(error: ConfigError) -> APIError:
    first = error.problems[0] if error.problems else None
    message = "the edit would make models.yaml invalid; nothing was written: " + "; ".join(
        str(p) for p in error.problems
    )
    return APIError(
        422, message, "invalid_desired_state", param=first.path if first else None,
        extra={"problems": error.to_dict()["problems"]},
    )


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise APIError(400, "the request body must be a JSON object", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    return body


def _wait_params(request: Request, default_wait: bool = False, body: dict | None = None) -> float | None:
    """Seconds to wait for convergence, or None for "answer 202 now"."""
    wait = request.query_params.get("wait")
    if wait not in (None, "", "ready", "none"):
        raise APIError(400, "`wait` must be `ready` (or absent)", "invalid_request", param="wait")
    raw = request.query_params.get("timeout") or (body or {}).get("timeout")
    try:
        timeout = float(raw) if raw is not None else (DEFAULT_WAIT if default_wait else 120.0)
    except (TypeError, ValueError):
        raise APIError(400, "`timeout` must be a number of seconds", "invalid_request", param="timeout") from None
    if wait == "ready" or (default_wait and wait != "none"):
        return max(0.0, min(timeout, MAX_WAIT))
    return None


async def _write(request: Request, endpoint: str, mutate: Callable | None = None, *,
                 text: str | None = None, dry_run: bool = False, guarded: bool = True,
                 subject: str | Callable[[], str] = "config") -> tuple[WriteResult, int]:
    """Edit models.yaml (or replace it with `text`), then have the loop accept it now."""
    store, reconciler = _store(request), _reconciler(request)
    if_match = request.headers.get("if-match") if guarded else None
    try:
        if text is not None:
            result = await asyncio.to_thread(store.replace, text, if_match=if_match, endpoint=endpoint,
                                             dry_run=dry_run)
        else:
            result = await asyncio.to_thread(store.edit, mutate, if_match=if_match, endpoint=endpoint,
                                             dry_run=dry_run)
    except PreconditionFailed as error:
        raise APIError(412, f"models.yaml changed since you read it (If-Match {error.expected}, now "
                            f"{error.current}); nothing was written: read it again and retry",
                       "etag_mismatch", headers={"ETag": error.current},
                       extra={"current_etag": error.current}) from None
    except ConfigError as error:
        raise _invalid(error) from None
    except EditError as error:
        raise APIError(error.status, error.message, error.code) from None
    except EditConflict as error:
        raise APIError(409, str(error), "edit_conflict") from None
    if dry_run:
        return result, reconciler.generation
    if result.changed:
        about = subject() if callable(subject) else subject  # a model's name shows in `lmx describe`
        reconciler.events.record(about, "AdminEdit", f"{result.summary} (via {endpoint})")
        if result.commit_error:
            reconciler.events.record("config", "GitCommitFailed", result.commit_error, kind="Warning")
    try:
        generation = await asyncio.wait_for(reconciler.accept_now(), 30)
    except Exception:  # noqa: BLE001 - the write stands; the loop will pick it up by itself
        log.exception("reconcile after an admin write failed")
        reconciler.nudge()
        generation = reconciler.generation
    return result, generation


def _settled(reconciler: Reconciler, name: str | None, generation: int) -> bool | str:
    """True when the loop has seen `generation` and `name` (or everything) is as desired.

    A string instead says the wait is hopeless (the model failed permanently).
    """
    if reconciler.observed_generation < generation:
        return False
    if name is None:
        return reconciler.converged()
    spec = reconciler.desired.model(name) if reconciler.desired else None
    status = reconciler.statuses.get(name)
    if spec is None:
        return status is None or status.phase == Phase.UNLOADED
    want = reconciler.desired_phase(spec)
    phase = status.phase if status else (Phase.UNLOADED if spec.state != DesiredModelState.LOADED else None)
    if phase == want:
        return True
    if phase in (Phase.FAILED, Phase.UNSCHEDULABLE) and want == Phase.READY:
        return f"{phase.value}: {status.message or status.last_error}" if status else phase.value
    return False


async def _wait(reconciler: Reconciler, name: str | None, generation: int, timeout: float) -> bool | str:
    """Poll the loop's statuses until settled or `timeout`; nudge it each second meanwhile so a
    status that changes without an event of its own (a load refused before it started) shows."""
    deadline = time.monotonic() + timeout
    next_nudge = time.monotonic() + 1.0
    while True:
        outcome = _settled(reconciler, name, generation)
        now = time.monotonic()
        if outcome is not False or now >= deadline:
            return outcome
        if now >= next_nudge:
            reconciler.nudge()
            next_nudge = now + 1.0
        await asyncio.sleep(min(0.1, max(0.0, deadline - now)))


async def _answer(request: Request, result: WriteResult, generation: int, name: str | None,
                  timeout: float | None, *, extra: dict | None = None) -> JSONResponse:
    """202 with the generation, or (waiting) 200 once settled, 504 on timeout, 502 if it failed."""
    reconciler = _reconciler(request)
    status_code = 202
    problem = None
    if timeout is not None:
        outcome = await _wait(reconciler, name, generation, timeout)
        if outcome is True:
            status_code = 200
        elif outcome is False:
            status_code = 504
            problem = (f"not settled within {timeout:g}s (generation {generation}, observed "
                       f"{reconciler.observed_generation}); the edit is written and the loop keeps converging")
        else:
            status_code = 502
            problem = f"the edit is written (generation {generation}) but the model did not come up: {outcome}"
    body: dict[str, Any] = {}
    if name is not None:
        body.update(_model_view(reconciler, name, result.state))
    body.update({
        "generation": generation,
        "observed_generation": reconciler.observed_generation,
        "converged": reconciler.converged(),
        "etag": result.etag,
        "changed": result.changed,
    })
    if result.commit:
        body["git_commit"] = result.commit
    if result.commit_error:
        body["git_error"] = result.commit_error
    body.update(extra or {})
    if problem is not None:
        code = "wait_timeout" if status_code == 504 else "model_failed"
        body["error"] = {"message": problem, "type": "timeout_error" if status_code == 504 else "api_error",
                         "param": None, "code": code}
    return JSONResponse(body, status_code=status_code, headers={"ETag": result.etag})


# -- models -----------------------------------------------------------------------------
def _overview(reconciler, etag: str) -> dict:
    """What every whole-state answer starts with: where the loop is, and the file it read."""
    return {
        "generation": reconciler.generation,
        "observed_generation": reconciler.observed_generation,
        "converged": reconciler.converged(),
        "etag": etag,
        "config": reconciler.config_status.model_dump(mode="json"),
    }


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    reconciler = _reconciler(request)
    snap, state = _current(request)
    names = [m.name for m in state.models] if state else []
    names += [n for n in reconciler.statuses if n not in names]
    body = {
        **_overview(reconciler, snap.etag),
        "models": [_model_view(reconciler, n, state) for n in names],
        "observed": reconciler.observation(),  # workers, memory figures, demand: what `lmx plan` plans against
    }
    return JSONResponse(body, headers={"ETag": snap.etag})


@router.get("/models/{name}")
async def get_model(name: str, request: Request) -> JSONResponse:
    reconciler = _reconciler(request)
    snap, state = _current(request)
    if (state is None or state.model(name) is None) and name not in reconciler.statuses:
        raise APIError(404, f"no model named `{name}` in models.yaml", "model_not_found")
    body = _model_view(reconciler, name, state) | {"generation": reconciler.generation, "etag": snap.etag}
    return JSONResponse(body, headers={"ETag": snap.etag})


@router.put("/models/{name}")
async def put_model(name: str, request: Request) -> JSONResponse:
    """Create or replace one entry; keys that stay keep their place and comments."""
    body = await _json_object(request)
    spec = body["spec"] if isinstance(body.get("spec"), dict) else body
    spec = {k: v for k, v in spec.items() if v is not None}
    if spec.get("name", name) != name:
        raise APIError(422, f"the body names `{spec['name']}` but the URL names `{name}`; rename by "
                            "DELETE and PUT", "name_mismatch", param="name")
    spec = {"name": name, **{k: v for k, v in spec.items() if k != "name"}}
    timeout = _wait_params(request)

    def mutate(tree) -> str:
        entry = find_model(tree, name)
        if entry is None:
            append_item(models_of(tree), to_node(spec))
            return f"add model {name}"
        replace_mapping(entry, spec)
        return f"replace model {name}"

    result, generation = await _write(request, f"PUT /admin/models/{name}", mutate, subject=name)
    return await _answer(request, result, generation, name, timeout)


@router.patch("/models/{name}")
async def patch_model(name: str, request: Request) -> JSONResponse:
    """JSON merge patch (RFC 7396) of one entry: null deletes a key, lists are replaced."""
    patch = await _json_object(request)
    if patch.get("name", name) != name:
        raise APIError(422, "a model cannot be renamed by PATCH; DELETE it and PUT the new name",
                       "name_mismatch", param="name")
    timeout = _wait_params(request)

    def mutate(tree) -> str:
        merge_patch(require_model(tree, name), patch)
        return f"set {name}: {describe_patch(patch)}"

    result, generation = await _write(request, f"PATCH /admin/models/{name}", mutate, subject=name)
    return await _answer(request, result, generation, name, timeout)


@router.delete("/models/{name}")
async def delete_model(name: str, request: Request) -> JSONResponse:
    timeout = _wait_params(request)

    def mutate(tree) -> str:
        models = models_of(tree)
        for index, entry in enumerate(models):
            if isinstance(entry, dict) and entry.get("name") == name:
                delete_item(models, index)
                return f"delete model {name}"
        raise EditError(f"no model named `{name}` in models.yaml", "model_not_found", 404)

    result, generation = await _write(request, f"DELETE /admin/models/{name}", mutate, subject=name)
    return await _answer(request, result, generation, name, timeout)


# -- imperative verbs, each one desired-state edit ----------------------------------------
def _resolve_entry(tree, model_id: str):
    """The entry a client's `model_id` names: by name, then by alias."""
    entry = find_model(tree, model_id)
    if entry is not None:
        return entry
    for candidate in models_of(tree):
        if isinstance(candidate, dict) and model_id in (candidate.get("aliases") or []):
            return candidate
    return None


def _name_from_source(source: str) -> str:
    base = Path(source.rstrip("/")).name or source
    name = re.sub(r"[^A-Za-z0-9._:@-]", "-", base).lstrip("-._:@") or "model"
    return name[:128]


async def _set_state(request: Request, verb: str, state: DesiredModelState) -> JSONResponse:
    body = await _json_object(request)
    model_id = body.get("model_id") or body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise APIError(400, "`model_id` is required", "invalid_request", param="model_id")
    timeout = _wait_params(request, default_wait=True, body=body)
    touched: dict[str, str] = {}

    def mutate(tree) -> str:
        entry = _resolve_entry(tree, model_id)
        if entry is None:
            looks_like_source = "/" in model_id or Path(model_id).expanduser().exists()
            if state != DesiredModelState.LOADED or not looks_like_source:
                raise EditError(f"no model named `{model_id}` in models.yaml", "model_not_found", 404)
            name = _name_from_source(model_id)
            if find_model(tree, name) is not None:
                raise EditError(f"a model named `{name}` already exists with another source",
                                "model_exists", 409)
            append_item(models_of(tree), to_node({"name": name, "source": model_id, "state": state.value}))
            touched["name"] = name
            return f"add and load model {name} ({model_id})"
        touched["name"] = entry["name"]
        merge_patch(entry, {"state": state.value})
        return f"{verb} model {entry['name']}"

    result, generation = await _write(request, f"POST /admin/models/{verb}", mutate,
                                      subject=lambda: touched.get("name", model_id))
    return await _answer(request, result, generation, touched["name"], timeout,
                         extra={"model_id": model_id, "action": verb})


@router.post("/models/load")
async def load_model(request: Request) -> JSONResponse:
    """`{"model_id"}` -> set `state: loaded` and wait until it serves (a hub id or path is added)."""
    return await _set_state(request, "load", DesiredModelState.LOADED)


@router.post("/models/unload")
async def unload_model(request: Request) -> JSONResponse:
    """`{"model_id"}` -> set `state: unloaded` and wait until its worker is gone."""
    return await _set_state(request, "unload", DesiredModelState.UNLOADED)


@router.post("/models/swap")
async def swap_models(request: Request) -> JSONResponse:
    """`{"from", "to"}`: one edit. `{"alias", "to"}`: load `to`, and move the alias once it is Ready."""
    body = await _json_object(request)
    target = body.get("to")
    if not isinstance(target, str) or not target:
        raise APIError(400, "`to` is required", "invalid_request", param="to")
    timeout = _wait_params(request, default_wait=True, body=body)
    reconciler = _reconciler(request)
    if isinstance(body.get("from"), str):
        source = body["from"]
        names: dict[str, str] = {}

        def mutate(tree) -> str:
            old, new = _resolve_entry(tree, source), _resolve_entry(tree, target)
            for given, entry in ((source, old), (target, new)):
                if entry is None:
                    raise EditError(f"no model named `{given}` in models.yaml", "model_not_found", 404)
            names.update({"from": old["name"], "to": new["name"]})
            merge_patch(old, {"state": DesiredModelState.UNLOADED.value})
            merge_patch(new, {"state": DesiredModelState.LOADED.value})
            return f"swap {old['name']} -> {new['name']}"

        result, generation = await _write(request, "POST /admin/models/swap", mutate)
        deadline = time.monotonic() + (timeout or 0.0)
        if timeout is not None:  # the planner unloads first, so `from` settles before `to`
            await _wait(reconciler, names["from"], generation, timeout)
        remaining = None if timeout is None else max(0.0, deadline - time.monotonic())
        from_status = reconciler.statuses.get(names["from"])
        return await _answer(request, result, generation, names["to"], remaining, extra={
            "from": names["from"], "to": names["to"],
            "from_status": from_status.model_dump(mode="json") if from_status else None,
        })
    alias = body.get("alias")
    if not isinstance(alias, str) or not alias:
        raise APIError(400, "give either `from` or `alias`", "invalid_request", param="from")
    unload_previous = bool(body.get("unload_previous", False))
    names = {}

    def load_target(tree) -> str:
        new = _resolve_entry(tree, target)
        if new is None:
            raise EditError(f"no model named `{target}` in models.yaml", "model_not_found", 404)
        names["to"] = new["name"]
        merge_patch(new, {"state": DesiredModelState.LOADED.value})
        return f"load {new['name']} before moving alias {alias} to it"

    first, generation = await _write(request, "POST /admin/models/swap", load_target,
                                     subject=lambda: names.get("to", target))
    outcome = await _wait(reconciler, names["to"], generation, timeout if timeout is not None else DEFAULT_WAIT)
    if outcome is not True:
        return await _answer(request, first, generation, names["to"], 0.0,
                             extra={"alias": alias, "to": names["to"], "alias_moved": False})

    def move_alias(tree) -> str:
        new = require_model(tree, names["to"])
        previous = None
        for entry in models_of(tree):
            if isinstance(entry, dict) and alias in (entry.get("aliases") or []) and entry is not new:
                previous = entry
                merge_patch(entry, {"aliases": [a for a in entry["aliases"] if a != alias]})
                if unload_previous:
                    merge_patch(entry, {"state": DesiredModelState.UNLOADED.value})
        if alias not in (new.get("aliases") or []):
            merge_patch(new, {"aliases": [*(new.get("aliases") or []), alias]})
        names["previous"] = previous["name"] if previous is not None else None
        return f"move alias {alias} to {new['name']}" + (f" from {previous['name']}" if previous else "")

    # The first edit changed the file, so If-Match guards only that one; this one rebases.
    second, generation = await _write(request, "POST /admin/models/swap", move_alias, guarded=False,
                                      subject=lambda: names["to"])
    return await _answer(request, second, generation, names["to"], timeout,
                         extra={"alias": alias, "to": names["to"], "from": names.get("previous"),
                                "alias_moved": True})


# -- the global part of the document -------------------------------------------------------
def _config_view(state: DesiredState | None) -> dict:
    state = state or DesiredState()
    return {"memory": state.memory.model_dump(mode="json"), "defaults": state.defaults.model_dump(
        mode="json", exclude_unset=True)}


@router.get("/config")
async def get_config(request: Request) -> JSONResponse:
    snap, state = _current(request)
    body = _config_view(state) | {"generation": _reconciler(request).generation, "etag": snap.etag}
    return JSONResponse(body, headers={"ETag": snap.etag})


@router.patch("/config")
async def patch_config(request: Request) -> JSONResponse:
    """Merge patch of `memory` and `defaults`; models are edited through /admin/models."""
    patch = await _json_object(request)
    if "models" in patch:
        raise APIError(422, "edit models through /admin/models/{name}", "invalid_request", param="models")
    timeout = _wait_params(request)

    def mutate(tree) -> str:
        merge_patch(tree, patch)
        return f"set config: {describe_patch(patch)}"

    result, generation = await _write(request, "PATCH /admin/config", mutate)
    response = await _answer(request, result, generation, None, timeout)
    body = json.loads(response.body) | _config_view(result.state)
    return JSONResponse(body, status_code=response.status_code, headers={"ETag": result.etag})


@router.get("/desired")
async def get_desired(request: Request) -> Response:
    """models.yaml as it is on disk, with its ETag (what `lmx apply` diffs against)."""
    snap = _store(request).snapshot()
    return Response(snap.data, media_type="application/yaml",
                    headers={"ETag": snap.etag, "X-Generation": str(_reconciler(request).generation)})


@router.put("/desired")
async def put_desired(request: Request) -> JSONResponse:
    """Replace models.yaml whole (validated first); `?dry_run=true` only validates and diffs."""
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "the body must be UTF-8 YAML", "invalid_request") from None
    dry_run = request.query_params.get("dry_run", "").lower() in ("1", "true", "yes")
    timeout = _wait_params(request)
    old = _store(request).snapshot()
    result, generation = await _write(request, "PUT /admin/desired", text=text, dry_run=dry_run)
    diff = "".join(difflib.unified_diff(old.text.splitlines(True), text.splitlines(True),
                                        "models.yaml (current)", "models.yaml (new)"))
    if dry_run:
        return JSONResponse({"valid": True, "changed": result.changed, "diff": diff, "etag": old.etag},
                            headers={"ETag": old.etag})
    response = await _answer(request, result, generation, None, timeout, extra={"diff": diff})
    return response


# -- read side ------------------------------------------------------------------------------
def _memory(reconciler: Reconciler, state: DesiredState | None) -> dict:
    """Budget from the desired state, use from the loop's statuses, machine figures from psutil."""
    vm = psutil.virtual_memory()
    spec = state.memory if state else MemorySpec()
    budget = spec.budget_bytes(vm.total)
    models = []
    used = 0
    for name, status in reconciler.statuses.items():
        counted = status.measured_bytes or status.estimated_bytes or 0
        if status.phase in _MEMORY_PHASES:
            used += counted
        models.append({"name": name, "phase": status.phase.value, "measured_bytes": status.measured_bytes,
                       "estimated_bytes": status.estimated_bytes})
    return {
        "budget_bytes": budget,
        "budget": spec.budget,
        "reserve_bytes": spec.reserve_bytes(),
        "used_bytes": used,
        "free_bytes": max(budget - used, 0),
        "machine": {"total_bytes": vm.total, "available_bytes": vm.available, "used_bytes": vm.total - vm.available,
                    "percent": vm.percent},
        "models": models,
        # What the planner counts (measured bytes or `memory:` overrides, loads at their estimate).
        "planner": reconciler.observation()["memory"],
    }


@router.get("/status")
async def status(request: Request) -> JSONResponse:
    reconciler = _reconciler(request)
    snap, state = _current(request)
    memory = _memory(reconciler, state)
    body = {
        **_overview(reconciler, snap.etag),
        "memory": {k: v for k, v in memory.items() if k != "models"},
        "models": {name: s.phase.value for name, s in reconciler.statuses.items()},
    }
    return JSONResponse(body, headers={"ETag": snap.etag})


@router.get("/memory")
async def memory(request: Request) -> dict:
    _snap, state = _current(request)
    return _memory(_reconciler(request), state)


@router.get("/events")
async def events(request: Request, since: int = 0, limit: int = 200, follow: bool = False):
    """Recent events; `?follow=true` streams them as server-sent events (`id:` is the seq)."""
    reconciler = _reconciler(request)
    if not follow:
        return {"events": [e.model_dump(mode="json") for e in reconciler.events.since(since, limit)]}
    last_id = request.headers.get("last-event-id")
    if last_id and last_id.isdigit():
        since = int(last_id)
    return StreamingResponse(_follow(request, reconciler, since, limit), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _follow(request: Request, reconciler: Reconciler, since: int, limit: int):
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

    def put(event) -> None:
        if not queue.full():
            queue.put_nowait(event)

    def listener(event) -> None:
        loop.call_soon_threadsafe(put, event)

    reconciler.events.subscribe(listener)  # before the backlog, so nothing falls in between
    try:
        last = since
        for event in reconciler.events.since(since, limit):
            last = event.seq
            yield _sse(event)
        idle = 0.0
        while not getattr(request.app.state, "stopping", False):  # a shutdown ends the stream
            try:
                event = await asyncio.wait_for(queue.get(), 1.0)
            except asyncio.TimeoutError:
                idle += 1.0
                if idle >= 15.0:
                    idle = 0.0
                    if await request.is_disconnected():
                        return
                    yield b": keep-alive\n\n"
                continue
            idle = 0.0
            if event.seq > last:
                last = event.seq
                yield _sse(event)
    finally:
        reconciler.events.unsubscribe(listener)


def _sse(event) -> bytes:
    return f"id: {event.seq}\nevent: {event.reason}\ndata: {event.model_dump_json()}\n\n".encode()


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready once a valid desired state is in force and every model is in its desired phase."""
    reconciler = _reconciler(request)
    reasons = []
    if reconciler.desired is None:
        reasons.append("no valid models.yaml accepted yet")
    elif not reconciler.converged():
        pending = {n: s.phase.value for n, s in reconciler.statuses.items()
                   if reconciler.desired.model(n) is None
                   or s.phase != reconciler.desired_phase(reconciler.desired.model(n))}
        reasons.append(f"converging: {pending}" if pending else "converging")
    body = {"ready": not reasons, "generation": reconciler.generation,
            "observed_generation": reconciler.observed_generation, "reasons": reasons}
    return JSONResponse(body, status_code=200 if not reasons else 503)


"""The dashboard: a page at `/` that shows the loop live and edits models.yaml through the admin API.

The page itself is static (no build step, no CDN). This router serves it and adds the few
reads the admin API lacked: a preview of an edit as the diff that would be written, a worker's
log tail, and the gateway's in-flight and queued counts. Like the admin routes it never
imports the engine: a worker's log is found through the records in the state directory.
"""

from __future__ import annotations

import asyncio
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from opta_lmx.api.errors import APIError
from opta_lmx.state.document import ConfigError, parse_document
from opta_lmx.state.spec import DesiredModelState
from opta_lmx.api.admin.protocol import edit_error_status, etag_matches, json_object, read_body
from opta_lmx.state import worker_logs
from opta_lmx.state.render import render_edit
from opta_lmx.state.yamledit import EditError, describe_patch, merge_patch, models_of, require_model

page = APIRouter(include_in_schema=False)
reads = APIRouter(prefix="/admin")

_ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
MAX_LOG_LINES = 2000
# The page loads only its own files and talks only to this server; nothing may frame it.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("opta_lmx.api").joinpath("static", "dashboard", name).read_bytes()


@page.get("/")
async def index() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@page.get("/dashboard/{name}")
async def asset(name: str) -> Response:
    if name not in _ASSETS:
        raise APIError(404, f"no dashboard file named `{name}`", "not_found")
    return Response(_asset(name), media_type=_ASSETS[name] + "; charset=utf-8", headers=_PAGE_HEADERS)


# -- a preview of an edit: the diff it would write ------------------------------------------
def _patch_edit(name: str, patch: dict[str, Any]) -> Callable:
    """What PATCH /admin/models/{name} does to the tree, so the preview matches the write."""
    if patch.get("name", name) != name:
        raise APIError(422, "a model cannot be renamed by PATCH; DELETE it and PUT the new name",
                       "name_mismatch", param="name")

    def mutate(tree) -> str:
        merge_patch(require_model(tree, name), patch)
        return f"set {name}: {describe_patch(patch)}"
    return mutate


def _alias_edit(alias: str, target: str, unload_previous: bool) -> Callable:
    """Where POST /admin/models/swap {alias, to} ends: `to` loaded and holding the alias alone."""

    def mutate(tree) -> str:
        new = require_model(tree, target)
        merge_patch(new, {"state": DesiredModelState.LOADED.value})
        moved_from = []
        for entry in models_of(tree):
            if isinstance(entry, dict) and entry is not new and alias in (entry.get("aliases") or []):
                moved_from.append(entry["name"])
                merge_patch(entry, {"aliases": [a for a in entry["aliases"] if a != alias]})
                if unload_previous:
                    merge_patch(entry, {"state": DesiredModelState.UNLOADED.value})
        if alias not in (new.get("aliases") or []):
            merge_patch(new, {"aliases": [*(new.get("aliases") or []), alias]})
        return f"move alias {alias} to {target}" + (f" from {', '.join(moved_from)}" if moved_from else "")
    return mutate


def _preview_edit(body: dict[str, Any]) -> Callable:
    if isinstance(body.get("alias"), str):
        target = body.get("to")
        if not isinstance(target, str) or not target:
            raise APIError(400, "`to` is required with `alias`", "invalid_request", param="to")
        return _alias_edit(body["alias"], target, bool(body.get("unload_previous", False)))
    name, patch = body.get("model"), body.get("patch")
    if not isinstance(name, str) or not name or not isinstance(patch, dict):
        raise APIError(400, "give `model` and `patch` (a JSON merge patch), or `alias` and `to`",
                       "invalid_request", param="model")
    return _patch_edit(name, patch)


@reads.post("/preview")
async def preview(request: Request) -> JSONResponse:
    """The unified diff an edit would write to models.yaml, against the ETag it was computed on.

    Send the write with `If-Match: <etag>`: if the file changes meanwhile the write is refused
    (412), so what is written is exactly what was shown.
    """
    body = json_object(await read_body(request))  # bounded, and nested at most so deep (400/413)
    mutate = _preview_edit(body)
    snap = request.app.state.store.snapshot()
    if_match = request.headers.get("if-match")
    if if_match and not etag_matches(if_match, snap.etag):
        raise APIError(412, "models.yaml changed since you read it; preview again on the fresh file",
                       "etag_mismatch", headers={"ETag": snap.etag}, extra={"current_etag": snap.etag})
    try:
        current = request.app.state.store.editable_text(snap)  # a missing or blank file is refused, as the write is
        text, summary = await asyncio.to_thread(render_edit, current, mutate)
        await asyncio.to_thread(parse_document, text, str(request.app.state.store.path))
    except ConfigError as error:
        raise APIError(422, "the edit would make models.yaml invalid: " + "; ".join(map(str, error.problems)),
                       "invalid_desired_state", extra={"problems": error.to_dict()["problems"]}) from None
    except EditError as error:
        raise APIError(edit_error_status(error), error.message, error.code) from None
    except UnicodeDecodeError:
        raise APIError(409, "models.yaml is not UTF-8 text", "invalid_document") from None
    diff = "".join(difflib.unified_diff(snap.text.splitlines(True), text.splitlines(True),
                                        "models.yaml (current)", "models.yaml (after the edit)"))
    return JSONResponse({"diff": diff, "changed": text != snap.text, "summary": summary, "etag": snap.etag},
                        headers={"ETag": snap.etag})


# -- reads the page needs -------------------------------------------------------------------
@reads.get("/models/{name}/log")
async def worker_log(name: str, request: Request, lines: int = 200) -> PlainTextResponse:
    """The last `lines` lines of the model's current (else last) worker log."""
    lines = max(0, min(lines, MAX_LOG_LINES))
    where = getattr(request.app.state, "worker_logs", None)
    if where is None:
        raise APIError(404, "this server was started without a state directory, so it keeps no worker logs",
                       "log_not_found")
    _state_dir, log_dir = where
    path = await asyncio.to_thread(worker_logs.model_log_path, name, Path(log_dir))
    if path is None or not path.exists():
        raise APIError(404, f"no worker log for `{name}` yet (it has not been loaded)", "log_not_found")
    text = await asyncio.to_thread(_tail_text, path, lines)
    return PlainTextResponse(text, headers={"X-Log-Path": str(path), "Cache-Control": "no-store"})


def _tail_text(path: Path, lines: int) -> str:
    from io import StringIO

    out = StringIO()
    worker_logs.tail(path, lines, out)
    return out.getvalue()


@reads.get("/traffic")
async def traffic(request: Request) -> dict:
    """Per model: requests being answered and requests waiting (their one owner: the route table)."""
    routes = request.app.state.traffic
    models: dict[str, dict[str, int]] = {}
    for key, counts in (("in_flight", routes.in_flight_by_model()), ("queued", routes.waiters_by_model())):
        for model, count in counts.items():
            models.setdefault(model, {"in_flight": 0, "queued": 0})[key] = count
    return {"models": models}

"""The inference gateway: route by `model`, pass the body and the stream through.

Only the `model` field is read. A request that names a model by alias is re-encoded
with the canonical name (the worker knows only that one); all others go upstream byte
for byte, and responses stream back without buffering.
"""

from __future__ import annotations

import json
import logging

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from opta_lmx.api.errors import APIError
from opta_lmx.reconciler.controller import Reconciler

log = logging.getLogger(__name__)

router = APIRouter()

INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/embeddings",
)
# Hop-by-hop headers (RFC 9110 7.6.1) and ones the upstream request recomputes.
_DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}
_DROP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "server", "date"}


def _model_field(body: bytes) -> tuple[str, dict | None]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body must be a JSON object", "invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "`model` is required and must be a string", "missing_model", param="model")
    return model, payload


async def proxy(request: Request, path: str) -> StreamingResponse | JSONResponse:
    reconciler: Reconciler = request.app.state.reconciler
    client: httpx.AsyncClient = request.app.state.upstream
    settings = request.app.state.settings
    body = await request.body()
    requested, payload = _model_field(body)
    spec = reconciler.resolve(requested)
    if spec is None:
        raise APIError(404, f"The model `{requested}` does not exist", "model_not_found", param="model")
    if spec.name != requested:
        assert payload is not None
        payload["model"] = spec.name
        body = json.dumps(payload).encode()
    route = reconciler.route(spec.name)
    if route is None:
        if spec.state.value == "on-demand":
            reconciler.request_model(spec.name)  # demand is an observation; the loop decides
        if not reconciler.expects_ready(spec.name):
            raise _not_loaded(reconciler, spec.name)
        route = await reconciler.wait_route(spec.name, settings.load_wait_timeout)
        if route is None:
            if not reconciler.expects_ready(spec.name):
                raise _not_loaded(reconciler, spec.name)
            raise APIError(503, f"The model `{spec.name}` did not become ready within {settings.load_wait_timeout:.0f}s",
                           "model_loading", headers={"Retry-After": "5"})
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST and k.lower() != "authorization"]
    upstream_request = client.build_request(
        request.method, route.address + path, content=body, headers=headers, params=request.query_params
    )
    traffic = route.traffic
    traffic.begin()  # counted until the response ends, so a drain lets it finish
    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TransportError as error:
        traffic.end()
        raise APIError(502, f"the worker for `{spec.name}` did not answer: {error!r}", "worker_unavailable") from None
    except BaseException:
        traffic.end()
        raise
    response_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE}
    done = _Once(traffic.end)
    return StreamingResponse(
        _relay(upstream, spec.name, done),
        status_code=upstream.status_code,
        headers=response_headers,
        background=BackgroundTask(_close, upstream, done),
    )


def _not_loaded(reconciler: Reconciler, name: str) -> APIError:
    status = reconciler.statuses.get(name)
    why = f" ({status.phase.value}: {status.message or status.last_error})" if status else ""
    code = "model_unschedulable" if status and status.phase.value == "Unschedulable" else "model_not_loaded"
    return APIError(503, f"The model `{name}` is not loaded{why}", code, headers={"Retry-After": "30"})


class _Once:
    """Call `fn` once, however many of the ways a response can end reach it."""

    def __init__(self, fn):
        self._fn = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


async def _close(upstream: httpx.Response, done: _Once) -> None:
    try:
        await upstream.aclose()
    finally:
        done()


async def _relay(upstream: httpx.Response, name: str, done: _Once | None = None):
    """Yield the upstream body as it comes; if the worker dies mid-stream, end with an error event."""
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
        if done is not None:
            done()
    except httpx.HTTPError as error:
        log.warning("stream from %s broke: %r", name, error)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            message = json.dumps({"error": {"message": f"the worker for `{name}` failed mid-stream", "type": "api_error", "code": "worker_failed"}})
            yield f"data: {message}\n\ndata: [DONE]\n\n".encode()
    finally:
        if done is not None:
            done()


def _make_route(path: str):
    async def endpoint(request: Request):
        return await proxy(request, path)

    endpoint.__name__ = "proxy_" + path.strip("/").replace("/", "_")
    return endpoint


for _path in INFERENCE_PATHS:
    router.add_api_route(_path, _make_route(_path), methods=["POST"])


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Ready models, each with its aliases (also listed as entries of their own)."""
    reconciler: Reconciler = request.app.state.reconciler
    data = []
    if reconciler.desired is not None:
        for model in reconciler.desired.models:
            if reconciler.route(model.name) is None:
                continue
            status = reconciler.statuses.get(model.name)
            created = int(status.started_at) if status and status.started_at else 0
            data.append({"id": model.name, "object": "model", "created": created, "owned_by": "opta-lmx",
                         "aliases": list(model.aliases)})
            for alias in model.aliases:
                data.append({"id": alias, "object": "model", "created": created, "owned_by": "opta-lmx",
                             "alias_of": model.name})
    return {"object": "list", "data": data}

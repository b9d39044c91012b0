"""The inference gateway: route by `model`, pass the body and the stream through.

Only the `model` field is read (api/passthrough.py finds it: JSON body, upload form field or
query string). A request that names a model by alias is re-encoded with the canonical name
(the worker knows only that one); all others go upstream byte for byte, and responses stream
back without buffering. A request for a model that is still loading waits in a bounded
per-model queue, registered on the route table so the loop sees who waits (demand swapping; a
load nobody waits for is cancelled, and a waiting client that goes away is noticed within 0.5 s);
a worker that dies mid-stream ends the stream with an error event; a client that goes away
closes its upstream request.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from yarl import URL

from opta_lmx.api.bodies import read_bounded
from opta_lmx.api.errors import APIError
from opta_lmx.api.fleet import forward, forward_target, misdirected
from opta_lmx.api.metrics import GatewayMetrics
from opta_lmx.api.passthrough import (
    EXTRA_GET_PATHS,
    EXTRA_POST_PATHS,
    renamed,
    requested_model,
)
from opta_lmx.api.passthrough import router as passthrough_router
from opta_lmx.api.relay import (
    broken_stream_event,
    finish,
    is_event_stream,
    on_live_connection,
    response_headers,
)
from opta_lmx.api.request_gate import RequestGate
from opta_lmx.engine.worker_auth import upstream_headers, worker_key
from opta_lmx.reconciler.routes import Route
from opta_lmx.reconciler.view import GatewayView
from opta_lmx.state.spec import DesiredModelState

log = logging.getLogger(__name__)

T = TypeVar("T")

router = APIRouter()

INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/messages",
    "/v1/embeddings",
    *EXTRA_POST_PATHS,
)
_USAGE_CHUNKS = 8  # last chunks of a response kept to read its token usage at the end
_DISCONNECT_POLL = 0.5  # seconds between checks that a waiting request's client is still there
Disconnected = Callable[[], Awaitable[bool]]


def worker_headers(app_state, address: str, client_headers) -> list[tuple[str, str]]:
    """What a relayed request carries upstream: never the client's keys or cookies; the worker's own key."""
    secret = getattr(app_state, "worker_secret", None)
    return upstream_headers(client_headers, worker_key(secret, address) if secret else None)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes `limit`."""
    return await read_bounded(request, limit, message=f"the request body is larger than {limit} bytes",
                              code="body_too_large")


async def proxy(request: Request, path: str) -> StreamingResponse:
    app_state = request.app.state
    reconciler: GatewayView = app_state.reconciler
    metrics: GatewayMetrics = app_state.metrics
    arrived = time.perf_counter()
    body = await _read_body(request, app_state.settings.max_body_bytes)
    found = await requested_model(request, path, body)
    requested = found.name
    spec = reconciler.resolve(requested)
    if spec is None:
        raise APIError(404, f"The model `{requested}` does not exist", "model_not_found", param="model")
    name = spec.name
    query = request.url.query
    if name != requested:
        body, query = renamed(found, body, query, name)
    peer = forward_target(request, name)
    if peer is not None:  # another fleet host runs it: it answers, and queues through its swaps (docs/fleet.md)
        forwarded = await forward(request, peer, name, path, query, body)
        if forwarded is not None:
            return forwarded
    misdirected(request, name, reconciler.route(name) is not None)
    if from_a_foreign_page(request):  # `<img src=...>` on any page: it may use a resident model, never load one
        if reconciler.route(name) is None:
            raise APIError(403, f"a GET from another site cannot load `{name}` (no request a web page makes "
                                "without asking may have that effect); ask from the client itself",
                           "cross_site_load_refused")
    else:
        reconciler.note_request(name)
    admission: RequestGate = app_state.admission
    try:
        # Waiters register on the route table and poll their client (a load nobody waits for is
        # cancelled); a client that leaves while queued also stops waiting at once.
        acquiring = admission.acquire(name, spec.max_concurrency, request.is_disconnected)
        if not admission.free_now(name, spec.max_concurrency):  # it will wait: not past its client
            acquiring = _unless_client_leaves(request, acquiring, lambda r: admission.release(name, r))
        route = await acquiring
    except APIError as error:
        metrics.requests.labels(name, str(error.status)).inc()
        raise

    def send_to(to: Route) -> Awaitable[aiohttp.ClientResponse]:
        """The request, sent to `to`'s worker with its own key (again to the next one, see _send)."""
        sent, sent_query = renamed(found, body, query, to.served_as) if to.served_as else (body, query)
        url = URL(to.address + path + ("?" + sent_query if sent_query else ""), encoded=True)
        headers = worker_headers(app_state, to.address, request.headers.items())
        return _unless_client_leaves(  # a non-streaming answer's head comes only at its end
            request, on_live_connection(app_state.upstream, request.method, url, sent, headers), _close_response)

    try:
        try:
            upstream, route = await _send(admission, name, route, send_to)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise APIError(502, f"the worker for `{name}` did not answer: {error!r}", "worker_unavailable") from None
    except BaseException as error:
        await admission.release(name, route)
        client_left = isinstance(error, APIError) and error.status == 499
        metrics.requests.labels(name, "499" if client_left else "502").inc()
        raise
    metrics.requests.labels(name, str(upstream.status)).inc()
    return StreamingResponse(
        _relay(upstream, name, metrics, arrived, admission, route),
        status_code=upstream.status,
        headers=response_headers(upstream),
    )


async def _send(admission: RequestGate, name: str, route: Route,
                send_to: Callable[[Route], Awaitable[aiohttp.ClientResponse]]) -> tuple[aiohttp.ClientResponse, Route]:
    """Send upstream. A request that cannot have reached the worker (its process already exited,
    or it refused the connection: it died and the loop has not dropped its route yet) waits for
    the model's next route, bounded by the load-wait timeout, and is sent once more there, its
    count moved to that route. Returns the response and its route."""
    not_reached: Exception = aiohttp.ClientConnectionError(f"worker {route.worker_id} has exited")
    if admission.loop.worker_alive(route.worker_id):
        try:
            return await send_to(route), route
        except aiohttp.ClientConnectorError as error:  # connect failed: nothing was sent
            not_reached = error
    deadline = time.monotonic() + admission.wait_timeout
    while (remaining := deadline - time.monotonic()) > 0:
        new = admission.routes.get(name) or await admission.routes.wait(name, remaining)
        if new is None:
            break  # no longer expected (removed, failed) or the bound passed
        if new.worker_id != route.worker_id:
            admission.routes.moved(route, new)
            try:
                return await send_to(new), new
            except BaseException:
                admission.routes.moved(new, route)  # the caller releases the route it acquired
                raise
        await asyncio.sleep(0.05)  # the dead worker's route is still up: the loop has not noticed yet
    raise not_reached


def from_a_foreign_page(request: Request) -> bool:
    """A simple GET (or HEAD) a browser made for another site's page: no Origin is sent with those
    (an `<img>`), but `Sec-Fetch-Site` is, by every current browser. Clients (SDKs, curl, the
    dashboard itself: same-origin) send none or `same-origin`/`none`."""
    return request.method in ("GET", "HEAD") and request.headers.get("sec-fetch-site", "").lower() in (
        "cross-site", "same-site")


async def _relay(upstream: aiohttp.ClientResponse, name: str, metrics: GatewayMetrics, arrived: float, admission: RequestGate,
                 route: Route):
    """Yield the upstream body as it comes.

    If the worker dies mid-stream, an SSE stream ends with an error event and `[DONE]`. If
    the client goes away, this generator is cancelled and the upstream request is closed,
    so the worker stops generating for it.
    """
    first = True
    complete = False
    tail: collections.deque[bytes] = collections.deque(maxlen=_USAGE_CHUNKS)
    is_sse = is_event_stream(upstream)
    try:
        async for chunk in upstream.content.iter_any():
            if first:
                metrics.ttft.labels(name).observe(time.perf_counter() - arrived)
                first = False
            tail.append(chunk)
            yield chunk
        complete = True
        _count_tokens(b"".join(tail), is_sse, name, metrics)
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        log.warning("response from %s broke off: %r", name, error)
        metrics.requests.labels(name, "worker_failed").inc()
        if is_sse:
            yield broken_stream_event(f"the worker for `{name}` failed mid-stream", "worker_failed")
    finally:
        with anyio.CancelScope(shield=True):
            finish(upstream, complete)
            await admission.release(name, route)
        metrics.duration.labels(name).observe(time.perf_counter() - arrived)


def _count_tokens(tail: bytes, is_sse: bool, name: str, metrics: GatewayMetrics) -> None:
    """Add the usage a worker reported (last JSON object or SSE event carrying `usage`).

    Runs after the body was sent: whatever `usage` holds (a string, a negative or huge number,
    a list), it is counted or skipped, never raised, so a response is never cut off by it.
    """
    candidates = tail.split(b"\n\n") if is_sse else [tail]
    for piece in reversed(candidates):
        text = piece.strip().removeprefix(b"data:").strip()
        if b'"usage"' not in text:
            continue
        try:
            payload = json.loads(text)
        except (ValueError, RecursionError):
            continue
        usage = payload.get("usage") if isinstance(payload, dict) else None
        if not isinstance(usage, dict):
            return
        prompt = _token_count(usage.get("prompt_tokens", usage.get("input_tokens")))
        completion = _token_count(usage.get("completion_tokens", usage.get("output_tokens")))
        metrics.prompt_tokens.labels(name).inc(prompt)
        metrics.completion_tokens.labels(name).inc(completion)
        return


def _token_count(value: object) -> int:
    """A token count as reported, if it is a plausible one (a non-negative int below 2**53), else 0."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        return 0
    return value


async def _close_response(response: aiohttp.ClientResponse) -> None:
    response.close()


async def _client_disconnected(request: Request) -> None:
    """Return once the client has gone (the body is already read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T], undo: Callable[[T], Awaitable[None]]) -> T:
    """Await `work`, unless the client disconnects first: then cancel it and answer 499.

    Starlette does not cancel a handler whose client left, so a request queued for a loading
    model would keep its place and a non-streaming one (whose head arrives with its end) would
    keep the worker generating. Cancelling `work` leaves the queue or closes the upstream
    connection (vllm-mlx aborts a request whose connection closed); `undo` gives back a result
    that arrived anyway.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
        gone = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        if not gone:
            return await task  # done, or the watcher failed (no disconnect to learn of): just wait
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    outcome = (await asyncio.gather(task, return_exceptions=True))[0]
    if not isinstance(outcome, BaseException):
        await undo(outcome)
    raise APIError(499, "the client closed the request", "client_closed")


def _make_route(path: str):
    async def endpoint(request: Request):
        return await proxy(request, path)

    endpoint.__name__ = "proxy_" + path.strip("/").replace("/", "_")
    return endpoint


for _path in INFERENCE_PATHS:
    router.add_api_route(_path, _make_route(_path), methods=["POST"])
for _path in EXTRA_GET_PATHS:
    router.add_api_route(_path, _make_route(_path), methods=["GET"])
router.include_router(passthrough_router)


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Every model a client may ask for: desired loaded and on-demand ones (resident or not), each
    with its desired state, phase and aliases (aliases are also entries of their own); models
    desired `unloaded` are not listed. The OpenAI list shape, with extra fields."""
    reconciler: GatewayView = request.app.state.reconciler
    fleet = reconciler.fleet
    data = []
    if reconciler.desired is not None:
        for model in reconciler.desired.models:
            if model.state == DesiredModelState.UNLOADED:
                continue
            status = reconciler.statuses.get(model.name)
            created = int(status.started_at) if status and status.started_at else 0
            extra = {"state": model.state.value, "status": status.phase.value if status else "Pending",
                     "resident": reconciler.routes.get(model.name) is not None}
            if fleet is not None:  # the fleet's models, each with the host that runs it
                extra |= fleet.listing(model.name, extra["status"], extra["resident"])
            data.append({"id": model.name, "object": "model", "created": created, "owned_by": "opta-lmx",
                         "aliases": list(model.aliases), **extra})
            for alias in model.aliases:
                data.append({"id": alias, "object": "model", "created": created, "owned_by": "opta-lmx",
                             "alias_of": model.name, **extra})
    return {"object": "list", "data": data}

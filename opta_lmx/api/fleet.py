"""The fleet's HTTP side (docs/fleet.md): what a host tells its peers, and requests forwarded to
the host that runs their model, streamed, cancelled with their client, marked so they are never
forwarded twice. Peers authenticate with the fleet key (api/auth.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from yarl import URL

from opta_lmx.api.errors import APIError
from opta_lmx.api.relay import (
    broken_stream_event,
    finish,
    is_event_stream,
    on_live_connection,
    response_headers,
)
from opta_lmx.engine.worker_auth import upstream_headers
from opta_lmx.reconciler.fleet import FLEET_KEY_HEADER, HOP_HEADER, Fleet

log = logging.getLogger(__name__)
router = APIRouter()


def fleet_of(request: Request) -> Fleet | None:
    return getattr(request.app.state.reconciler, "fleet", None)


@router.get("/fleet/status")
async def fleet_status(request: Request) -> dict:
    """For peers (fleet key only): this host's name and each model's phase here."""
    fleet = fleet_of(request)
    if fleet is None:
        raise APIError(404, "this server is not a fleet host (lmx serve --fleet-host NAME)", "not_found")
    statuses = request.app.state.reconciler.statuses
    return {"host": fleet.me, "time": time.time(),
            "models": {name: status.phase.value for name, status in statuses.items()}}


@router.get("/admin/fleet")
async def fleet_view(request: Request) -> dict:
    """This host's view of the fleet: its peers (up, last answer, their models) and each model's placement."""
    fleet = fleet_of(request)
    if fleet is None:
        raise APIError(404, "this server is not a fleet host (lmx serve --fleet-host NAME)", "not_found")
    return fleet.to_dict()


def forward_target(request: Request, name: str) -> tuple[str, str] | None:
    """The peer that should answer this request for model `name`, or None to answer here. A request
    another host forwarded (it carries the hop marker) is answered here, whatever this host thinks."""
    fleet = fleet_of(request)
    if fleet is None or HOP_HEADER in request.headers:
        return None
    return fleet.target(name)


def misdirected(request: Request, name: str, routed: bool) -> None:
    """A request another host forwarded for a model this host does not run (any more, or not yet:
    the hosts' views of each other are up to a poll apart): 421, so the sender asks again."""
    fleet = fleet_of(request)
    if fleet is None or HOP_HEADER not in request.headers or routed:
        return
    placement = fleet.placements.get(name)
    if placement is not None and not placement.here:
        raise APIError(421, f"`{name}` does not run on {fleet.me} now ({placement.reason})", "misdirected")


async def forward(request: Request, target: tuple[str, str], name: str, path: str, query: str,
                  body: bytes) -> StreamingResponse | None:
    """Send the request to peer `target` and stream its answer back; the client leaving closes it.

    While the hosts' views of each other settle (a model moving, a host just gone), a peer that
    answers 421 (not there) or cannot be connected to (nothing was sent) is asked again after the
    peers are polled anew, bounded by the load-wait timeout, like a request waiting for a swap.
    None: the model now runs here, serve it locally."""
    app_state = request.app.state
    fleet = fleet_of(request)
    assert fleet is not None
    metrics = app_state.metrics
    deadline = time.monotonic() + app_state.settings.load_wait_timeout
    headers = upstream_headers(request.headers.items(), None)  # never the client's own key
    headers += [(FLEET_KEY_HEADER, fleet.key or ""), (HOP_HEADER, fleet.me)]
    while True:
        peer, base = target
        url = URL(base + path + ("?" + query if query else ""), encoded=True)
        try:
            upstream = await on_live_connection(app_state.upstream, request.method, url, body, headers)
        except aiohttp.ClientConnectorError as error:  # not connected: nothing was sent, ask again
            upstream, why = None, repr(error)
        except (TimeoutError, aiohttp.ClientError) as error:
            metrics.requests.labels(name, "502").inc()
            fleet.wake()
            raise APIError(502, f"fleet host {peer} ({base}), which runs `{name}`, did not answer: {error!r}",
                           "peer_unavailable") from None
        if upstream is not None and upstream.status != 421:
            break
        if upstream is not None:
            why = f"{peer} answered 421"
            upstream.release()
        if time.monotonic() > deadline:
            metrics.requests.labels(name, "502").inc()
            raise APIError(502, f"no fleet host took `{name}` within {app_state.settings.load_wait_timeout:.0f}s "
                                f"(last: {why})", "peer_unavailable")
        fleet.wake()  # ask the peers again now
        await asyncio.sleep(0.25)
        if await request.is_disconnected():
            raise APIError(499, "the client went away", "client_closed")
        found = fleet.target(name)
        if found is None:
            return None
        target = found
    metrics.requests.labels(name, str(upstream.status)).inc()
    metrics.forwarded.labels(name, peer).inc()
    headers_back = response_headers(upstream) | {"x-lmx-host": peer}
    return StreamingResponse(_relay(upstream, name, peer), status_code=upstream.status, headers=headers_back)


async def _relay(upstream: aiohttp.ClientResponse, name: str, peer: str):
    complete = False
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
        complete = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        log.warning("the answer for %s from fleet host %s broke off: %r", name, peer, error)
        if is_event_stream(upstream):
            yield broken_stream_event(f"fleet host {peer}, which serves `{name}`, failed mid-stream", "peer_failed")
    finally:
        finish(upstream, complete)  # an unfinished one is dropped: the peer sees its client leave

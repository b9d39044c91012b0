"""What every relayed answer shares, whether it comes from a local worker (api/gateway.py) or from
the fleet host that runs the model (api/fleet.py): the connection it is sent on, the headers that
pass back, the error event a broken stream ends with, and what becomes of the connection after."""

from __future__ import annotations

import json
import logging

import aiohttp
from yarl import URL

log = logging.getLogger(__name__)

STALE_CONNECTION_RETRIES = 2  # fresh connections tried when pooled ones turn out closed upstream
# Hop-by-hop response headers (RFC 9110 7.6.1) and ones the relay recomputes; the request's are
# dropped by engine/worker_auth.upstream_headers, which also strips the client's credentials.
DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
                           "server", "date"})


async def on_live_connection(session: aiohttp.ClientSession, method: str, url: URL, body: bytes,
                             headers: list[tuple[str, str]]) -> aiohttp.ClientResponse:
    """Send, and send again on another connection when the pooled one turns out closed upstream
    before it answered anything (aiohttp's ServerDisconnectedError: the other side had closed the
    idle connection, so it never read this request). Any other error may have reached it: it is
    the caller's (a 502, or the next route when nothing was sent at all)."""
    for attempt in range(STALE_CONNECTION_RETRIES + 1):
        try:
            return await session.request(method, url, data=body, headers=headers)
        except aiohttp.ServerDisconnectedError:
            if attempt == STALE_CONNECTION_RETRIES:
                raise
            log.info("a pooled connection to %s was closed upstream; sending on a new one", url.host)
    raise AssertionError("unreachable")


def response_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in DROP_RESPONSE}


def is_event_stream(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.headers.get("content-type", "").startswith("text/event-stream")


def broken_stream_event(message: str, code: str) -> bytes:
    """How an SSE answer that broke off mid-stream ends: an OpenAI-shaped error, then [DONE]."""
    error = json.dumps({"error": {"message": message, "type": "api_error", "param": None, "code": code}})
    return f"data: {error}\n\ndata: [DONE]\n\n".encode()


def finish(upstream: aiohttp.ClientResponse, complete: bool) -> None:
    """Back to the pool only a complete answer below 500: a side that failed (5xx) may close the
    connection after its answer, and a pooled dead connection would fail the next client's
    request; an unfinished one is dropped so that generation upstream stops."""
    if complete and upstream.status < 500:
        upstream.release()
    else:
        upstream.close()

"""A bounded HTTP server: what one slow or hostile client may cost the whole server.

uvicorn's httptools protocol has no limit on the size or number of request headers and no
deadline for a request's head or body: one endless header line grew the process by hundreds
of megabytes, and a few hundred idle connections used up the file descriptors (EMFILE then
killed the control loop). This protocol adds those limits (as vLLM did for its server) and
caps open connections below the file-descriptor limit, which `raise_fd_limit` lifts first.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

FD_TARGET = 10240  # macOS refuses a soft limit above OPEN_MAX (10240) even if the hard one is unlimited
FDS_PER_CONNECTION = 2  # a client connection, plus the gateway's connection to a worker
FDS_RESERVED = 128  # worker logs, pipes, the state directory, the file watcher


@dataclass(frozen=True)
class ServerLimits:
    max_head_bytes: int = 64 * 1024  # request line and headers together
    max_headers: int = 100
    head_timeout: float = 15.0  # from a connection's first byte (or its opening) to the end of its head
    body_timeout: float = 120.0  # from the end of the head to the end of the body
    max_connections: int | None = None  # None: derived from the file-descriptor limit


def raise_fd_limit(target: int = FD_TARGET) -> int:
    """Raise the soft RLIMIT_NOFILE towards `target` where allowed (launchd gives 256); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, wanted, error)
    return soft


def connection_cap(soft_fd_limit: int) -> int:
    """Open connections the server allows so that it never runs out of file descriptors."""
    return max(8, (soft_fd_limit - FDS_RESERVED) // FDS_PER_CONNECTION)


def _response(status: bytes, message: str) -> bytes:
    body = ('{"error": {"message": "%s", "type": "invalid_request_error", "param": null, "code": null}}'
            % message).encode()
    return (b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size, header count, deadline and connection limits."""

    limits = ServerLimits()
    max_connections = 1000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._header_count = 0
        self._in_head = False
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse(b"503 Service Unavailable", "too many open connections")
            return
        self._arm(self.limits.head_timeout, b"408 Request Timeout", "the request head took too long")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if not self._in_head and self._timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm(self.limits.head_timeout, b"408 Request Timeout", "the request head took too long")
        super().data_received(data)
        if self._in_head and not self._refused:
            self._head_bytes += len(data)  # bytes of a head still not complete: bounded
            if self._head_bytes > self.limits.max_head_bytes:
                self._refuse(b"431 Request Header Fields Too Large", "the request head is too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes, self._header_count = True, 0, 0

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._refused:
            return
        if self._header_count > self.limits.max_headers:
            self._refuse(b"431 Request Header Fields Too Large", "too many request headers")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._refused:
            return
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            self._refuse(b"431 Request Header Fields Too Large", "the request head is too large")
            return
        self._disarm()
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.more_body and self._expects_body():
            self._arm(self.limits.body_timeout, b"408 Request Timeout", "the request body took too long")

    def _expects_body(self) -> bool:
        names = {name for name, _ in self.headers}
        return b"transfer-encoding" in names or any(
            name == b"content-length" and value.strip() not in (b"", b"0") for name, value in self.headers)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    # -- deadlines ------------------------------------------------------------------------
    def _arm(self, seconds: float, status: bytes, message: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, status, message)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, status: bytes, message: str) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        log.info("closing a connection from %s: %s", self.client, message)
        self._refuse(status, message)

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer (unless a response already started) and close the connection."""
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        started = self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete
        if not started and not self.transport.is_closing():
            self.transport.write(_response(status, message))
        self.transport.close()


def bounded_protocol(limits: ServerLimits, max_connections: int) -> type[BoundedHttpToolsProtocol]:
    """The protocol class with these limits bound (uvicorn builds one instance per connection)."""
    return type("BoundedHttpProtocol", (BoundedHttpToolsProtocol,),
                {"limits": limits, "max_connections": max_connections})


def bounded_server_options(limits: ServerLimits = ServerLimits()) -> dict[str, Any]:
    """Keyword arguments for `uvicorn.Config`: the bounded protocol and the matching limits.

    Raises the file-descriptor limit first. `proxy_headers` is off: nothing here trusts
    X-Forwarded-For (docs/security.md).
    """
    cap = limits.max_connections or connection_cap(raise_fd_limit())
    return {
        "http": bounded_protocol(limits, cap),
        "limit_concurrency": cap,  # uvicorn answers 503 beyond it, before the application
        "proxy_headers": False,
        "server_header": False,
        "timeout_keep_alive": 5,
    }

"""The browser-facing edge: what a web page the user visits must not be able to do.

A server on loopback is reachable from every page in the user's browser. Three checks run
before any handler (docs/security.md): the `Host` header must name this server (DNS
rebinding), a foreign `Origin` is refused (cross-site requests), and write requests must
carry their documented JSON or YAML content type, which no page can send cross-site without
a CORS preflight that this server never grants unless configured. Admin bodies are bounded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from opta_lmx.api.errors import error_body

MAX_ADMIN_BODY_BYTES = 1024 * 1024  # models.yaml itself is at most 256 KiB
_JSON = frozenset({"application/json"})
_MERGE_PATCH = frozenset({"application/merge-patch+json", "application/json"})
_YAML = frozenset({"application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml"})
_WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


def _host_port(value: str) -> tuple[str, str | None]:
    """A `Host` header as (name, port), lower-cased: `[::1]:8000` -> (`::1`, `8000`)."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        rest = value[end + 1:]
        return value[1:end], rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        name, port = value.split(":")
        return name, port
    return value, None


def _split_host(value: str) -> str:
    return _host_port(value)[0]


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def allowed_host_names(bind_host: str | None, extra: Iterable[str] = ()) -> frozenset[str]:
    """Names a `Host` header may carry: loopback names, the bind address, and the user's own."""
    names = set(_LOOPBACK_NAMES)
    names.update(_split_host(name) for name in extra if name.strip())
    if bind_host:
        names.add(_split_host(bind_host))
        if bind_host in ("0.0.0.0", "::", ""):  # every interface: the machine's own names too
            hostname = socket.gethostname().lower()
            names.update({hostname, hostname.split(".")[0] + ".local"})
    return frozenset(names)


def host_allowed(host: str, names: frozenset[str]) -> bool:
    """IP literals cannot be rebound, `*.localhost` is loopback by RFC 6761; other names must be listed."""
    name = _split_host(host).rstrip(".")
    return bool(name) and (name in names or _is_ip(name) or name.endswith(".localhost"))


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an Origin, normalised, or None if it is not one ("null" included)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
        return None
    return parts.scheme, parts.hostname.lower(), port


def _same_origin(origin: tuple[str, str, int] | None, host: str | None, scheme: str) -> bool:
    """Whether a page at `origin` is this server as the request's scheme and `Host` name it."""
    if origin is None or host is None or origin[0] != scheme:
        return False
    name, port = _host_port(host)
    try:
        host_port = int(port) if port else {"http": 80, "https": 443}[origin[0]]
    except ValueError:
        return False
    return origin[1] == name and origin[2] == host_port


def _expected_types(method: str, path: str) -> frozenset[str] | None:
    """The content types a write to `path` documents, or None if the path takes no such body."""
    if method not in _WRITE_METHODS:
        return None
    if path == "/admin/desired" and method == "PUT":
        return _YAML
    if path == "/admin" or path.startswith("/admin/"):
        return _MERGE_PATCH if method == "PATCH" else _JSON
    if path.startswith("/v1/"):
        return _JSON
    return None


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware (not BaseHTTPMiddleware, so streams pass through untouched)."""

    def __init__(self, app, *, host_names: frozenset[str], cors_origins: Iterable[str] = (),
                 max_admin_body: int = MAX_ADMIN_BODY_BYTES):
        self.app = app
        self.host_names = host_names
        self.cors_origins = frozenset(k for k in (_origin_key(o) for o in cors_origins) if k)
        self.max_admin_body = max_admin_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for key, value in scope["headers"]:
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await _send_error(send, *refusal)
        path = scope["path"]
        if path == "/admin" or path.startswith("/admin/"):
            return await self._bounded(scope, receive, send, headers)
        return await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, str] | None:
        host = headers.get("host")
        if host is not None and not host_allowed(host, self.host_names):
            return 403, (f"the Host header {host[:100]!r} does not name this server; allow the name with "
                         "LMX_ALLOWED_HOSTS (see docs/security.md)"), "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None:
            key = _origin_key(origin)
            if not _same_origin(key, host, scope.get("scheme", "http")) and key not in self.cors_origins:
                return 403, (f"cross-origin requests from {origin[:100]!r} are refused; allow the origin with "
                             "LMX_CORS_ORIGINS (see docs/security.md)"), "origin_not_allowed"
        expected = _expected_types(scope["method"], scope["path"])
        if expected is not None:
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media not in expected:
                return 415, (f"{scope['method']} {scope['path']} takes a body of type "
                             f"{' or '.join(sorted(expected))}, not {media or 'none'!r}"), "unsupported_media_type"
        return None

    async def _bounded(self, scope, receive, send, headers: dict[str, str]):
        """Admin requests: refuse bodies over the limit, by Content-Length or as they arrive."""
        limit = self.max_admin_body
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            declared = 0
        if declared > limit:
            return await _send_error(send, 413, f"admin request bodies are at most {limit} bytes", "body_too_large")
        received = 0
        started = False

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await _send_error(send, 413, f"admin request bodies are at most {limit} bytes", "body_too_large")


async def _send_error(send, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _from_env(variable: str) -> list[str]:
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def install_request_guard(app, *, bind_host: str | None = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                          cors_origins: Iterable[str] = (), max_admin_body: int = MAX_ADMIN_BODY_BYTES) -> None:
    """Add the guard (outermost) and, only if origins are configured, CORS for exactly those."""
    origins = [*cors_origins, *_from_env("LMX_CORS_ORIGINS")]
    if origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    names = allowed_host_names(bind_host, [*allowed_hosts, *_from_env("LMX_ALLOWED_HOSTS")])
    app.add_middleware(RequestGuard, host_names=names, cors_origins=origins, max_admin_body=max_admin_body)

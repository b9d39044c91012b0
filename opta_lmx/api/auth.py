"""API keys: an admin key for /admin/*, an inference key for /v1/*.

Keys come from the environment (`LMX_ADMIN_KEY`, `LMX_API_KEY`) or from files named there
(`LMX_ADMIN_KEY_FILE`, `LMX_API_KEY_FILE`), never from models.yaml, which lives in git. Both are
optional on loopback; a server listening anywhere else must have both, or it refuses to start.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass

from opta_lmx import settings
from opta_lmx.api.errors import error_body
from opta_lmx.reconciler.fleet import FLEET_KEY_HEADER, HOP_HEADER


class KeyConfigError(Exception):
    """The keys are missing or unreadable where they are required."""


@dataclass(frozen=True)
class Keys:
    admin: str | None = None
    inference: str | None = None
    fleet: str | None = None  # what the fleet's hosts present to each other (docs/fleet.md)

    def fleet_ok(self, presented: str | None) -> bool:
        """Only the fleet key, and never when none is set: a host without one takes no fleet call."""
        return self.fleet is not None and _equal(presented, self.fleet)

    def admin_ok(self, presented: str | None) -> bool:
        return self.admin is None or _equal(presented, self.admin)

    def inference_ok(self, presented: str | None) -> bool:
        """The inference key, or the admin key (which may do everything)."""
        if self.inference is None:
            return True
        return _equal(presented, self.inference) or (self.admin is not None and _equal(presented, self.admin))


def _equal(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def load_keys(environ: Mapping[str, str] | None = None) -> Keys:
    """The keys from the settings (or from `environ`, for tests)."""
    config = settings.current() if environ is None else settings.Settings.from_env(environ)
    try:
        return Keys(admin=config.admin_secret(), inference=config.api_secret(), fleet=config.fleet_secret())
    except settings.SecretFileError as error:
        raise KeyConfigError(str(error)) from None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, keys: Keys) -> None:
    """Refuse to expose the server beyond this machine without both keys."""
    if is_loopback(host):
        return
    missing = [name for name, key in (("LMX_ADMIN_KEY", keys.admin), ("LMX_API_KEY", keys.inference)) if not key]
    if missing:
        raise KeyConfigError(
            f"refusing to listen on {host}, which is not a loopback address, without "
            f"{' and '.join(missing)} (set them in the environment, or name files holding them "
            f"with {' / '.join(m + '_FILE' for m in missing)})"
        )


def presented_keys(headers: dict[str, str]) -> list[str]:
    keys = []
    authorization = headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        keys.append(authorization[7:].strip())
    if headers.get("x-admin-key"):
        keys.append(headers["x-admin-key"].strip())
    if headers.get("x-api-key"):  # Anthropic clients send their key this way
        keys.append(headers["x-api-key"].strip())
    return keys


# FastAPI's API pages describe the admin API: with keys set, they are admin pages too.
_DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# With keys set: /metrics names every model and its traffic, so it needs a key (the API key or the
# admin key, as a Prometheus scraper is configured); /health and /readyz answer anyone, but only
# up/down and ready or not without a key (probes need no secret); /healthz stays a bare liveness.
_KEYED_OPERATIONS = frozenset({"/metrics"})
_DETAILED_PROBES = frozenset({"/health", "/readyz"})


class KeyAuth:
    """ASGI middleware (not BaseHTTPMiddleware, so streams pass through untouched)."""

    def __init__(self, app, keys: Keys):
        self.app = app
        self.keys = keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path.startswith("/fleet/") or HOP_HEADER in headers:  # a peer's call: the fleet key and nothing else
            if self.keys.fleet_ok(headers.get(FLEET_KEY_HEADER)):
                return await self.app(scope, receive, send)
            return await _refuse(send, "a fleet call (a peer's status, a forwarded request) needs this fleet's "
                                       f"key in `{FLEET_KEY_HEADER}`")
        if self.keys.admin is None and self.keys.inference is None:
            return await self.app(scope, receive, send)
        presented = presented_keys(headers) or [None]
        if path in _DETAILED_PROBES:  # answered to anyone; the details only with a key
            scope.setdefault("state", {})["lmx_authenticated"] = any(self.keys.inference_ok(k) for k in presented)
            return await self.app(scope, receive, send)
        if path == "/admin" or path.startswith("/admin/") or path in _DOCS_PATHS:
            check, which = self.keys.admin_ok, "admin"
        elif path.startswith("/v1/") or path in _KEYED_OPERATIONS:
            check, which = self.keys.inference_ok, "API"
        else:
            return await self.app(scope, receive, send)
        if any(check(key) for key in presented):
            return await self.app(scope, receive, send)
        message = (
            f"a valid {which} key is required: send `Authorization: Bearer <key>`"
            + (" or `X-Admin-Key: <key>`" if which == "admin" else "")
        )
        await _refuse(send, message)


async def _refuse(send, message: str) -> None:
    body = json.dumps(error_body(401, message, "invalid_api_key")).encode()
    await send({
        "type": "http.response.start", "status": 401,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="opta-lmx"')],
    })
    await send({"type": "http.response.body", "body": body})

"""The one client of the admin API that every `lmx` command uses (including `lmx plan`).

It speaks only HTTP to a running server, so the same commands work against a remote machine.
Server and key come from the flags, else from the settings (`LMX_SERVER`, `LMX_ADMIN_KEY` or
`LMX_ADMIN_KEY_FILE`, as the server reads them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import httpx

from opta_lmx import settings


class ClientError(Exception):
    """A command cannot go on (server unreachable, or it answered an error); the message says why."""


class AdminClient:
    """HTTP to one server's /admin API, with the admin key on every request."""

    def __init__(self, server: str, key: str | None = None, timeout: float = 3600.0):
        self.server = server.rstrip("/")
        self.key = key
        self.timeout = timeout

    @classmethod
    def from_settings(cls, server: str | None = None, key: str | None = None, timeout: float = 3600.0,
                      config: settings.Settings | None = None) -> AdminClient:
        """Flags first, then the settings; an unreadable LMX_ADMIN_KEY_FILE is a ClientError."""
        config = config or settings.current()
        try:
            key = key or config.admin_secret()
        except settings.SecretFileError as error:
            raise ClientError(str(error)) from None
        return cls(server or config.server_url, key, timeout)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def _http(self) -> httpx.Client:
        return httpx.Client(base_url=self.server, headers=self.headers(), timeout=self.timeout)

    def request(self, method: str, path: str, *, accept: tuple[int, ...] = (502, 504), **kwargs: Any) -> httpx.Response:
        """One call; an error status other than those in `accept` raises ClientError with its message."""
        try:
            with self._http() as client:
                response = client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise ClientError(f"cannot reach {self.server}: {error}") from None
        if response.status_code >= 400 and response.status_code not in accept:
            raise ClientError(error_text(response))
        return response

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    @contextlib.contextmanager
    def stream_lines(self, path: str, params: dict[str, Any]) -> Iterator[Iterator[str]]:
        """A long-lived response's lines (server-sent events), with no read timeout."""
        try:
            with self._http() as client, client.stream("GET", path, params=params,
                                                      timeout=httpx.Timeout(None, connect=10)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(error_text(response))
                yield response.iter_lines()
        except httpx.HTTPError as error:
            raise ClientError(f"event stream from {self.server} ended: {error}") from None


def error_text(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    lines = [f"HTTP {response.status_code}: {error.get('message', response.text[:500])}"]
    for problem in error.get("problems", [])[1:]:
        lines.append(f"  {problem.get('path')}: {problem.get('message')}")
    return "\n".join(lines)

"""The admin API's wire: request bodies as pydantic models, If-Match, and HTTP status codes.

The state layer knows nothing of HTTP; this module turns headers into store preconditions and
store errors into statuses, so the router and the service speak in these terms only.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from pydantic import BaseModel, ConfigDict

from opta_lmx.api.errors import APIError
from opta_lmx.state.document import ConfigError
from opta_lmx.state.store import Precondition
from opta_lmx.state.yamledit import EditError

DEFAULT_WAIT = 300.0  # seconds an imperative call (load/unload/swap) waits by default
DEFAULT_WRITE_WAIT = 120.0  # seconds `?wait=ready` waits on a plain edit
MAX_WAIT = 3600.0
MAX_BODY_BYTES = 1024 * 1024  # an admin body (a models.yaml, a patch) is a few kilobytes
MAX_JSON_DEPTH = 32  # nesting of a JSON body; a spec is at most four levels deep

# What each kind of EditError means to an HTTP client.
EDIT_ERROR_STATUS = {
    "invalid_edit": 400,
    "model_not_found": 404,
    "invalid_document": 409,
    "document_missing": 409,
    "document_unreadable": 409,
    "model_exists": 409,
    "write_failed": 500,
}


def edit_error_status(error: EditError) -> int:
    return EDIT_ERROR_STATUS.get(error.code, 400)


def etag_matches(if_match: str, etag: str) -> bool:
    """RFC 9110 If-Match: `*` or any listed tag (weak prefixes ignored)."""
    for candidate in if_match.split(","):
        candidate = candidate.strip()
        if candidate == "*":
            return True
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if not candidate.startswith('"'):
            candidate = f'"{candidate}"'
        if candidate == etag:
            return True
    return False


def if_match_precondition(if_match: str | None) -> Precondition | None:
    """The store precondition an `If-Match` header asks for (None: no header, no guard)."""
    if if_match is None:
        return None
    return lambda current: etag_matches(if_match, current)


def invalid_state(error: ConfigError) -> APIError:
    """422 naming every problem of a document that would be invalid."""
    first = error.problems[0] if error.problems else None
    message = "the edit would make models.yaml invalid; nothing was written: " + "; ".join(
        str(p) for p in error.problems
    )
    return APIError(
        422, message, "invalid_desired_state", param=first.path if first else None,
        extra={"problems": error.to_dict()["problems"]},
    )


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refused with 413 past `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body is larger than the admin API's limit of {limit} bytes",
                         "request_too_large")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(value: Any) -> int:
    """How deeply `value` nests (iteratively: the point is to refuse what recursion cannot take)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return deepest


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (400 otherwise), nested at most MAX_JSON_DEPTH deep."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, RecursionError):
        raise APIError(400, "the request body must be a JSON object", "invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    if json_depth(body) > MAX_JSON_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "invalid_json")
    return body


class _Body(BaseModel):
    """Fields typed loosely on purpose: a value of the wrong type gets the same clear 400 (naming
    the parameter) as a missing one, as the API has always answered, not pydantic's 422."""

    model_config = ConfigDict(extra="allow")


class SetStateRequest(_Body):
    """POST /admin/models/load|unload: `{"model_id"}` (or `model`), optional `timeout`."""

    model_id: Any = None
    model: Any = None
    timeout: Any = None

    def target(self) -> str:
        value = self.model_id or self.model
        if not isinstance(value, str) or not value:
            raise APIError(400, "`model_id` is required", "invalid_request", param="model_id")
        return value


class SwapRequest(_Body):
    """POST /admin/models/swap: `{"from", "to"}` or `{"alias", "to", "unload_previous"}`."""

    to: Any = None
    from_: Any = None
    alias: Any = None
    unload_previous: Any = False
    timeout: Any = None

    @classmethod
    def parse(cls, body: dict[str, Any]) -> SwapRequest:
        request = cls.model_validate({**{k: v for k, v in body.items() if k != "from"}, "from_": body.get("from")})
        if not isinstance(request.to, str) or not request.to:
            raise APIError(400, "`to` is required", "invalid_request", param="to")
        return request

    def source(self) -> str | None:
        return self.from_ if isinstance(self.from_, str) else None

    def alias_name(self) -> str:
        if not isinstance(self.alias, str) or not self.alias:
            raise APIError(400, "give either `from` or `alias`", "invalid_request", param="from")
        return self.alias


class WaitQuery(BaseModel):
    """`?wait=ready&timeout=S`: whether a write answers 202 now or waits for convergence."""

    wait: str | None = None
    timeout: Any = None

    def seconds(self, *, default_wait: bool = False) -> float | None:
        """Seconds to wait for convergence, or None for "answer 202 now"."""
        if self.wait not in (None, "", "ready", "none"):
            raise APIError(400, "`wait` must be `ready` (or absent)", "invalid_request", param="wait")
        try:
            timeout = float(self.timeout) if self.timeout is not None else (
                DEFAULT_WAIT if default_wait else DEFAULT_WRITE_WAIT)
        except (TypeError, ValueError):
            raise APIError(400, "`timeout` must be a number of seconds", "invalid_request",
                           param="timeout") from None
        except OverflowError:  # an integer too large for a float
            timeout = math.inf
        if not math.isfinite(timeout):
            raise APIError(422, f"`timeout` must be a finite number of seconds (at most {MAX_WAIT:g})",
                           "invalid_request", param="timeout")
        if self.wait == "ready" or (default_wait and self.wait != "none"):
            return max(0.0, min(timeout, MAX_WAIT))
        return None


def wait_query(query: dict[str, str], body: dict[str, Any] | None = None) -> WaitQuery:
    """The wait parameters from the query string (timeout also from the body of a verb)."""
    return WaitQuery(wait=query.get("wait"), timeout=query.get("timeout") or (body or {}).get("timeout"))

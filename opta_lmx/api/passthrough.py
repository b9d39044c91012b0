"""The rest of vllm-mlx 0.6's client surface: which model a request names, cancellation, /health.

The gateway routes every request by the model it names. Most bodies are JSON; the audio
transcription upload is multipart (OpenAI clients put `model` in a form field), and vllm-mlx's
audio endpoints also read `model` from the query string. A request id (cancellation) names no
model: it is asked of every ready worker, since only the one running it knows it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode

import aiohttp
from fastapi import APIRouter, Request

from opta_lmx.engine.worker_auth import worker_key
from opta_lmx.api.admin.protocol import json_depth
from opta_lmx.api.errors import APIError

router = APIRouter()

# Routes passed through to the named model's worker, beyond chat/completions/responses/messages/embeddings.
EXTRA_POST_PATHS = (
    "/v1/messages/count_tokens",
    "/v1/rerank",
    "/v1/audio/transcriptions",
    "/v1/audio/speech",
)
EXTRA_GET_PATHS = ("/v1/audio/voices",)  # the model is a query parameter
# Only these take a multipart body: a form post is a "simple" cross-site request, so it is not
# accepted where a JSON body would do.
MULTIPART_PATHS = frozenset({"/v1/audio/transcriptions"})
CANCEL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class RequestedModel:
    """The model a request names, and where: in the JSON body, a form field or the query string."""

    name: str
    where: str  # "json" | "form" | "query"
    payload: dict | None = None  # the parsed JSON body, when where == "json"


async def requested_model(request: Request, path: str, body: bytes) -> RequestedModel:
    """Find `model` in the body (JSON, or a form field for uploads), else in the query string."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if path not in MULTIPART_PATHS:
            raise APIError(400, "the request body must be a JSON object", "invalid_json")
        name = await _form_field(request, body, "model") or request.query_params.get("model")
        return _checked(name, "form")
    if body.strip():
        return _checked(*_json_model(body))
    return _checked(request.query_params.get("model"), "query")


def renamed(found: RequestedModel, body: bytes, query: str, name: str) -> tuple[bytes, str]:
    """Body and query string naming `name` (the canonical name) instead of an alias.

    A multipart upload passes unchanged: re-encoding a file upload to rename a field costs more
    than it is worth, and vllm-mlx 0.6 reads an upload's model from the query string anyway.
    """
    if found.where == "json" and found.payload is not None:
        return json.dumps({**found.payload, "model": name}).encode(), query
    if found.where == "query":
        pairs = [(k, name if k == "model" else v) for k, v in parse_qsl(query, keep_blank_values=True)]
        return body, urlencode(pairs)
    return body, query


MAX_BODY_DEPTH = 256  # nesting a request body may have (tool schemas nest; nothing real nests this deep)


def _json_model(body: bytes) -> tuple[object, str, dict]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # a nesting bomb is the client's error, not a 500
        raise APIError(400, "the request body must be a JSON object", "invalid_json") from None
    if not isinstance(payload, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    if json_depth(payload) > MAX_BODY_DEPTH:
        raise APIError(400, f"the request body nests deeper than {MAX_BODY_DEPTH} levels", "invalid_json")
    return payload.get("model"), "json", payload


def _checked(name: object, where: str, payload: dict | None = None) -> RequestedModel:
    if not isinstance(name, str) or not name:
        raise APIError(400, "`model` is required and must be a string", "missing_model", param="model")
    return RequestedModel(name, where, payload)


async def _form_field(request: Request, body: bytes, field: str) -> str | None:
    """One text field of a multipart body already read, parsed by Starlette (python-multipart)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form() as form:
            value = form.get(field)
    except Exception as error:  # noqa: BLE001 - a malformed upload is the client's error
        raise APIError(400, f"the multipart body could not be read: {error}", "invalid_multipart") from None
    return value if isinstance(value, str) else None


def _ready_routes(request: Request) -> list:
    reconciler = request.app.state.reconciler
    models = reconciler.desired.models if reconciler.desired is not None else []
    return [route for m in models if (route := reconciler.route(m.name)) is not None]


async def _cancel(request: Request, request_id: str) -> dict:
    """Ask every ready worker to cancel `request_id`; the one running it answers 200."""
    session: aiohttp.ClientSession = request.app.state.upstream
    timeout = aiohttp.ClientTimeout(total=CANCEL_TIMEOUT_S)

    async def ask(route) -> dict | None:
        try:
            secret = getattr(request.app.state, "worker_secret", None)
            headers = {"Authorization": f"Bearer {worker_key(secret, route.address)}"} if secret else None
            # The id is a path segment of the worker's URL: escaped, so `../x` or `?` can name nothing else.
            async with session.post(f"{route.address}/v1/requests/{quote(request_id, safe='')}/cancel", timeout=timeout,
                                    headers=headers) as reply:
                return await reply.json() if reply.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None

    for answer in await asyncio.gather(*(ask(route) for route in _ready_routes(request))):
        if answer is not None:
            return answer
    raise APIError(404, f"No running or queued request has the id `{request_id}`", "request_not_found",
                   param="request_id")


@router.post("/v1/requests/{request_id}/cancel")
async def cancel_request(request: Request, request_id: str) -> dict:
    return await _cancel(request, request_id)


@router.delete("/v1/requests/{request_id}")
async def delete_request(request: Request, request_id: str) -> dict:
    return await _cancel(request, request_id)


@router.get("/health")
async def health(request: Request) -> dict:
    """vllm-mlx's /health shape, for clients written against a single vllm-mlx server."""
    reconciler = request.app.state.reconciler
    ready = [route.name for route in _ready_routes(request)]
    running = reconciler.health().running
    if not getattr(request.state, "lmx_authenticated", True):  # keys set, none sent: up or down, nothing more
        return {"status": "healthy" if running else "unhealthy"}
    return {
        "status": "healthy" if running else "unhealthy",
        "model_loaded": bool(ready),
        "model_name": ready[0] if ready else None,
        "available_models": ready,
        "model_type": "llm",
        "engine_type": "opta-lmx",
        "mcp": None,
    }

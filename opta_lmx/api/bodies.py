"""Reading a request body with a ceiling: one reader for the gateway and the admin API.

A body is refused with 413 as soon as its declared length, or what has arrived of it, passes
the limit, so a huge upload is never held in memory.
"""

from __future__ import annotations

from fastapi import Request

from opta_lmx.api.errors import APIError


async def read_bounded(request: Request, limit: int, *, message: str, code: str) -> bytes:
    """The whole body, or APIError(413, message, code) once it passes `limit` bytes."""
    too_large = APIError(413, message, code)
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)

"""Workers answer only the control plane, and prove they are the workers it started.

Workers listen on loopback TCP, where any local user could call one directly and so skip the
gateway's keys. Each worker therefore gets its own key through vllm-mlx's `--api-key`
(its `/health` stays open). The key is derived from a secret kept in the workers' directory
(mode 600) and the worker's address, so that a restarted control plane can still talk to the
workers it adopts. The key never appears on a command line (which every local user can read with
`ps`): a cold worker's launcher (engine/worker_main.py) takes it from its environment and
removes it from there before vllm-mlx starts; a spare or a forked worker gets it over its pipe.

A worker proves it holds its key without sending it: `GET /lmx/identity?nonce=N` answers
HMAC(key, N), which only a holder of the key can compute (engine/worker_main.py serves it beside
vllm-mlx's routes). Readiness and adoption ask for that proof, so another process answering on a
worker's port (or named by a planted record) is never taken for the worker (issue 22).

The control plane's own HTTP calls to workers (readiness, memory) go through `loopback_client`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

import httpx

SECRET_FILE = "worker.secret"
KEY_VARIABLE = "OPTA_WORKER_KEY"  # read and removed by the cold worker's launcher before vllm-mlx starts
IDENTITY_PATH = "/lmx/identity"


def identity_proof(key: str, nonce: str) -> str:
    """What a worker holding `key` answers to `nonce` (the control plane computes it too)."""
    return hmac.new(key.encode(), b"opta-lmx-identity:" + nonce.encode(), hashlib.sha256).hexdigest()


async def proves_identity(client: httpx.AsyncClient, address: str, key: str) -> bool:
    """Whether the server at `address` holds `key` (a fresh nonce each time: no answer can be replayed)."""
    nonce = secrets.token_hex(16)
    try:
        response = await client.get(f"{address}{IDENTITY_PATH}", params={"nonce": nonce})
        proof = response.json().get("proof") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return isinstance(proof, str) and hmac.compare_digest(proof, identity_proof(key, nonce))


# Hop-by-hop headers (RFC 9110 7.6.1), ones the upstream request recomputes, and every
# credential a client may send: the worker sees only the control plane's key.
_NOT_FORWARDED = frozenset({
    "host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
    "proxy-connection", "proxy-authorization", "authorization", "x-api-key", "x-admin-key", "cookie",
})


class SecretFileError(Exception):
    """The workers' secret file is unsafe or unreadable."""


def ensure_secret(directory: str | os.PathLike[str]) -> bytes:
    """The control plane's worker secret, created (mode 600) on first use."""
    path = Path(directory) / SECRET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    secret = read_secret(directory)
    assert secret is not None
    return secret


def read_secret(directory: str | os.PathLike[str]) -> bytes | None:
    """The secret if the control plane created one in `directory`, else None (workers run without keys)."""
    path = Path(directory) / SECRET_FILE
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    if info.st_mode & 0o077 or not stat.S_ISREG(info.st_mode):
        raise SecretFileError(f"{path} is readable by other users; run `chmod 600 {path}`")
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 32:
        raise SecretFileError(f"{path} is too short to be a secret; delete it and it will be made anew")
    return value.encode()


def worker_key(secret: bytes, address: str) -> str:
    """The key of the worker at `address` (http://127.0.0.1:PORT)."""
    return hmac.new(secret, address.encode(), hashlib.sha256).hexdigest()


def upstream_headers(client_headers: Iterable[tuple[str, str]], key: str | None) -> list[tuple[str, str]]:
    """Headers for the request the gateway relays: the client's, minus hop-by-hop and credentials, plus the worker key."""
    headers = [(name, value) for name, value in client_headers if name.lower() not in _NOT_FORWARDED]
    if key:
        headers.append(("Authorization", f"Bearer {key}"))
    return headers


def loopback_client(timeout: float) -> httpx.AsyncClient:
    """A client for calling workers: plain HTTP on loopback, so no TLS context (building one costs
    about 20 ms of the event loop per client, measured) and no proxy from the environment (an
    HTTP_PROXY must not capture calls to 127.0.0.1)."""
    return httpx.AsyncClient(timeout=timeout, verify=False, trust_env=False)

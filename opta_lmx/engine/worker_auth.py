"""Workers answer only the control plane: a per-worker key the gateway sends for its clients.

Workers listen on loopback TCP, where any local user could call one directly and so skip the
gateway's keys. Each worker therefore gets its own key through vllm-mlx's `--api-key`
(its `/health` stays open, so readiness probes need none). The key is derived from a secret
kept in the workers' directory (mode 600) and the worker's address, so that a restarted
control plane can still talk to the workers it adopts. The key never appears on a command
line (which every local user can read with `ps`): the worker's launcher takes it from its
environment and removes it from there before vllm-mlx starts.

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
KEY_VARIABLE = "OPTA_WORKER_KEY"  # read and removed by LAUNCHER before vllm-mlx starts

# Runs `vllm_mlx.cli` with `--api-key` appended from the environment; "vllm_mlx.cli" stays
# on the visible command line (tools and tests find workers by it), the key does not.
LAUNCHER = (
    "import os, sys; key = os.environ.pop('" + KEY_VARIABLE + "', ''); "
    "sys.argv = ['vllm-mlx', *sys.argv[2:], *(['--api-key', key] if key else [])]; "
    "from vllm_mlx.cli import main; main()"
)

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

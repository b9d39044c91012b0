"""The bounded HTTP server, against a real uvicorn on a loopback port: each limit holds.

Each test drives raw sockets the way an attacker would (an endless header line, too many
headers, a head or body that never ends, too many idle connections) and then checks that
the server still answers an ordinary request.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request

from opta_lmx.api.server_limits import ServerLimits, bounded_server_options, connection_cap, raise_fd_limit

PORT = 18161
LIMITS = ServerLimits(max_head_bytes=8 * 1024, max_headers=20, head_timeout=1.0, body_timeout=1.0, max_connections=6)


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    return app


@pytest.fixture(scope="module")
def server():
    config = uvicorn.Config(_app(), host="127.0.0.1", port=PORT, log_level="warning", lifespan="off",
                            **bounded_server_options(LIMITS))
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(srv.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield srv
    srv.should_exit = True
    thread.join(timeout=10)


def _connect() -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", PORT), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes the connection (the socket timeout bounds the wait)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _ok(server) -> bool:
    with _connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return _read_all(sock).startswith(b"HTTP/1.1 200")


def test_an_endless_header_line_is_cut_off(server):
    with _connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ")
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:  # the attack sent 250 MB; the server must stop it long before
                sock.sendall(b"a" * 16384)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_all(sock)
    assert sent < 4 * 1024 * 1024
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431")
    assert _ok(server)


def test_a_head_just_over_the_limit_gets_431(server):
    with _connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 431")


def test_too_many_headers_get_431(server):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    with _connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + headers + b"\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 431")
    assert _ok(server)


def test_a_head_that_never_ends_is_closed(server):
    with _connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_an_idle_connection_is_closed(server):
    with _connect() as sock:
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_body_that_never_ends_is_closed(server):
    with _connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"x" * 10)
        answer = _read_all(sock)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    with _connect() as sock:  # a whole body in time is served
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        assert b'{"bytes":5}' in _read_all(sock)


def test_connections_beyond_the_cap_are_refused_and_the_server_stays_reachable(server):
    idle = [_connect() for _ in range(LIMITS.max_connections)]
    try:
        with _connect() as extra:
            assert _read_all(extra).startswith(b"HTTP/1.1 503")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while not _ok(server):  # the closed ones are released as the server notices
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_file_descriptor_limit_is_raised_and_caps_connections():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        raised = raise_fd_limit(1024)
        expected = 1024 if hard == resource.RLIM_INFINITY or hard >= 1024 else hard
        assert raised == expected == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert connection_cap(256) < 256 // 2 and connection_cap(10240) < 10240 // 2

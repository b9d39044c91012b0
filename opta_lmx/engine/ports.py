"""A worker's listening socket: bound by the control plane, handed to the worker.

A worker's port is never named first and bound later: another local user watching the process
table could bind it in between, answer `/health`, and receive that model's requests (and its
key) while the real worker crash-loops on EADDRINUSE (issue 22). So the control plane binds the
socket itself, on loopback, before the worker exists, and hands the open socket over (inherited
by a cold worker, sent with SCM_RIGHTS to a spare or the template); the worker serves on it and
never binds anything. A bound port is also never given to a second worker by the kernel.
"""

from __future__ import annotations

import socket

BACKLOG = 2048  # uvicorn's default


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A TCP socket bound to a free port of `host` and listening (connections wait in its backlog
    until the worker that inherits it serves them). Not inheritable until handed over."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock

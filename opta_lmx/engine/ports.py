"""Loopback ports for workers: free when picked, and never given to two live workers at once.

The kernel's bind(0) may hand the same free port to two workers started together (seen: two
cold workers on one port; the second failed to bind and the first answered the readiness
probe of both), so a port stays reserved in this process until its worker exits.
"""

from __future__ import annotations

import socket
import threading

_RESERVED_PORTS: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and that no other live worker of this process was given."""
    with _PORTS_LOCK:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            if port not in _RESERVED_PORTS:
                _RESERVED_PORTS.add(port)
                return port
    raise OSError("no free TCP port that no other worker was given")


def release_port(port: int) -> None:
    with _PORTS_LOCK:
        _RESERVED_PORTS.discard(port)


def reserve_port(port: int) -> None:
    """A port already in use by a worker this process did not start (an adopted one)."""
    with _PORTS_LOCK:
        _RESERVED_PORTS.add(port)

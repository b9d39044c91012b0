"""The template process (Linux only): imported once, it forks every worker.

Workers forked from one parent share its imported code and data pages copy-on-write, so each
extra worker costs its weights and what it writes, not another ~500 MiB of imports. The fork
happens before any MLX device, stream or thread exists: the template imports, and reads one
tokenizer (no MLX computation, see `_warm_imports`), and nothing else. On macOS, Metal and the
Objective-C runtime are not fork-safe after initialisation: spares are used there instead.

Protocol, over the Unix socket passed as `--socket-fd`: the control plane sends one JSON line
per worker (the `vllm-mlx serve` arguments, environment, key and log path) with the worker's
announcement pipe and its listening socket attached (SCM_RIGHTS, in that order: the control
plane bound the socket, so no one can take the worker's port first); the template forks and
answers `{"pid": N}`. The
child starts its own session (its own process group, as a cold worker), becomes the worker
(engine/worker_main.serve) and announces on its pipe. The template reaps its children and
exits when the socket closes: a control plane that dies leaves no template behind, while the
workers live on (to be adopted) like cold ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable

from opta_lmx.engine import worker_main

MAX_REQUEST = 1 << 20


def _warm_imports(model_path: str) -> None:
    """Import what a load and a first answer import, without running MLX here (fork safety).

    A throwaway spare process warms up on a tiny model (engine/worker_main.py) and lists its
    modules; the template imports the same names. Importing runs no MLX computation, so no
    MLX stream, thread or device state exists when the template forks.
    """
    import importlib
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as listing:
        subprocess.run([sys.executable, "-m", "opta_lmx.engine.worker_main", "--warm-up-model", model_path,
                        "--list-modules", listing.name], check=True, stdin=subprocess.DEVNULL, timeout=600)
        names = json.load(open(listing.name))
    failed = 0
    for name in names:
        if name in sys.modules or name == "__main__":
            continue
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - private or platform-specific modules: skip them
            failed += 1
    threads = len(os.listdir("/proc/self/task"))
    print(f"template: imported {len(sys.modules)} modules ({failed} skipped); {threads} threads", flush=True)


def _reap(*_: object) -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_worker(channel: socket.socket, assignment: dict, announce_fd: int, listen_fd: int) -> None:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            os.setsid()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            channel.close()
            worker_main.serve(assignment, announce_fd, listen_fd)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - report it in the worker's log, then exit
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(announce_fd)
    os.close(listen_fd)
    channel.sendall(json.dumps({"pid": pid}).encode() + b"\n")


def _serve_requests(channel: socket.socket) -> None:
    buffered = b""
    fds: list[int] = []
    while True:
        message, new_fds, _flags, _address = socket.recv_fds(channel, MAX_REQUEST, 4)
        fds += new_fds
        if not message:
            return  # the control plane closed its end (or died)
        buffered += message
        while b"\n" in buffered:
            line, buffered = buffered.split(b"\n", 1)
            if len(fds) < 2:
                channel.sendall(b'{"error": "no announcement pipe and listening socket attached"}\n')
                for fd in fds:
                    os.close(fd)
                fds = []
                continue
            announce_fd, listen_fd = fds.pop(0), fds.pop(0)
            try:
                assignment = json.loads(line)
            except ValueError as error:
                channel.sendall(json.dumps({"error": f"unreadable request: {error}"}).encode() + b"\n")
                os.close(announce_fd)
                os.close(listen_fd)
                continue
            _fork_worker(channel, assignment, announce_fd, listen_fd)


def _end_if_abandoned(channel: socket.socket) -> Callable[[], None]:
    """While the template warms up (seconds), end it and its warm-up child if the control plane
    dies: nothing is sent before `waiting`, so the socket turning readable means end of file.
    Returns the function that stops watching (no thread may run when the template forks)."""
    stop_read, stop_write = os.pipe()

    def watch() -> None:
        readable, _, _ = select.select([channel, stop_read], [], [])
        if stop_read not in readable:
            os.killpg(0, signal.SIGKILL)  # its own group (start_new_session): the template and the warm-up

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    def stop() -> None:
        os.write(stop_write, b"x")
        watcher.join()
        os.close(stop_read)
        os.close(stop_write)

    return stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opta_lmx.engine.template_main")
    parser.add_argument("--socket-fd", type=int, required=True)
    parser.add_argument("--warm-up-model", default=None)
    args = parser.parse_args(argv)
    channel = socket.socket(fileno=args.socket_fd)
    stop_watching = _end_if_abandoned(channel)
    worker_main._preimport()
    if worker_main.warm_up_model_usable(args.warm_up_model):
        try:
            _warm_imports(args.warm_up_model)
        except Exception as error:  # still a template: the imports are done
            print(f"warm-up failed (the template still forks): {error!r}", file=sys.stderr, flush=True)
    stop_watching()
    gc.collect()
    gc.freeze()  # keep the imported objects out of the children's collections: pages stay shared
    signal.signal(signal.SIGCHLD, _reap)
    print("template: waiting", flush=True)
    channel.sendall(b'{"waiting": true}\n')
    _serve_requests(channel)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every worker process runs this: vllm-mlx's own `serve`, on a socket the control plane bound.

Three ways in, one way to serve (`serve`):

- cold: `python -m opta_lmx.engine.worker_main --announce-fd A --listen-fd L -- serve MODEL ...`,
  with the worker's environment (its key in OPTA_WORKER_KEY, removed at once) and its log as
  stdout;
- spare: started with `--channel-fd C` (a Unix socket), it imports vllm-mlx's world first (~3 s,
  ~580 MiB), warms up on a tiny model, announces `waiting` and blocks until the control plane
  sends one JSON assignment (the `vllm-mlx serve` arguments, environment, key, log path) with the
  listening socket attached (SCM_RIGHTS); end of file before that (the control plane exited or
  stopped it) ends the spare, so no spare outlives the control plane;
- forked by the template (engine/template_main.py), which calls `serve` in the child.

`serve` becomes the assigned worker (environment, directory, log) and runs vllm-mlx's `serve`
with those arguments, so every engine option means what it means for vllm-mlx, except that
uvicorn serves on the inherited socket (the worker never binds a port: no one can take it first)
and two routes of ours answer beside vllm-mlx's: `/lmx/identity` (a proof that this process
holds its key, engine/worker_auth.py). It announces on its pipe (the fd after `--announce-fd`):
`serving` once uvicorn listens with the model loaded, or `failed permanent|temporary <reason>`
when it cannot serve, then exits with PERMANENT_EXIT or TEMPORARY_EXIT: why a worker ended is
said by the worker, never guessed from words in its log (issue 20). Permanent: vllm-mlx refused
its arguments, or the model cannot be read or is not one it can serve; anything else (out of
memory, a crash) is worth a retry with backoff.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from urllib.parse import parse_qs

WAITING = "waiting"
SERVING = "serving"
FAILED = "failed"
PERMANENT_EXIT = 10  # exit code: retrying the same spec fails the same way
TEMPORARY_EXIT = 11  # exit code: could not serve now (out of memory, a crash...); retry with backoff
MAX_ASSIGNMENT = 1 << 20

# Errors of loading a model that retrying the same spec cannot cure: missing or unreadable files,
# a config or weights that are not a model vllm-mlx serves (mlx-lm raises ValueError for an
# unknown model type), a package the model needs that is not installed. By class, never by words.
_PERMANENT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
                     KeyError, NotImplementedError, ImportError)
_PERMANENT_ERROR_NAMES = frozenset({"SafetensorError", "HeaderTooLarge", "RepositoryNotFoundError",
                                    "LocalEntryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                                    "EntryNotFoundError"})


def _announce(fd: int | None, word: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (word + "\n").encode("utf-8", "replace"))
    except OSError:
        pass  # the control plane stopped listening: the worker's /health still answers


def failure_word(permanent: bool, reason: str) -> str:
    """The announcement of a worker that cannot serve: one line, bounded."""
    line = " ".join(reason.split())[:500]
    return f"{FAILED} {'permanent' if permanent else 'temporary'} {line}"


def parse_failure(word: str) -> tuple[bool, str] | None:
    """(permanent, reason) from an announcement made by `failure_word`, else None."""
    head, _, rest = word.partition(" ")
    if head != FAILED:
        return None
    kind, _, reason = rest.partition(" ")
    return kind == "permanent", reason or "the worker could not serve"


def classify(error: BaseException) -> bool:
    """Whether an error while loading a model is permanent (see _PERMANENT_ERRORS)."""
    if isinstance(error, MemoryError):
        return False
    return isinstance(error, _PERMANENT_ERRORS) or any(
        cls.__name__ in _PERMANENT_ERROR_NAMES for cls in type(error).__mro__)


def _preimport() -> None:
    """Everything `vllm-mlx serve` imports before loading a model (measured: ~3 s, ~580 MiB), and
    what uvicorn imports only as it starts (its protocol and loop choices: ~25 ms per worker)."""
    import uvicorn  # noqa: F401
    import uvicorn.lifespan.on  # noqa: F401
    import uvicorn.loops.auto  # noqa: F401
    import uvicorn.protocols.http.auto  # noqa: F401
    import uvicorn.protocols.websockets.auto  # noqa: F401
    import vllm_mlx.api.utils  # noqa: F401
    import vllm_mlx.cli  # noqa: F401
    import vllm_mlx.server  # noqa: F401
    import vllm_mlx.utils.download  # noqa: F401
    import anyio._backends._asyncio  # noqa: F401 (starlette's first threadpool call imports it lazily)
    try:
        import uvloop  # noqa: F401 (uvicorn's "auto" loop picks it when installed)
    except ImportError:
        pass


def warm_up_model_usable(model_path: str | None) -> bool:
    """Whether a warm-up model was given and exists (the command line generates it: the engine
    must not import the generated-model tools). Without one, warming up is skipped."""
    return model_path is not None and bool(model_path) and os.path.isfile(os.path.join(model_path, "config.json"))


def _warm_up(model_path: str) -> None:
    """Load a tiny model through vllm-mlx's own path and answer once, then drop it.

    Loading and the first answer import another ~1000 modules lazily (mlx-lm's model code,
    tokenizer classes, torchvision, sympy): ~1.5 s that a spare can spend before it is needed.
    Nothing of the server's global state is touched: the engine is used directly.
    """
    import asyncio
    import gc

    import mlx.core as mx
    from vllm_mlx.api.utils import resolve_mllm_route
    from vllm_mlx.engine.simple import SimpleEngine
    from vllm_mlx.utils.download import DownloadConfig, ensure_model_downloaded

    resolved = ensure_model_downloaded(model_path, config=DownloadConfig(offline=True), is_mllm=False)
    resolve_mllm_route(model_path, str(resolved), force_mllm=False)

    async def answer_once() -> None:
        engine = SimpleEngine(model_name=model_path)
        await engine.start()
        try:
            await engine.chat(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        finally:
            await engine.stop()

    asyncio.run(answer_once())
    gc.collect()
    mx.clear_cache()


def read_assignment(channel: socket.socket) -> tuple[dict, list[int]] | None:
    """One JSON line and the descriptors sent with it; None at end of file (stopped while waiting)."""
    buffered, fds = b"", []
    while b"\n" not in buffered:
        message, new_fds, _flags, _address = socket.recv_fds(channel, MAX_ASSIGNMENT, 4)
        fds += new_fds
        if not message:
            for fd in fds:
                os.close(fd)
            return None
        buffered += message
    return json.loads(buffered.split(b"\n", 1)[0]), fds


def _become(assignment: dict) -> None:
    """Take the worker's environment, directory and log, as if started cold with them."""
    os.environ.clear()
    os.environ.update(assignment["env"])
    if assignment.get("cwd"):
        os.chdir(assignment["cwd"])
    log_fd = os.open(assignment["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # prompts: private
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the control plane's end may close now without ending this worker
    os.close(devnull)


def milestone(what: str, since: float | None = None) -> None:
    """One timestamped line in the worker's log: where a start's time goes (bench/swap_timeline.py)."""
    now = time.time()
    after = f" ({now - since:.3f}s after assignment)" if since is not None else ""
    print(f"lmx-worker: {what} at {now:.3f}{after}", flush=True)


def identity_app(app, key: str | None):
    """vllm-mlx's ASGI app, with `/lmx/identity` answered first (engine/worker_auth.py)."""
    from opta_lmx.engine.worker_auth import IDENTITY_PATH, identity_proof

    async def with_identity(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == IDENTITY_PATH and key:
            nonce = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("nonce", [""])[0][:128]
            body = json.dumps({"proof": identity_proof(key, nonce), "pid": os.getpid()}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return with_identity


class _Phase:
    loading = False  # vllm-mlx has started loading the model (its arguments were accepted)


def _install(announce_fd: int | None, listen_fd: int | None, key: str | None, assigned: float | None) -> _Phase:
    """Make vllm-mlx's `uvicorn.run(app, host, port)` serve on the inherited socket, answer the
    identity route, and announce once it listens; note when the model load begins."""
    import uvicorn
    import vllm_mlx.server

    phase = _Phase()
    load_model = vllm_mlx.server.load_model

    def loading(*args, **kwargs):
        phase.loading = True
        return load_model(*args, **kwargs)

    vllm_mlx.server.load_model = loading  # vllm-mlx's serve imports it from the module when it runs
    _exit_once_saved(vllm_mlx.server, assigned)
    _restore_eagerly()

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                _announce(announce_fd, SERVING)
                milestone("serving", assigned)

    def run(app, **kwargs) -> None:
        milestone("model loaded", assigned)  # vllm-mlx loads the model before it runs uvicorn
        server = AnnouncingServer(uvicorn.Config(identity_app(app, key), **kwargs))
        sockets = [socket.socket(fileno=listen_fd)] if listen_fd is not None else None
        server.run(sockets=sockets)
        if not server.started:
            _announce(announce_fd, failure_word(False, "the server could not start on its socket"))
            sys.exit(TEMPORARY_EXIT)

    uvicorn.run = run
    return phase


def _restore_eagerly() -> None:
    """A kept prefix cache restored at start is read into memory before the worker is Ready, not at
    its first hit: mlx loads the saved entries lazily, so the first request after a swap-back paid
    for reading them (0.19 s of 0.78 s with a 50 MB cache, bench/warm_swaps.py), and the memory
    they hold appeared only after the worker was measured at Ready (docs/reconciler.md)."""
    try:
        import mlx.core as mx
        from vllm_mlx.memory_cache import MemoryAwarePrefixCache
    except ImportError:
        return
    load = getattr(MemoryAwarePrefixCache, "load_from_disk", None)
    if load is None:
        return

    def load_and_read(self, cache_dir: str) -> int:
        loaded = load(self, cache_dir)
        if loaded:
            try:
                mx.eval([layer.state for entry in list(self._entries.values()) for layer in entry.cache])
            except Exception as error:  # noqa: BLE001 - lazily read at first use, as vllm-mlx does
                print(f"lmx-worker: reading the restored prefix cache ahead failed: {error!r}", flush=True)
        return loaded

    MemoryAwarePrefixCache.load_from_disk = load_and_read


def _exit_once_saved(server, assigned: float | None) -> None:
    """A worker stopped with SIGTERM saves its prefix cache (vllm-mlx's lifespan shutdown) and then
    ends at once: the rest of vllm-mlx's shutdown (stopping the engine thread, freeing MLX buffers,
    the interpreter's teardown) only frees what the process's exit frees anyway, and took ~0.7 s
    of every unload (bench/warm_swaps.py). Its SSD tier is closed first, so spills still queued
    are written. A vllm-mlx without that hook (another version, a stand-in) keeps its own shutdown."""
    save = getattr(server, "_save_prefix_cache_to_disk", None)
    if save is None:
        return

    async def save_then_exit(engine=None):
        await save(engine)
        if engine is not None:  # the registry's per-model unload: not this process's end
            return
        milestone("prefix cache saved", assigned)
        scheduler = getattr(getattr(getattr(server._engine, "_engine", None), "engine", None), "scheduler", None)
        close = getattr(scheduler, "close_ssd_tier", None)
        if close is not None:
            try:
                close()
            except Exception as error:  # noqa: BLE001 - its entries on disk stay; the queue is lost
                print(f"lmx-worker: closing the SSD tier failed: {error!r}", flush=True)
        _exit_now()

    server._save_prefix_cache_to_disk = save_then_exit


def serve(assignment: dict, announce_fd: int | None, listen_fd: int | None = None) -> None:
    """Become the assigned worker and run `vllm-mlx serve` until it stops; a worker that cannot
    serve says why on its pipe and exits with PERMANENT_EXIT or TEMPORARY_EXIT."""
    from opta_lmx.engine.worker_auth import KEY_VARIABLE

    assigned = None
    if assignment.get("env") is not None:  # a spare or a forked worker: take the worker's world
        assigned = time.time()
        _become(assignment)
        milestone("assigned")
    key = assignment.get("key") or os.environ.pop(KEY_VARIABLE, None) or None
    os.environ.pop(KEY_VARIABLE, None)  # no model code or child process sees it
    for fd in (announce_fd, listen_fd):
        if fd is not None:
            os.set_inheritable(fd, False)  # nothing vllm-mlx starts inherits them
    phase = _install(announce_fd, listen_fd, key, assigned)
    import vllm_mlx.cli

    sys.argv = ["vllm-mlx", *assignment["argv"], *(["--api-key", key] if key else [])]
    try:
        vllm_mlx.cli.main()
    except SystemExit as stop:
        if stop.code in (0, None) or phase.loading:
            raise
        # vllm-mlx refused its arguments (it prints why, with "Error: ..."): the same spec always will
        _announce(announce_fd, failure_word(True, f"vllm-mlx refused its arguments (exit {stop.code}); see the log"))
        sys.exit(PERMANENT_EXIT)
    except BaseException as error:  # noqa: BLE001 - said on the pipe, then the process ends
        if isinstance(error, KeyboardInterrupt):
            raise
        traceback.print_exc()
        permanent = classify(error)
        _announce(announce_fd, failure_word(permanent, f"{type(error).__name__}: {error}"))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(PERMANENT_EXIT if permanent else TEMPORARY_EXIT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opta_lmx.engine.worker_main")
    parser.add_argument("--announce-fd", type=int, default=None)
    parser.add_argument("--listen-fd", type=int, default=None, help="cold: the socket to serve on")
    parser.add_argument("--channel-fd", type=int, default=None, help="spare: where its assignment comes from")
    parser.add_argument("--warm-up-model", default=None, help="a tiny model to load and drop once")
    parser.add_argument("--list-modules", default=None,
                        help="after warming up, write the imported module names here and exit (for templates)")
    parser.add_argument("serve_argv", nargs=argparse.REMAINDER, help="cold: -- serve MODEL ...")
    args = parser.parse_args(argv)
    fd = args.announce_fd
    if fd is not None:
        os.set_inheritable(fd, False)
    cold = [a for a in args.serve_argv if a != "--"] if args.serve_argv else []
    if cold:
        serve({"argv": cold}, fd, args.listen_fd)
        _exit_now()
    _preimport()
    if warm_up_model_usable(args.warm_up_model):
        try:
            _warm_up(args.warm_up_model)
        except Exception as error:  # a spare that did not warm up still saves the imports
            print(f"warm-up failed (the spare still waits): {error!r}", file=sys.stderr, flush=True)
    if args.list_modules:
        with open(args.list_modules, "w") as handle:
            json.dump(sorted(sys.modules), handle)
        return 0
    if args.channel_fd is None:
        print("Error: a spare needs --channel-fd", file=sys.stderr, flush=True)
        return 2
    channel = socket.socket(fileno=args.channel_fd)
    print("spare: waiting", flush=True)
    _announce(fd, WAITING)
    try:
        received = read_assignment(channel)
    except (ValueError, KeyError, OSError) as error:
        print(f"unreadable assignment: {error}", file=sys.stderr, flush=True)
        return 2
    if received is None:
        return 0  # stopped while waiting
    assignment, fds = received
    channel.close()
    serve(assignment, fd, fds[0] if fds else None)
    _exit_now()
    return 0


def _exit_now() -> None:
    """vllm-mlx has shut down (engine stopped, prefix cache saved). Skip the interpreter's teardown
    of ~4000 modules: the process exits, and returns its memory, a few hundred ms sooner."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())

"""The process a spare worker runs: import vllm-mlx's world first, then wait for a model.

A fresh worker spends seconds importing torch, transformers, mlx and the server before it
reads a single weight. A spare does that ahead of time, then blocks on its stdin. The control
plane assigns it a model by writing one JSON line: the `vllm-mlx serve` arguments and the
environment the worker would have had. The spare then becomes exactly that worker: it takes
the environment, sends its output to the worker's log, and runs vllm-mlx's own `serve` with
those arguments (so every engine option means what it means for a cold worker).

It announces on a pipe (the fd after `--announce-fd`): `waiting` once imported, `serving`
once uvicorn listens with the model loaded. If stdin reaches end of file before an
assignment (the control plane exited or stopped it), the spare exits: no spare outlives
the control plane. After the assignment stdin is closed, so the worker, like a cold one,
survives a control-plane crash and can be adopted.

    python -m opta_lmx.engine.worker_main --announce-fd 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

WAITING = "waiting"
SERVING = "serving"


def _announce(fd: int | None, word: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (word + "\n").encode())
    except OSError:
        pass  # the control plane stopped listening: the worker's /health still answers


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
    return bool(model_path) and os.path.isfile(os.path.join(model_path, "config.json"))


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


def _read_assignment() -> dict | None:
    line = sys.stdin.readline()
    if not line.strip():
        return None
    return json.loads(line)


def _become(assignment: dict) -> None:
    """Take the worker's environment, directory and log, as if started cold with them."""
    os.environ.clear()
    os.environ.update(assignment["env"])
    if assignment.get("cwd"):
        os.chdir(assignment["cwd"])
    log_fd = os.open(assignment["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


def _announce_when_serving(fd: int | None, assigned: float | None = None) -> None:
    """Make vllm-mlx's `uvicorn.run(app, ...)` announce once the server listens."""
    import uvicorn

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                _announce(fd, SERVING)
                milestone("serving", assigned)

    def run(app, **kwargs) -> None:
        milestone("model loaded", assigned)  # vllm-mlx loads the model before it runs uvicorn
        server = AnnouncingServer(uvicorn.Config(app, **kwargs))
        server.run()
        if not server.started:
            sys.exit(3)  # uvicorn.run does the same when it could not start

    uvicorn.run = run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opta_lmx.engine.worker_main")
    parser.add_argument("--announce-fd", type=int, default=None)
    parser.add_argument("--warm-up-model", default=None, help="a tiny model to load and drop once")
    parser.add_argument("--list-modules", default=None,
                        help="after warming up, write the imported module names here and exit (for templates)")
    args = parser.parse_args(argv)
    fd = args.announce_fd
    if fd is not None:
        os.set_inheritable(fd, False)
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
    print("spare: waiting", flush=True)
    _announce(fd, WAITING)
    try:
        assignment = _read_assignment()
    except (ValueError, KeyError) as error:
        print(f"Error: unreadable assignment: {error}", file=sys.stderr, flush=True)
        return 2
    if assignment is None:
        return 0  # stopped while waiting
    serve(assignment, fd)
    # vllm-mlx has shut down (engine stopped, caches saved). Skip the interpreter's teardown of
    # ~4000 modules: the process exits, and returns its memory, a few hundred ms sooner.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def serve(assignment: dict, announce_fd: int | None) -> None:
    """Become the assigned worker and run `vllm-mlx serve` until it stops."""
    assigned = time.time()
    _become(assignment)
    milestone("assigned")
    _announce_when_serving(announce_fd, assigned)
    import vllm_mlx.cli

    sys.argv = ["vllm-mlx", *assignment["argv"]]
    vllm_mlx.cli.main()


if __name__ == "__main__":
    sys.exit(main())

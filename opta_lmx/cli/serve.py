"""`lmx serve`: wire the concrete parts together (pool, loop, store, app) and run uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from opta_lmx import paths

log = logging.getLogger("opta_lmx")

DEFAULT_MODELS_YAML = """\
# Opta-LMX desired state. Edit and save: the server converges to it within a second or so.
# Reference: `lmx schema` prints every field as JSON Schema; `lmx check -f FILE` validates a file.
memory:
  budget: 75%        # of physical memory, or a size such as 48GiB
  reserve: 2GiB      # memory that must stay free for the system

defaults:
  engine:
    continuous_batching: true
    max_tokens: 512

models:
  # A tiny generated demo model (random weights: its answers are gibberish, on purpose).
  - name: demo
    source: {demo_path}
    aliases: [default]
    state: loaded

  # On a Mac, point at a real MLX model from the hub, for example:
  # - name: coder
  #   source: mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit
  #   engine: {{tool_call_parser: qwen3_coder, max_num_seqs: 32}}
"""


def ensure_default_config() -> Path:
    """The embedded default: a generated demo model and a models.yaml that serves it."""
    from opta_lmx.devmodel import make_model

    config = paths.default_config_path()
    demo = paths.cache_dir() / "models" / "demo-tiny"
    make_model(demo, size="tiny", progress=lambda m: print(f"  demo model: {m}", flush=True))
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(DEFAULT_MODELS_YAML.format(demo_path=demo))
        print(f"Wrote a default models.yaml to {config}", flush=True)
    return config


def warm_up_model(state_dir: Path) -> Path | None:
    """A tiny generated model that spares and the template load once while they wait, so a
    worker's lazy imports are done before it is needed (the engine may not import devmodel)."""
    from opta_lmx.devmodel import make_model

    from opta_lmx.state.statedir import StateDirError, make_private

    try:
        path = make_model(state_dir / "warm-up-model", size="tiny")  # at once when it exists
        make_private(path, "warm-up model")  # like everything in the state dir (generated models are 0644)
        return path
    except (OSError, ValueError, StateDirError) as error:
        log.warning("no warm-up model (fast starts skip warming up): %s", error)
        return None


def _server_class():
    import uvicorn

    class LmxServer(uvicorn.Server):
        """uvicorn, but a handled SIGTERM/SIGINT ends in exit 0 instead of being re-raised,
        and a second signal of either kind forces: no more draining, workers killed now."""

        on_stop = None  # called (in the signal handler) on the first signal
        on_force = None  # called (in the signal handler) on the second signal

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            if self.should_exit:
                log.warning("second signal: forcing shutdown")
                self.force_exit = True  # uvicorn forces only on a second SIGINT; SIGTERM too here
                if self.on_force is not None:
                    self.on_force()
            else:
                log.info("signal %s: draining and stopping every worker", signal.Signals(sig).name)
                if self.on_stop is not None:
                    self.on_stop()
            super().handle_exit(sig, frame)

    return LmxServer


def _run_event_loop(coroutine) -> None:
    """uvloop when available: measurably less CPU per relayed token (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


def _fleet_parts(args: argparse.Namespace, config: Path):
    """The git follower (--git-follow) and this host's fleet view (--fleet-host); SystemExit says
    why they cannot be made (docs/fleet.md)."""
    import time

    from opta_lmx import settings
    from opta_lmx.reconciler.fleet import Fleet
    from opta_lmx.state.gitsync import GitFollower, GitSyncError

    follower = fleet = None
    if args.git_follow:
        try:
            follower = GitFollower(config, args.git_follow)
        except GitSyncError as error:
            raise SystemExit(f"--git-follow {args.git_follow}: {error}") from None
        print(f"  git:           following {args.git_follow}/{follower.branch} every {args.git_interval:g}s", flush=True)
    if args.fleet_host:
        try:
            key = settings.current().fleet_secret()
        except settings.SecretFileError as error:
            raise SystemExit(str(error)) from None
        if not key:
            raise SystemExit("--fleet-host needs the fleet key (LMX_FLEET_KEY or LMX_FLEET_KEY_FILE): hosts "
                             "never accept each other's calls without it (docs/fleet.md)")
        fleet = Fleet(args.fleet_host, key, time.time)
        print(f"  fleet host:    {args.fleet_host}", flush=True)
    return follower, fleet


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from opta_lmx.api.app import GatewaySettings, create_app
    from opta_lmx.api.auth import KeyConfigError, check_bind, load_keys
    from opta_lmx.api.server_limits import bounded_server_options
    from opta_lmx.engine.pool import WorkerPool
    from opta_lmx.engine.prefix_cache import KeptCaches
    from opta_lmx.engine.worker_auth import ensure_secret, read_secret
    from opta_lmx.cli.logs import uvicorn_log_config, worker_log_dir
    from opta_lmx.reconciler.controller import LoopSettings, Reconciler
    from opta_lmx.state.instance import AlreadyRunning, InstanceLock
    from opta_lmx.state.statedir import PRIVATE_UMASK, StateDirError, prepare_state_dir
    from opta_lmx.state.store import ModelsStore

    try:
        keys = load_keys()
        check_bind(args.host, keys)
    except KeyConfigError as error:
        print(f"lmx serve: {error}", file=sys.stderr)
        return 2
    # Everything this server and its workers create is theirs alone, whatever the user's umask:
    # records, secrets, logs (which hold prompts), sockets, caches (docs/security.md).
    os.umask(PRIVATE_UMASK)
    state_dir = paths.state_dir(args.state_dir)
    log_dir = worker_log_dir(state_dir, state_dir_given=bool(args.state_dir))
    try:
        prepare_state_dir(state_dir)
        prepare_state_dir(log_dir, "log dir")
    except StateDirError as error:
        print(f"lmx serve: {error}", file=sys.stderr)
        return 2
    lock = InstanceLock(state_dir)
    try:
        lock.acquire()  # held until this process exits; a SIGKILL releases it too
    except AlreadyRunning as error:
        print(f"lmx serve: {error}", file=sys.stderr, flush=True)
        return 1
    config = Path(args.config).expanduser() if args.config else ensure_default_config()
    print(f"Opta-LMX serving http://{args.host}:{args.port}/v1", flush=True)
    print(f"  desired state: {config}  (edit it; changes apply live)", flush=True)
    print(f"  state dir:     {state_dir}", flush=True)
    print(f"  worker logs:   {log_dir}  (lmx logs MODEL)", flush=True)

    try:
        follower, fleet = _fleet_parts(args, config)
    except SystemExit as refused:
        print(f"lmx serve: {refused}", file=sys.stderr)
        return 2
    ensure_secret(state_dir / "workers")  # each worker's key derives from it; the gateway sends that key
    pool = WorkerPool(state_dir / "workers", log_dir=log_dir, warm_up_model=warm_up_model(state_dir),
                      caches=KeptCaches(state_dir / "prefix-caches"))
    reconciler = Reconciler(config, pool, settings=LoopSettings(stop_grace=args.grace), fleet=fleet)

    store = ModelsStore(config, git_commit=args.git_commit, git=follower)
    app = create_app(reconciler, GatewaySettings(load_wait_timeout=args.load_wait_timeout,
                                                 queue_limit=args.queue_limit, max_body_bytes=args.max_body_bytes,
                                                 bind_host=args.host, allowed_hosts=tuple(args.allowed_host)),
                     store=store, keys=keys, git_interval=args.git_interval)
    app.state.worker_logs = (state_dir, log_dir)  # the dashboard's log tail reads them
    app.state.worker_secret = read_secret(state_dir / "workers")
    server = _server_class()(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                       timeout_graceful_shutdown=args.grace, access_log=False,
                       log_config=uvicorn_log_config(args.log_format) or uvicorn.config.LOGGING_CONFIG,
                       **bounded_server_options())
    )
    # Long-lived streams (lmx events -f) end instead of holding the shutdown.
    server.on_stop = lambda: setattr(app.state, "stopping", True)

    # Forcing also cuts short workers that are being stopped gracefully (lifespan shutdown).
    server.on_force = lambda: threading.Thread(
        target=pool.stop_all_sync, args=(0.0,), name="force-stop-workers", daemon=True).start()
    try:
        _run_event_loop(server.serve())
    finally:
        pool.stop_all_sync(grace=2.0)  # belt and braces: nothing outlives the server
        lock.release()
    return 0 if server.started else 1



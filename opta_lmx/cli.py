"""`lmx`: the entry point, and the only place that wires concrete parts together."""

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
# Reference: https://github.com/opta/opta-lmx/blob/main/docs/models-yaml.md
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


def _setup_logging(level: str, fmt: str = "human") -> None:
    from opta_lmx.logs import setup_logging

    setup_logging(level, fmt)


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from opta_lmx.api.app import GatewaySettings, create_app
    from opta_lmx.api.auth import KeyConfigError, check_bind, load_keys
    from opta_lmx.engine.pool import WorkerPool
    from opta_lmx.logs import uvicorn_log_config, worker_log_dir
    from opta_lmx.reconciler.controller import LoopSettings, Reconciler
    from opta_lmx.state.instance import AlreadyRunning, InstanceLock
    from opta_lmx.state.store import ModelsStore

    try:
        keys = load_keys()
        check_bind(args.host, keys)
    except KeyConfigError as error:
        print(f"lmx serve: {error}", file=sys.stderr)
        return 2
    state_dir = paths.state_dir(args.state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = InstanceLock(state_dir)
    try:
        lock.acquire()  # held until this process exits; a SIGKILL releases it too
    except AlreadyRunning as error:
        print(f"lmx serve: {error}", file=sys.stderr, flush=True)
        return 1
    config = Path(args.config).expanduser() if args.config else ensure_default_config()
    log_dir = worker_log_dir(state_dir, state_dir_given=bool(args.state_dir))
    print(f"Opta-LMX serving http://{args.host}:{args.port}/v1", flush=True)
    print(f"  desired state: {config}  (edit it; changes apply live)", flush=True)
    print(f"  state dir:     {state_dir}", flush=True)
    print(f"  worker logs:   {log_dir}  (lmx logs MODEL)", flush=True)

    pool = WorkerPool(state_dir / "workers", log_dir=log_dir)
    reconciler = Reconciler(config, pool, settings=LoopSettings(stop_grace=args.grace))

    store = ModelsStore(config, git_commit=args.git_commit)
    app = create_app(reconciler, GatewaySettings(load_wait_timeout=args.load_wait_timeout,
                                                 queue_limit=args.queue_limit, max_body_bytes=args.max_body_bytes),
                     store=store, keys=keys)
    app.state.worker_logs = (state_dir, log_dir)  # the dashboard's log tail reads them
    server = _server_class()(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                       timeout_graceful_shutdown=args.grace, access_log=False,
                       log_config=uvicorn_log_config(args.log_format) or uvicorn.config.LOGGING_CONFIG)
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


def cmd_logs(args: argparse.Namespace) -> int:
    from opta_lmx import logs

    state_dir = paths.state_dir(args.state_dir)
    log_dir = logs.worker_log_dir(state_dir, state_dir_given=bool(args.state_dir))
    path = logs.model_log_path(args.model, state_dir, log_dir)
    if path is None or not path.exists():
        print(f"lmx logs: no worker log for `{args.model}` (looked in {state_dir / 'workers' / 'records'} "
              f"and {log_dir}); is it loaded? see GET /admin/models", file=sys.stderr)
        return 1
    try:
        offset = logs.tail(path, args.lines)
        if args.follow:
            logs.follow(path, offset)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_make_model(args: argparse.Namespace) -> int:
    from opta_lmx.devmodel import make_model

    path = make_model(args.directory, size=args.size, seed=args.seed, dtype=args.dtype,
                      progress=lambda m: print(m, flush=True))
    print(f"model written to {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from opta_lmx.state.document import ConfigError, read_document

    try:
        document = read_document(args.config or paths.default_config_path())
    except ConfigError as error:
        print(error.describe(), file=sys.stderr)
        return 1
    print(f"ok: {len(document.state.models)} model(s)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print what the loop would do with a models.yaml, against a running server or from nothing."""
    import httpx

    from opta_lmx.client import admin_headers
    from opta_lmx.reconciler.preview import describe, preview
    from opta_lmx.state.document import ConfigError, read_document

    observation, against, server_config = None, "from nothing (no server asked)", None
    if not args.from_nothing:
        url = args.server.rstrip("/")
        try:
            response = httpx.get(f"{url}/admin/models", headers=admin_headers(), timeout=5)
            response.raise_for_status()
            body = response.json()
            observation = body.get("observed")
            server_config = (body.get("config") or {}).get("path")
            against = f"against {url} ({len((observation or {}).get('workers', []))} worker(s) running)"
        except (httpx.HTTPError, ValueError) as error:
            if args.server_given:
                print(f"cannot read {url}/admin/models: {error}", file=sys.stderr)
                return 2
            against = f"from nothing ({url} is not answering)"
    config = Path(args.config or server_config or paths.default_config_path()).expanduser()
    try:
        document = read_document(config)
    except ConfigError as error:
        print(error.describe(), file=sys.stderr)
        return 1
    print(describe(preview(config, document.state, observation), f"for {config} {against}"))
    return 0


def cmd_schema(_args: argparse.Namespace) -> int:
    import json

    from opta_lmx.state.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmx", description="Opta-LMX: models.yaml in, OpenAI answers out.")
    parser.add_argument("--log-level", default=os.environ.get("LMX_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=["human", "json"], default=os.environ.get("LMX_LOG_FORMAT", "human"),
                        help="control-plane log lines: human (default) or one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway and the control loop")
    serve.add_argument("--config", help="models.yaml (default: the embedded demo in the user config dir)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=1234)
    serve.add_argument("--state-dir", help="where workers' logs and runtime state go")
    serve.add_argument("--log-format", choices=["human", "json"], default=argparse.SUPPRESS,
                       help="same as `lmx --log-format` (human or json)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds a stopping worker gets before SIGKILL")
    serve.add_argument("--load-wait-timeout", type=float, default=120.0,
                       help="how long a request waits for its model to finish loading")
    serve.add_argument("--queue-limit", type=int, default=256,
                       help="requests that may wait per model (loading, or at its concurrency limit) before 429")
    serve.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest request body (413 above)")
    serve.add_argument("--git-commit", action="store_true",
                       default=os.environ.get("LMX_GIT_COMMIT", "").lower() in ("1", "true", "yes"),
                       help="git-commit models.yaml in its repository after every admin API write")
    serve.set_defaults(func=cmd_serve)

    from opta_lmx import client

    client.add_commands(sub)

    check = sub.add_parser("check", help="validate a models.yaml")
    check.add_argument("config", nargs="?")
    check.set_defaults(func=cmd_check)

    plan = sub.add_parser("plan", help="print what the loop would do (memory before/after), without doing it")
    plan.add_argument("--config", help="models.yaml to plan (default: the server's, else the default file)")
    plan.add_argument("--server", help="a running lmx server to plan against (default http://127.0.0.1:1234)")
    plan.add_argument("--from-nothing", action="store_true", help="plan as if nothing were running")
    plan.set_defaults(func=cmd_plan)

    schema = sub.add_parser("schema", help="print the JSON Schema of models.yaml")
    schema.set_defaults(func=cmd_schema)

    logs = sub.add_parser("logs", help="print a model's current worker log")
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("--state-dir", help="the state dir of the lmx serve to look at")
    logs.set_defaults(func=cmd_logs)

    from opta_lmx import doctor, service

    service.add_parser(sub)
    doctor.add_parser(sub)

    dev = sub.add_parser("dev", help="developer tools").add_subparsers(dest="dev_command", required=True)
    make = dev.add_parser("make-model", help="generate a small genuine model for tests and benchmarks")
    make.add_argument("directory")
    make.add_argument("--size", choices=["tiny", "small", "medium"], default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    make.set_defaults(func=cmd_make_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan":
        args.server_given = args.server is not None
        args.server = args.server or "http://127.0.0.1:1234"
    _setup_logging(args.log_level, args.log_format)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The `lmx` commands that need no server: check, plan, schema, logs, dev make-model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opta_lmx import paths


def cmd_logs(args: argparse.Namespace) -> int:
    from opta_lmx.cli import logs

    state_dir = paths.state_dir(args.state_dir)
    log_dir = logs.worker_log_dir(state_dir, state_dir_given=bool(args.state_dir))
    path = logs.model_log_path(args.model, log_dir)
    if path is None or not path.exists():
        print(f"lmx logs: no worker log for `{args.model}` (looked in {log_dir / args.model}); is it loaded? "
              "see GET /admin/models", file=sys.stderr)
        return 1
    try:
        offset = logs.tail(path, args.lines)
        if args.follow:
            logs.follow(path, offset, current=lambda: logs.model_log_path(args.model, log_dir))
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
    from opta_lmx.cli.client import AdminClient, ClientError
    from opta_lmx.reconciler.preview import describe, preview
    from opta_lmx.state.document import ConfigError, read_document

    observation, against, server_config = None, "from nothing (no server asked)", None
    if not args.from_nothing:
        url = args.server.rstrip("/")
        try:
            body = AdminClient.from_settings(url, timeout=5).get_json("/admin/models", accept=())
            observation = body.get("observed")
            server_config = (body.get("config") or {}).get("path")
            against = f"against {url} ({len((observation or {}).get('workers', []))} worker(s) running)"
        except (ClientError, ValueError) as error:
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
    try:
        result = preview(config, document.state, observation, request=args.request)
    except ValueError as error:
        print(f"--request: {error}", file=sys.stderr)
        return 1
    print(describe(result, f"for {config} {against}"))
    return 0


def cmd_schema(_args: argparse.Namespace) -> int:
    import json

    from opta_lmx.state.spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0



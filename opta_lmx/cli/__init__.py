"""`lmx`: the entry point (`opta_lmx.cli:main`), and the only layer that wires concrete parts.

The top layer of the import contracts: serve, the admin client and its commands, service,
doctor and logs live here; only this layer may import the generated-model tools (devmodel).
"""

from __future__ import annotations

import argparse

from opta_lmx import settings
from opta_lmx.cli.commands import cmd_check, cmd_logs, cmd_make_model, cmd_plan, cmd_schema
from opta_lmx.cli.serve import cmd_serve


def add_file_argument(parser: argparse.ArgumentParser, text: str) -> None:
    """`-f FILE` as kubectl has it; `--config` (the older spelling) stays accepted, unlisted."""
    parser.add_argument("-f", "--file", dest="config", metavar="FILE", help=text)
    parser.add_argument("--config", dest="config", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    config = settings.current()
    parser = argparse.ArgumentParser(prog="lmx", description="Opta-LMX: models.yaml in, OpenAI answers out.")
    parser.add_argument("--log-level", default=config.log_level)
    parser.add_argument("--log-format", choices=["human", "json"], default=config.log_format,
                        help="control-plane log lines: human (default) or one JSON object per line")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway and the control loop")
    add_file_argument(serve, "models.yaml to serve (default: the embedded demo in the user config dir)")
    serve.add_argument("--host", default=config.host)
    serve.add_argument("--port", type=int, default=config.port)
    serve.add_argument("--state-dir", help="where workers' logs and runtime state go")
    serve.add_argument("--log-format", choices=["human", "json"], default=argparse.SUPPRESS,
                       help="same as `lmx --log-format` (human or json)")
    serve.add_argument("--grace", type=float, default=10.0, help="seconds a stopping worker gets before SIGKILL")
    serve.add_argument("--load-wait-timeout", type=float, default=120.0,
                       help="how long a request waits for its model to finish loading")
    serve.add_argument("--queue-limit", type=int, default=256,
                       help="requests that may wait per model (loading, or at its concurrency limit) before 429")
    serve.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, help="largest request body (413 above)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="another Host name the server answers to (repeatable; loopback names and the "
                            "bind address always are; also LMX_ALLOWED_HOSTS): see docs/security.md")
    serve.add_argument("--git-commit", action="store_true",
                       default=config.git_commit,
                       help="git-commit models.yaml in its repository after every admin API write")
    serve.add_argument("--git-follow", metavar="REMOTE", default=config.git_follow,
                       help="follow this git remote (fetch, fast-forward only, apply only a commit that "
                            "validates) and push admin edits to it; also LMX_GIT_FOLLOW (docs/fleet.md)")
    serve.add_argument("--git-interval", type=float, default=30.0, metavar="SECONDS",
                       help="how often --git-follow fetches (POST /admin/git/sync fetches at once)")
    serve.add_argument("--fleet-host", default=config.fleet_host, metavar="NAME",
                       help="which of models.yaml's fleet.hosts this server is; also LMX_FLEET_HOST")
    serve.set_defaults(func=cmd_serve)

    from opta_lmx.cli import remote

    remote.add_commands(sub)

    check = sub.add_parser("check", help="validate a models.yaml")
    add_file_argument(check, "models.yaml to validate (default: the user config dir's)")
    check.add_argument("legacy_config", nargs="?", metavar="FILE", help=argparse.SUPPRESS)  # before -f existed
    check.set_defaults(func=cmd_check)

    plan = sub.add_parser("plan", help="print what the loop would do (memory before/after), without doing it")
    add_file_argument(plan, "models.yaml to plan (default: the server's, else the user config dir's)")
    plan.add_argument("--server", help=f"a running lmx server to plan against (default $LMX_SERVER or {config.server_url})")
    plan.add_argument("--from-nothing", action="store_true", help="plan as if nothing were running")
    plan.add_argument("--request", metavar="MODEL",
                      help="plan as if a request asked for this on-demand model now: what it would evict")
    plan.set_defaults(func=cmd_plan)

    schema = sub.add_parser("schema", help="print the JSON Schema of models.yaml")
    schema.set_defaults(func=cmd_schema)

    logs = sub.add_parser("logs", help="print a model's current worker log")
    logs.add_argument("model")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    logs.add_argument("-n", "--lines", type=int, default=50)
    logs.add_argument("--state-dir", help="the state dir of the lmx serve to look at")
    logs.set_defaults(func=cmd_logs)

    from opta_lmx.cli import doctor, pull, service

    pull.add_parser(sub)
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
    if args.command == "check" and args.legacy_config:
        if args.config:
            build_parser().error("lmx check: give the file once, as -f FILE")
        args.config = args.legacy_config
    if args.command == "plan":
        args.server_given = args.server is not None
        args.server = args.server or settings.current().server_url
    from opta_lmx.cli.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    return args.func(args)


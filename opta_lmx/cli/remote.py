"""`lmx get|describe|set|apply|events|status|load|unload|cache`: kubectl-like commands over AdminClient.

They speak only HTTP to a running server (never the files or the engine directly), so the same
commands work against a remote machine: `--server URL` or `LMX_SERVER`, key from `--admin-key`,
`LMX_ADMIN_KEY` or `LMX_ADMIN_KEY_FILE`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from opta_lmx import settings
from opta_lmx.cli.client import AdminClient, ClientError


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient.from_settings(args.server, args.admin_key, args.request_timeout)


def _call(args: argparse.Namespace, method: str, path: str, **kwargs):
    return _client(args).request(method, path, **kwargs)


# -- output -------------------------------------------------------------------------------
def _table(rows: list[list[Any]], header: list[str], indent: str = "") -> str:
    cells = [header] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _size(num: int | None) -> str:
    from opta_lmx.state.quantities import format_size

    return format_size(num) if num else "-"


def _age(since: float | None) -> str:
    if not since:
        return "-"
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def download_line(download: dict) -> str:
    """`mlx-community/x: 6.8 GiB of 16.5 GiB (41%) at 54.6 MiB/s, about 3m left`."""
    done, total, rate = download.get("done_bytes") or 0, download.get("total_bytes"), download.get("rate_bytes_per_s")
    if not total:
        return f"{download['repo_id']}: listing the repo's files"
    text = f"{download['repo_id']}: {_size(done) if done else '0 B'} of {_size(total)} ({100 * done / total:.0f}%)"
    if rate:
        left = max(0, int((total - done) / rate))
        text += f" at {_size(int(rate))}/s, about " + (f"{left // 60}m" if left >= 60 else f"{left}s") + " left"
    return text


def _phase_cell(status: dict) -> str | None:
    """The phase, with the share downloaded while it downloads: `Downloading 41%`."""
    download = status.get("download")
    if download and download.get("total_bytes"):
        return f"{status.get('phase')} {100 * (download.get('done_bytes') or 0) / download['total_bytes']:.0f}%"
    return status.get("phase")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


# -- commands -----------------------------------------------------------------------------
def cmd_get(args: argparse.Namespace) -> int:
    if args.fleet:
        return cmd_get_fleet(args)
    data = _call(args, "GET", "/admin/models").json()
    if args.output == "json":
        _print_json(data)
        return 0
    rows = []
    for model in data["models"]:
        spec, status = model["spec"] or {}, model["status"] or {}
        rows.append([model["name"], spec.get("state", "loaded" if spec else "(removed)"), _phase_cell(status),
                     ",".join(spec.get("aliases", [])) or None, spec.get("priority", 0 if spec else None),
                     _size(status.get("counted_bytes") or status.get("estimated_bytes")),
                     _size(status.get("measured_bytes")), cache_cell(status.get("prefix_cache")),
                     status.get("restarts", 0), _age(status.get("started_at"))])
    print(_table(rows, ["NAME", "DESIRED", "PHASE", "ALIASES", "PRIORITY", "COUNTED", "MEASURED", "CACHE", "RESTARTS",
                        "AGE"]))
    observed = data.get("observed") or {}
    line = fast_start_line(observed.get("engine_start"), observed.get("memory") or {})
    print(f"\ngeneration {data['generation']}, observed {data['observed_generation']}, "
          f"{'converged' if data['converged'] else 'converging'}" + (f"\n{line}" if line else ""))
    return 0


def cmd_get_fleet(args: argparse.Namespace) -> int:
    """`lmx get models --fleet`: every model with the host that runs it (docs/fleet.md), then the hosts."""
    fleet = _call(args, "GET", "/admin/fleet").json()
    if args.output == "json":
        _print_json(fleet)
        return 0
    peers = {p["name"]: p for p in fleet["peers"]}
    local = {m["name"]: (m["status"] or {}).get("phase") for m in _call(args, "GET", "/admin/models").json()["models"]}
    rows = []
    for name, placement in fleet["placements"].items():
        host = placement["host"]
        phase = local.get(name) if host == fleet["host"] else (peers[host]["models"].get(name) if host in peers else None)
        rows.append([name, host or "(none)", phase, placement["reason"]])
    print(_table(rows, ["NAME", "HOST", "PHASE", "WHY"]))
    hosts = [[fleet["host"], "yes", "this host", None]] + [
        [p["name"], "yes" if p["up"] else "no", _age(p["last_ok"]) if p["last_ok"] else "never", p["error"]]
        for p in fleet["peers"]]
    print("\n" + _table(hosts, ["HOST", "UP", "LAST ANSWER", "ERROR"]))
    return 0


def cache_cell(cache: dict | None) -> str | None:
    """A kept prefix cache in a table cell: `24.0 MiB/3` (size/entries)."""
    if not cache:
        return None
    return f"{_size(cache.get('size_bytes')) if cache.get('size_bytes') else '0 B'}/{cache.get('entries', 0)}"


def cache_line(cache: dict) -> str:
    """`24.0 MiB, 3 entries, used 5m ago (in use), key 1a2b...`."""
    age = _age(time.time() - (cache.get("age_seconds") or 0))
    held = ", held by its worker" if cache.get("in_use") else ""
    return (f"{_size(cache.get('size_bytes')) if cache.get('size_bytes') else '0 B'}, {cache.get('entries', 0)} "
            f"entries, last used {age} ago{held} (key {cache.get('key')})")


def fast_start_line(start: dict | None, memory: dict) -> str | None:
    """How workers start and what that costs the budget, or why the fast start yielded."""
    if not start or not start.get("mode"):
        return None
    budget = (f"; budget {_size(memory.get('total_budget_bytes'))}, {_size(memory.get('budget_bytes'))} left for "
              f"workers") if memory.get("total_budget_bytes") else ""
    if start.get("yielded"):
        return f"fast starts yielded: {start['yielded']}{budget}"
    if start["mode"] == "cold":
        return f"workers start cold{budget}"
    what = "worker template" if start["mode"] == "template" else f"{start.get('spares')} waiting spare(s)"
    return (f"fast starts: {what}, {_size(start.get('fixed_bytes'))} counted "
            f"({_size(start.get('measured_bytes'))} measured){budget}")


def cmd_describe(args: argparse.Namespace) -> int:
    model = _call(args, "GET", f"/admin/models/{args.model}").json()
    events = _call(args, "GET", "/admin/events", params={"limit": 1000}).json()["events"]
    events = [e for e in events if e["object"] == args.model][-10:]
    if args.output == "json":
        _print_json(model | {"events": events})
        return 0
    spec, status = model["spec"] or {}, model["status"] or {}
    print(f"Name:     {model['name']}")
    print("Spec:")
    for key, value in spec.items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    print("Status:")
    for key in ("phase", "reason", "message", "pid", "address", "load_seconds", "restarts", "last_error",
                "observed_generation"):
        if status.get(key) is not None:
            print(f"  {key}: {status[key]}")
    if status.get("download"):
        print(f"  download: {download_line(status['download'])}")
    if status.get("prefix_cache"):
        print(f"  prefix cache: {cache_line(status['prefix_cache'])}")
    if status.get("measured_bytes") or status.get("estimated_bytes"):
        print(f"  memory: counted {_size(status.get('counted_bytes'))}, measured {_size(status.get('measured_bytes'))}, "
              f"estimated {_size(status.get('estimated_bytes'))}")
    if status.get("conditions"):
        print("Conditions:")
        print(_table([[c["type"], c["status"], c["reason"], _age(c["last_transition_time"]), c["message"]]
                      for c in status["conditions"]], ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], "  "))
    if events:
        print("Events:")
        print(_table([[e["kind"], e["reason"], _age(e["time"]), e["message"]] for e in events],
                     ["KIND", "REASON", "AGE", "MESSAGE"], "  "))
    return 0


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`a.b=1 c=[x,y] d=null` -> a JSON merge patch; values are read as YAML scalars/flows."""
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe")
    patch: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ClientError(f"`{item}` is not key=value")
        value = yaml.load(raw) if raw.strip() else ""
        node = patch
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ClientError(f"`{key}` sets both a value and a key inside it")
        node[parts[-1]] = value
    return patch


def _wait_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"wait": "ready", "timeout": args.timeout} if args.wait else {}


def _report_write(args: argparse.Namespace, response) -> int:
    data = response.json()
    if args.output == "json":
        _print_json(data)
    else:
        phase = (data.get("status") or {}).get("phase")
        what = f"{data['name']}: " if data.get("name") else ""
        changed = "written" if data.get("changed") else "unchanged"
        print(f"{what}{changed}, generation {data['generation']}" + (f", phase {phase}" if phase else ""))
        if "error" in data:
            print(data["error"]["message"], file=sys.stderr)
    return 0 if response.status_code < 400 else 1


def cmd_set(args: argparse.Namespace) -> int:
    patch = parse_assignments(args.assignments)
    response = _call(args, "PATCH", f"/admin/models/{args.model}", json=patch, params=_wait_params(args),
                     headers={"Content-Type": "application/merge-patch+json"})
    return _report_write(args, response)


def cmd_apply(args: argparse.Namespace) -> int:
    """Validate FILE on the server, show the diff, then replace models.yaml (guarded by ETag)."""
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except OSError as error:
        raise ClientError(f"cannot read {args.file}: {error}") from None
    current = _call(args, "GET", "/admin/desired")
    etag = current.headers.get("etag")
    _call(args, "PUT", "/admin/desired", content=text.encode(), params={"dry_run": "true"},
          headers={"Content-Type": "application/yaml", "If-Match": etag or "*"})
    diff = "".join(difflib.unified_diff(current.text.splitlines(True), text.splitlines(True),
                                        "models.yaml (server)", f"{args.file} (new)"))
    if not diff:
        print("no changes")
        return 0
    print(diff, end="" if diff.endswith("\n") else "\n")
    if args.dry_run:
        return 0
    if not args.yes:
        if not sys.stdin.isatty() or args.file == "-":
            raise ClientError("not replacing without confirmation: pass --yes")
        if input("Replace the desired state with this? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    response = _call(args, "PUT", "/admin/desired", content=text.encode(), params=_wait_params(args),
                     headers={"Content-Type": "application/yaml", "If-Match": etag or "*"})
    return _report_write(args, response)


def cmd_events(args: argparse.Namespace) -> int:
    if not args.follow:
        events = _call(args, "GET", "/admin/events", params={"limit": args.limit}).json()["events"]
        if args.output == "json":
            _print_json(events)
        else:
            for event in events:
                _print_event(event)
        return 0
    try:
        with _client(args).stream_lines("/admin/events", {"follow": "true", "limit": args.limit}) as lines:
            for line in lines:
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    print(json.dumps(event)) if args.output == "json" else _print_event(event)
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def _print_event(event: dict) -> None:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["time"]))
    print(f"{stamp}  {event['kind']:<7}  {event['object']:<16}  {event['reason']:<16}  {event['message']}")


def cmd_status(args: argparse.Namespace) -> int:
    from opta_lmx.state.quantities import format_size

    data = _call(args, "GET", "/admin/status").json()
    if args.output == "json":
        _print_json(data)
        return 0
    memory = data["memory"]
    config = data["config"]
    print(f"generation:  {data['generation']} (observed {data['observed_generation']}), "
          f"{'converged' if data['converged'] else 'converging'}")
    print(f"models.yaml: {config['path']} ({'valid' if config['valid'] else 'INVALID: last good state in force'})")
    if not config["valid"] and config.get("error"):
        print("  " + config["error"]["message"].replace("\n", "\n  "))
    print(f"memory:      budget {format_size(memory['budget_bytes'])} ({memory['budget']}), "
          f"used {format_size(memory['used_bytes'])}, free {format_size(memory['free_bytes'])}; machine "
          f"{format_size(memory['machine']['available_bytes'])} available of "
          f"{format_size(memory['machine']['total_bytes'])}")
    line = fast_start_line(memory.get("engine_start"), memory.get("planner") or {})
    if line:
        print(f"             {line}")
    if data["models"]:
        print(_table([[n, p] for n, p in data["models"].items()], ["MODEL", "PHASE"]))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`lmx cache list` / `lmx cache clear [MODEL]`: the kept prefix caches (docs/reconciler.md)."""
    if args.action == "clear":
        path = "/admin/caches" + (f"/{quote(args.model, safe='')}" if args.model else "")
        data = _call(args, "DELETE", path).json()
        if args.output == "json":
            _print_json(data)
            return 0
        for what in data["removed"]:
            print(f"removed {what}")
        for name in data["in_use"]:
            print(f"kept {name}: a running worker holds it (unload the model first)")
        if not data["removed"] and not data["in_use"]:
            print("no kept prefix cache to remove")
        return 0
    data = _call(args, "GET", "/admin/caches").json()
    if args.output == "json":
        _print_json(data)
        return 0
    rows = [[name, _size(c["size_bytes"]) if c["size_bytes"] else "0 B", c["entries"],
             _age(time.time() - c["age_seconds"]), "yes" if c["in_use"] else "no", c["key"]]
            for name, c in data["caches"].items()]
    print(_table(rows, ["MODEL", "SIZE", "ENTRIES", "LAST USED", "IN USE", "KEY"]) if rows else "no kept prefix caches")
    budgets = data["budgets"]
    used = sum(c["size_bytes"] for c in data["caches"].values())
    print(f"\n{_size(used) if used else '0 B'} of {_size(budgets['total_bytes'])} in all; "
          f"{_size(budgets['per_model_bytes'])} per model" + ("" if budgets["enabled"] else " (kept caches are off)"))
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    response = _call(args, "POST", f"/admin/models/{args.verb}", json={"model_id": args.model, "timeout": args.timeout})
    return _report_write(args, response)


# -- wiring -------------------------------------------------------------------------------
def add_commands(sub) -> None:
    """Add the client subcommands to `lmx`'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help=f"admin API base URL (default $LMX_SERVER or {settings.Settings().server_url})")
    common.add_argument("--admin-key", help="admin key (default $LMX_ADMIN_KEY, else the file $LMX_ADMIN_KEY_FILE)")
    common.add_argument("-o", "--output", choices=["table", "json"], default="table")
    common.add_argument("--request-timeout", type=float, default=3600.0, help=argparse.SUPPRESS)
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--wait", action="store_true", help="block until the change has converged")
    waiting.add_argument("--timeout", type=float, default=300.0, help="seconds --wait may take")

    get = sub.add_parser("get", parents=[common], help="list models with desired state and phase")
    get.add_argument("what", choices=["models"])
    get.add_argument("--fleet", action="store_true", help="each model's host across the fleet, and the hosts")
    get.set_defaults(func=_run(cmd_get))

    describe = sub.add_parser("describe", parents=[common], help="one model's spec, status, conditions, events")
    describe.add_argument("model")
    describe.set_defaults(func=_run(cmd_describe))

    set_ = sub.add_parser("set", parents=[common, waiting], help="edit a model: lmx set MODEL key=value ...")
    set_.add_argument("model")
    set_.add_argument("assignments", nargs="+", metavar="key=value",
                      help="dotted keys (engine.max_tokens=64); YAML values; key=null removes it")
    set_.set_defaults(func=_run(cmd_set))

    apply = sub.add_parser("apply", parents=[common, waiting], help="replace models.yaml, showing the diff first")
    apply.add_argument("-f", "--file", required=True, help="the new models.yaml (- for stdin)")
    apply.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    apply.add_argument("--dry-run", action="store_true", help="validate and show the diff only")
    apply.set_defaults(func=_run(cmd_apply))

    events = sub.add_parser("events", parents=[common], help="recent events (-f to follow)")
    events.add_argument("-f", "--follow", action="store_true")
    events.add_argument("--limit", type=int, default=50)
    events.set_defaults(func=_run(cmd_events))

    status = sub.add_parser("status", parents=[common], help="generation, convergence and memory")
    status.set_defaults(func=_run(cmd_status))

    cache = sub.add_parser("cache", parents=[common], help="kept prefix caches: lmx cache list | clear [MODEL]")
    cache.add_argument("action", choices=["list", "clear"])
    cache.add_argument("model", nargs="?", help="clear: only this model's (default: every cache no worker holds)")
    cache.set_defaults(func=_run(cmd_cache))

    for verb in ("load", "unload"):
        parser = sub.add_parser(verb, parents=[common], help=f"{verb} a model (edits models.yaml and waits)")
        parser.add_argument("model")
        parser.add_argument("--timeout", type=float, default=300.0)
        parser.set_defaults(func=_run(cmd_load), verb=verb)


def _run(command):
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ClientError as error:
            print(f"lmx {args.command}: {error}", file=sys.stderr)
            return 1

    return run

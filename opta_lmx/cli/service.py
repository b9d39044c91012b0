"""`lmx service`: run Opta-LMX as a LaunchAgent (macOS) or a systemd user unit (Linux).

The files are rendered from the package's templates (`launchd/` at the top of the repository, package data of `opta_lmx.launchd` read
through importlib.resources, so an installed wheel has them) with absolute paths (launchd and
systemd have no PATH or cwd worth relying on). Every launchctl/systemctl call goes through
`run_command`, the single subprocess boundary, so tests check the exact command lines and
`--dry-run` prints them instead.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import string
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from opta_lmx import paths, settings
from opta_lmx.cli.service_keys import KEY_FILE_OF, ServiceError, key_file_env, key_value_refusal
from opta_lmx.state.atomic import write_atomic

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; only for annotations

LABEL = "com.opta.lmx"
UNIT_NAME = "opta-lmx.service"
TEMPLATES = resources.files("opta_lmx.launchd")
PLIST_TEMPLATE = TEMPLATES / f"{LABEL}.plist"
UNIT_TEMPLATE = TEMPLATES / UNIT_NAME
THROTTLE_INTERVAL = 10  # seconds between restarts after a crash
PASSED_THROUGH_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT")  # and LMX_CACHE_DIR, LMX_CONFIG_DIR from settings
SERVICE_FILE_MODE = 0o600


@dataclass(frozen=True)
class ServiceSettings:
    """Everything the rendered service needs; all paths absolute."""

    config: Path
    python: Path = field(default_factory=lambda: Path(sys.executable).absolute())
    host: str = settings.DEFAULT_HOST
    port: int = settings.DEFAULT_PORT
    grace: float = 10.0
    state_dir: Path = field(default_factory=paths.state_dir)
    log_dir: Path = field(default_factory=paths.log_dir)
    log_format: str = "human"
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_file(self) -> Path:
        return self.log_dir / "lmx.log"

    @property
    def exit_timeout(self) -> int:
        """Longer than the HTTP drain (grace) plus stopping the workers (grace), with a margin."""
        return int(2 * self.grace + 10)

    def serve_args(self) -> list[str]:
        return ["--file", str(self.config), "--host", self.host, "--port", str(self.port),
                "--grace", f"{self.grace:g}"]

    def environment(self) -> dict[str, str]:
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            "PATH": os.pathsep.join([str(self.python.parent), "/usr/local/bin", "/opt/homebrew/bin",
                                     "/usr/bin", "/bin", "/usr/sbin", "/sbin"]),
            "PYTHONPATH": package_root,  # harmless when installed; needed when run from a checkout
            "PYTHONUNBUFFERED": "1",
            "LMX_STATE_DIR": str(self.state_dir),
            "LMX_LOG_DIR": str(self.log_dir),
        }
        env.update({k: os.environ[k] for k in PASSED_THROUGH_ENV if os.environ.get(k)})  # the hub's, not LMX_*
        config = settings.current()
        env.update({k: v for k, v in (("LMX_CACHE_DIR", config.cache_dir), ("LMX_CONFIG_DIR", config.config_dir)) if v})
        env.update(self.env)
        held = [key for key in KEY_FILE_OF if env.get(key)]
        if held:
            raise ServiceError(key_value_refusal(held[0]))
        return env

    def check_absolute(self) -> None:
        for name in ("config", "python", "state_dir", "log_dir"):
            if not getattr(self, name).is_absolute():
                raise ServiceError(f"{name} must be an absolute path, got {getattr(self, name)}")


# -- rendering (pure) -----------------------------------------------------------------------

def _read_template(template: Path | Traversable) -> bytes:
    try:
        return template.read_bytes()
    except FileNotFoundError:
        raise ServiceError(f"service template {template} not found: this install of Opta-LMX lacks its "
                           "package data; reinstall it (pip install --force-reinstall opta-lmx)") from None


def render_plist(settings: ServiceSettings, template: Path | Traversable = PLIST_TEMPLATE) -> bytes:
    """The LaunchAgent plist: the template with its placeholders filled, re-serialized by plistlib."""
    settings.check_absolute()
    plist = plistlib.loads(_read_template(template))
    replacements = {
        "@PYTHON@": str(settings.python), "@LOG_FORMAT@": settings.log_format,
        "@STATE_DIR@": str(settings.state_dir), "@LOG_FILE@": str(settings.log_file),
    }
    arguments: list[str] = []
    for argument in plist["ProgramArguments"]:
        if argument == "@SERVE_ARGS@":
            arguments.extend(settings.serve_args())
        else:
            arguments.append(replacements.get(argument, argument))
    plist["ProgramArguments"] = arguments
    for key, value in list(plist.items()):
        if isinstance(value, str) and value in replacements:
            plist[key] = replacements[value]
    plist["ThrottleInterval"] = THROTTLE_INTERVAL
    plist["ExitTimeOut"] = settings.exit_timeout
    plist["EnvironmentVariables"] = settings.environment()
    leftover = [v for v in [*arguments, *plist.values()] if isinstance(v, str) and len(v) > 2
                and v.startswith("@") and v.endswith("@")]
    if leftover:
        raise ServiceError(f"unfilled placeholders in {template}: {leftover}")
    return plistlib.dumps(plist, sort_keys=False)


def _systemd_quote(word: str) -> str:
    """Quote one word for ExecStart=/Environment= (systemd's own quoting, not the shell's)."""
    if word and not any(c in word for c in " \t\"'\\$%;"):
        return word
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%")
    return f'"{escaped}"'


def render_unit(settings: ServiceSettings, template: Path | Traversable = UNIT_TEMPLATE) -> str:
    """The systemd user unit text."""
    settings.check_absolute()
    command = [str(settings.python), "-m", "opta_lmx.cli", "--log-format", settings.log_format,
               "serve", *settings.serve_args()]
    environment = "\n".join(
        f"Environment={_systemd_quote(f'{key}={value}')}" for key, value in settings.environment().items()
    )
    return string.Template(_read_template(template).decode()).substitute(
        exec_start=" ".join(_systemd_quote(word) for word in command),
        state_dir=_systemd_quote(str(settings.state_dir)),
        environment=environment,
        throttle=THROTTLE_INTERVAL,
        exit_timeout=settings.exit_timeout,
        log_file=str(settings.log_file),
    )


# -- the subprocess boundary ----------------------------------------------------------------

def run_command(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run launchctl/systemctl. The only place this module starts a process (tests patch it)."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as error:
        raise ServiceError(f"{argv[0]} not found: {error}") from None
    if check and result.returncode != 0:
        raise ServiceError(
            f"`{shlex.join(argv)}` failed with {result.returncode}: {(result.stderr or result.stdout).strip()}"
        )
    return result


# -- platforms ------------------------------------------------------------------------------

class Platform:
    """What install/uninstall/start/stop/status mean on one service manager."""

    name = "?"

    def __init__(self, home: Path | None = None, dry_run: bool = False, out=None):
        self.home = home or Path.home()
        self.dry_run = dry_run
        self.out = out or sys.stdout

    # What each service manager implements (launchd, systemd).
    @property
    def file(self) -> Path:
        raise NotImplementedError

    def install(self, settings: ServiceSettings) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def status(self) -> tuple[bool, str]:
        raise NotImplementedError

    def run(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        if self.dry_run:
            print(f"would run: {shlex.join(argv)}", file=self.out)
            return subprocess.CompletedProcess(argv, 0, "", "")
        return run_command(argv, check=check)

    def write(self, path: Path, content: bytes) -> None:
        if self.dry_run:
            print(f"would write {path}:", file=self.out)
            print(content.decode(), file=self.out)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, content, mode=SERVICE_FILE_MODE)  # it names the key files: the user's alone
        print(f"wrote {path}", file=self.out)

    def remove(self, path: Path) -> None:
        if self.dry_run:
            print(f"would remove {path}", file=self.out)
            return
        if path.exists():
            path.unlink()
            print(f"removed {path}", file=self.out)

    def make_dirs(self, settings: ServiceSettings) -> None:
        if not self.dry_run:
            for directory in (settings.state_dir, settings.log_dir):
                directory.mkdir(parents=True, exist_ok=True)


class Launchd(Platform):
    name = "launchd"

    @property
    def file(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def domain(self) -> str:
        return f"gui/{os.getuid()}"

    @property
    def target(self) -> str:
        return f"{self.domain}/{LABEL}"

    def loaded(self) -> bool:
        return run_command(["launchctl", "print", self.target], check=False).returncode == 0

    def install(self, settings: ServiceSettings) -> None:
        self.make_dirs(settings)
        self.write(self.file, render_plist(settings))
        if self.dry_run or self.loaded():
            self.run(["launchctl", "bootout", self.target], check=False)  # reinstall: replace the old one
            if not self.dry_run:
                self.wait_unloaded(settings.exit_timeout + 5)
        self.run(["launchctl", "bootstrap", self.domain, str(self.file)])

    def wait_unloaded(self, timeout: float) -> None:
        """bootout can return before the job is gone; bootstrapping then fails with error 5."""
        deadline = time.monotonic() + timeout
        while self.loaded():
            if time.monotonic() >= deadline:
                raise ServiceError(f"{LABEL} still loaded {timeout:.0f}s after bootout; "
                                   f"try `launchctl bootout {self.target}` and install again")
            time.sleep(0.5)

    def uninstall(self) -> None:
        self.run(["launchctl", "bootout", self.target], check=False)
        self.remove(self.file)

    def start(self) -> None:
        if not self.file.exists():
            raise ServiceError(f"not installed ({self.file} missing): run `lmx service install` first")
        if not self.dry_run and not self.loaded():
            self.run(["launchctl", "bootstrap", self.domain, str(self.file)])
        self.run(["launchctl", "kickstart", self.target])

    def stop(self) -> None:
        # SIGTERM: lmx drains and exits 0, and KeepAlive{SuccessfulExit=false} leaves it stopped.
        self.run(["launchctl", "kill", "SIGTERM", self.target])

    def status(self) -> tuple[bool, str]:
        result = self.run(["launchctl", "print", self.target], check=False)
        running = result.returncode == 0 and "state = running" in result.stdout
        return running, (result.stdout or result.stderr).strip()


class Systemd(Platform):
    name = "systemd"

    @property
    def file(self) -> Path:
        base = os.environ.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(base) / "systemd" / "user" / UNIT_NAME

    def systemctl(self, *args: str) -> list[str]:
        return ["systemctl", "--user", *args]

    def install(self, settings: ServiceSettings) -> None:
        self.make_dirs(settings)
        self.write(self.file, render_unit(settings).encode())
        self.run(self.systemctl("daemon-reload"))
        self.run(self.systemctl("enable", UNIT_NAME))
        self.run(self.systemctl("restart", UNIT_NAME))

    def uninstall(self) -> None:
        self.run(self.systemctl("disable", "--now", UNIT_NAME), check=False)
        self.remove(self.file)
        self.run(self.systemctl("daemon-reload"), check=False)

    def start(self) -> None:
        self.run(self.systemctl("start", UNIT_NAME))

    def stop(self) -> None:
        self.run(self.systemctl("stop", UNIT_NAME))

    def status(self) -> tuple[bool, str]:
        active = self.run(self.systemctl("is-active", UNIT_NAME), check=False)
        detail = self.run(self.systemctl("status", "--no-pager", UNIT_NAME), check=False)
        return active.stdout.strip() == "active", (detail.stdout or detail.stderr).strip()


def platform_for(system: str | None = None, **kwargs) -> Platform:
    system = system or sys.platform
    if system == "darwin":
        return Launchd(**kwargs)
    if system.startswith("linux"):
        return Systemd(**kwargs)
    raise ServiceError(f"no service manager support on {system}: run `lmx serve` under your own supervisor")


# -- the `lmx service` command --------------------------------------------------------------

def add_parser(sub) -> None:
    service = sub.add_parser("service", help="run Opta-LMX as a login service (launchd or systemd --user)")
    actions = service.add_subparsers(dest="service_command", required=True)
    install = actions.add_parser("install", help="write the service file and start it (again at every login)")
    from opta_lmx.cli import add_file_argument

    add_file_argument(install, "models.yaml the service serves (default: the user config dir's)")
    install.add_argument("--host", default=settings.DEFAULT_HOST)
    install.add_argument("--port", type=int, default=settings.DEFAULT_PORT)
    install.add_argument("--grace", type=float, default=10.0,
                         help="seconds to drain requests, and again to stop workers, on shutdown")
    install.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                         help="extra environment for the service (repeatable)")
    for name, text in [("uninstall", "stop the service and remove its file"), ("start", "start it now"),
                       ("stop", "stop it (cleanly; it stays stopped until start or next login)"),
                       ("status", "is it installed, running, answering?")]:
        actions.add_parser(name, help=text)
    logs = actions.add_parser("logs", help="print the service's own log")
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("-n", "--lines", type=int, default=50)
    for action in actions.choices.values():
        action.add_argument("--dry-run", action="store_true", help="print what would be written and run")
    service.set_defaults(func=cmd_service)


def settings_from_args(args) -> ServiceSettings:
    config = Path(args.config).expanduser().absolute() if args.config else paths.default_config_path().absolute()
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ServiceError(f"--env wants KEY=VALUE, got {item!r}")
        env[key] = value
    env.update(key_file_env(env, os.environ))
    return ServiceSettings(
        config=config, host=args.host, port=args.port, grace=args.grace,
        state_dir=paths.state_dir().absolute(), log_dir=paths.log_dir().absolute(),
        log_format=getattr(args, "log_format", "human"), env=env,
    )


def cmd_service(args) -> int:
    try:
        platform = platform_for(dry_run=args.dry_run)
        action = args.service_command
        if action == "install":
            settings = settings_from_args(args)
            if not settings.config.exists():
                message = (f"no models.yaml at {settings.config}: pass -f FILE, or run "
                           f"`lmx serve` once to create the default")
                if not args.dry_run:
                    raise ServiceError(message)
                print(f"warning: {message}", file=sys.stderr)
            else:
                _warn_if_invalid(settings.config)
            platform.install(settings)
            if not args.dry_run:
                print(f"installed {platform.name} service; it serves http://{settings.host}:{settings.port}/v1")
                print(f"  log: {settings.log_file}   status: lmx service status")
        elif action == "uninstall":
            platform.uninstall()
        elif action == "start":
            platform.start()
        elif action == "stop":
            platform.stop()
        elif action == "status":
            return _status(platform)
        elif action == "logs":
            from opta_lmx.cli import logs

            log_file = paths.log_dir() / "lmx.log"
            if not log_file.exists():
                raise ServiceError(f"no service log yet at {log_file}")
            offset = logs.tail(log_file, args.lines)
            if args.follow:
                logs.follow(log_file, offset)
    except ServiceError as error:
        print(f"lmx service: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _warn_if_invalid(config: Path) -> None:
    """An invalid models.yaml does not stop the service (it waits for a good one), but say so now."""
    from opta_lmx.state.document import ConfigError, read_document

    try:
        read_document(config)
    except ConfigError as error:
        print(f"warning: the service will start with nothing to serve until {config} is fixed:\n"
              f"{error.describe()}", file=sys.stderr)


def _status(platform: Platform) -> int:
    from opta_lmx.state.instance import holder_pid

    installed = platform.file.exists()
    running, detail = platform.status() if installed else (False, "")
    pid = holder_pid(paths.state_dir())
    print(f"service file: {platform.file} ({'installed' if installed else 'not installed'})")
    print(f"{platform.name}: {'running' if running else 'not running'}")
    print(f"control plane on {paths.state_dir()}: {f'pid {pid}' if pid else 'none running'}")
    if detail and platform.dry_run is False:
        print(detail)
    return 0 if running else 3  # 3: not running, as systemctl/LSB status do

"""`lmx doctor`: check what Opta-LMX needs, and say how to fix each problem found.

Every check is a small function returning a Finding, so the command prints one line per
check and exits non-zero only when something is actually wrong (warnings do not fail).
"""

from __future__ import annotations

import platform as _platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from opta_lmx import paths, settings

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass(frozen=True)
class Finding:
    check: str
    level: str  # ok | warn | FAIL
    detail: str
    fix: str = ""


def check_platform(system: str | None = None, machine: str | None = None) -> Finding:
    system = system or sys.platform
    machine = machine or _platform.machine()
    described = f"{system} {machine}, Python {_platform.python_version()}"
    if system == "darwin" and machine == "arm64":
        return Finding("platform", OK, f"{described} (Apple silicon: MLX on Metal)")
    if system == "darwin":
        return Finding("platform", FAIL, f"{described}: MLX needs Apple silicon",
                       "run on an M-series Mac (an Intel Mac cannot run MLX on the GPU)")
    if system.startswith("linux"):
        return Finding("platform", WARN, f"{described}: MLX runs on the CPU here (fine for tests, slow for real models)",
                       "serve real models on an Apple silicon Mac")
    return Finding("platform", FAIL, f"{described}: not supported", "use macOS on Apple silicon (or Linux for tests)")


def check_mlx() -> Finding:
    try:
        import mlx.core as mx
    except Exception as error:  # noqa: BLE001 - any import failure is the finding
        return Finding("mlx", FAIL, f"cannot import mlx.core: {error}",
                       "pip install 'mlx>=0.32,<0.33' (on Linux: 'mlx[cpu]') into this interpreter: "
                       f"{sys.executable}")
    try:
        device = mx.default_device()
        metal = bool(getattr(mx, "metal", None) and mx.metal.is_available())
    except Exception as error:  # noqa: BLE001
        return Finding("mlx", FAIL, f"mlx {getattr(mx, '__version__', '?')} imported but has no device: {error}",
                       "reinstall mlx for this platform")
    detail = f"mlx {getattr(mx, '__version__', '?')}, default device {device}, Metal {'available' if metal else 'not available'}"
    if sys.platform == "darwin" and not metal:
        return Finding("mlx", FAIL, detail, "check that this Python is arm64 (not under Rosetta): "
                       "python -c 'import platform; print(platform.machine())'")
    return Finding("mlx", OK, detail)


def check_memory(min_available: int = 2 * 1024**3) -> Finding:
    from opta_lmx.state.quantities import format_size

    vm = psutil.virtual_memory()
    detail = f"{format_size(vm.total)} physical, {format_size(vm.available)} available"
    if vm.available < min_available:
        return Finding("memory", WARN, detail + " (little headroom for a model)",
                       "close memory-hungry apps, or lower `memory.budget` / unload models in models.yaml")
    return Finding("memory", OK, detail)


def check_config(config: Path) -> Finding:
    from opta_lmx.state.document import ConfigError, read_document

    if not config.exists():
        return Finding("config", WARN, f"no models.yaml at {config}",
                       "run `lmx serve` once to create a default one, or pass -f FILE")
    try:
        document = read_document(config)
    except ConfigError as error:
        return Finding("config", FAIL, f"{config} is invalid:\n{error.describe()}",
                       f"fix the lines named above, then `lmx check -f {config}`")
    return Finding("config", OK, f"{config}: {len(document.state.models)} model(s)")


def check_port(host: str, port: int, state_dir: Path) -> Finding:
    """Free, or held by our own running control plane (then it is fine)."""
    import httpx

    from opta_lmx.state.instance import holder_pid

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return Finding("port", OK, f"{host}:{port} is free")
        except OSError:
            pass
    ours = holder_pid(state_dir)
    try:
        answered = httpx.get(f"http://{host}:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        answered = False
    if ours and answered:
        return Finding("port", OK, f"{host}:{port} is served by lmx (pid {ours})")
    owner = _port_owner(port)
    return Finding("port", FAIL, f"{host}:{port} is in use{f' by {owner}' if owner else ''}",
                   f"stop that process, or serve on another port (`lmx serve --port {port + 1}`)")


def _port_owner(port: int) -> str:
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def check_service(state_dir: Path) -> Finding:
    from opta_lmx.cli.service import ServiceError, platform_for
    from opta_lmx.state.instance import holder_pid

    pid = holder_pid(state_dir)
    running_text = f"lmx serve running (pid {pid})" if pid else "no lmx serve running on this state dir"
    try:
        manager = platform_for()
    except ServiceError as error:
        return Finding("service", WARN, f"{error}; {running_text}")
    if not manager.file.exists():
        return Finding("service", OK, f"not installed as a {manager.name} service; {running_text}",
                       "optional: `lmx service install -f FILE` to start it at login")
    try:
        running, _detail = manager.status()
    except ServiceError as error:
        return Finding("service", WARN, f"{manager.name} service installed, state unknown: {error}")
    if not running:
        return Finding("service", WARN, f"{manager.name} service installed but not running; {running_text}",
                       "`lmx service start`, and `lmx service logs` if it does not stay up")
    return Finding("service", OK, f"{manager.name} service running; {running_text}")


def run_checks(config: Path, host: str, port: int, state_dir: Path) -> list[Finding]:
    return [check_platform(), check_mlx(), check_memory(), check_config(config),
            check_port(host, port, state_dir), check_service(state_dir)]


def add_parser(sub) -> None:
    doctor = sub.add_parser("doctor", help="check the platform, MLX, memory, config, port and service")
    from opta_lmx.cli import add_file_argument

    add_file_argument(doctor, "models.yaml to check (default: the user config dir's)")
    doctor.add_argument("--host", default=settings.DEFAULT_HOST)
    doctor.add_argument("--port", type=int, default=settings.DEFAULT_PORT)
    doctor.add_argument("--state-dir")
    doctor.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    config = Path(args.config).expanduser() if args.config else paths.default_config_path()
    state_dir = paths.state_dir(args.state_dir)
    findings = run_checks(config, args.host, args.port, state_dir)
    for finding in findings:
        print(f"{finding.level:<4} {finding.check:<8} {finding.detail}")
        if finding.fix and finding.level != OK:
            print(f"     {'':<8} fix: {finding.fix}")
    failed = [f for f in findings if f.level == FAIL]
    print(f"\n{len(failed)} problem(s)" if failed else "\nno problems found")
    return 1 if failed else 0

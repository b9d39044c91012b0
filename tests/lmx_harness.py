"""Shared test harness: start a real `lmx serve` on generated models and tear it down cleanly.

Every end-to-end test goes through here, so "no process left behind" is checked for all of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PREPARED_MODULES = ("opta_lmx.engine.worker_main", "opta_lmx.engine.template_main")


def worker_processes(state_dir: Path, waiting: bool = True) -> list[psutil.Process]:
    """Processes started for `state_dir` (they run with HOME under it): vllm-mlx workers, and
    the template and spares that start them fast (engine/prepared.py) and the workers those made.
    `waiting=False` leaves out a template or spare that serves no model (listens on no port)."""
    found = []
    marker = str(state_dir)
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = proc.info["cmdline"] or []
            prepared = any(module in cmdline for module in PREPARED_MODULES)
            distributed = "mlx_lm.server" in cmdline  # a distributed model's ranks (engine/distributed.py)
            if "vllm_mlx.cli" not in cmdline and not prepared and not distributed:
                continue
            if not proc.environ().get("HOME", "").startswith(marker):
                continue
            if prepared and not waiting and not any(
                    c.status == psutil.CONN_LISTEN for c in proc.net_connections(kind="tcp")):
                continue
            found.append(proc)
        except psutil.Error:
            continue
    return found


def lmx_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    # Short-lived test servers start cold unless their models.yaml names a mode (the fast-start
    # tests do): a template or spare each server never uses would double the suite's CPU.
    env.setdefault("LMX_ENGINE_START", "cold")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@dataclass
class Server:
    """A running `lmx serve` subprocess."""

    config: Path
    state_dir: Path
    port: int
    proc: subprocess.Popen
    log_path: Path
    extra_args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base_url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.base_url + path, timeout=60, **kwargs)

    def admin_models(self) -> dict:
        return self.get("/admin/models").json()

    def worker_headers(self, address: str) -> dict[str, str]:
        """What a direct call to a worker needs: the key the control plane gave it (no client key works)."""
        from opta_lmx.engine.worker_auth import read_secret, worker_key

        secret = read_secret(self.state_dir / "workers")
        return {"Authorization": f"Bearer {worker_key(secret, address)}"} if secret else {}

    def worker_get(self, address: str, path: str, **kwargs) -> httpx.Response:
        return httpx.get(address + path, headers=self.worker_headers(address), **kwargs)

    def phases(self) -> dict[str, str]:
        return {m["name"]: (m["status"] or {}).get("phase") for m in self.admin_models()["models"]}

    def wait_for(self, predicate, timeout: float = 90.0, what: str = "condition") -> None:
        """Poll `predicate(self)` until true; fail with the server log otherwise."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"lmx serve exited with {self.proc.returncode}\n{self.log()[-4000:]}")
            try:
                if predicate(self):
                    return
            except (httpx.HTTPError, KeyError, ValueError) as error:
                last_error = error
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what} (last error {last_error!r});\n"
            f"phases: {self._safe_phases()}\n--- server log ---\n{self.log()[-6000:]}"
        )

    def _safe_phases(self):
        try:
            return json.dumps(self.admin_models(), indent=1)[-3000:]
        except Exception as error:  # noqa: BLE001 - diagnostics only
            return repr(error)

    def wait_ready(self, *names: str, timeout: float = 120.0) -> None:
        self.wait_for(lambda s: all(s.phases().get(n) == "Ready" for n in names), timeout, f"{names} Ready")

    def write_config(self, text: str) -> None:
        """Replace models.yaml the way editors do: write a temp file, then rename over it."""
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(config: Path, state_dir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 wait_healthy: bool = True, umask: int | None = None, port: int | None = None) -> Server:
    port = port or free_port()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_dir.parent / f"lmx-serve-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "opta_lmx.cli", "serve", "--config", str(config), "--port", str(port),
         "--state-dir", str(state_dir), "--grace", "5", *extra_args],
        stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env or lmx_env(), cwd=REPO,
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),  # the user's umask, as they start it
    )
    server = Server(config, state_dir, port, proc, log_path, list(extra_args))
    if wait_healthy:
        server.wait_for(lambda s: s.get("/healthz").status_code == 200, 60, "/healthz")
    return server


def stop_and_check(server: Server) -> None:
    """Stop a server and fail if any of its workers outlived it."""
    server.stop()
    leftovers = worker_processes(server.state_dir)
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"worker processes left behind: {[p.pid for p in leftovers]}"

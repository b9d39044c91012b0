"""One model across Macs (docs/fleet.md): MLX's own distributed runtime runs it, not ours.

`mlx.launch --backend ring --hostfile F` starts one rank of `mlx_lm.server` per host (ssh to the
others, as MLX documents it; a host whose ssh name is 127.0.0.1 is started locally), which
loads its shard of the model (`sharded_load`: tensor split, or pipeline split for the models
mlx-lm can pipeline). Rank 0 serves HTTP on the worker's port and is routed to like any worker.
Stopping the worker stops the launcher's process group, and with it every local rank; remote
ranks end with their ssh session (mlx.launch runs them under `ssh -tt`).

What vllm-mlx workers have and these do not (documented in docs/fleet.md): no worker key
(mlx_lm.server has none: its port is bound on loopback of the rank-0 host only), no fast start,
no kept prefix cache, and a control-plane restart stops and restarts it instead of adopting it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx

from opta_lmx.engine.readiness import WorkerStartError
from opta_lmx.engine.worker import Worker, popen

RING_PORT_SPAN = 64  # ports from the starting port the ring may use (one per rank and connection)


def hostfile(ranks: tuple[tuple[str, str], ...]) -> dict:
    """MLX's hostfile (mlx._distributed_utils.common.Hostfile): one host per rank, rank 0 first."""
    return {"backend": "ring", "envs": [], "hosts": [{"ssh": ssh, "ips": [ip]} for ssh, ip in ranks]}


def launcher(python: str) -> list[str]:
    """`mlx.launch` of the interpreter the workers run (installed next to it with mlx)."""
    script = Path(python).parent / "mlx.launch"
    if script.exists():
        return [python, str(script)]
    return [python, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


class DistributedWorker(Worker):
    """A worker whose process is `mlx.launch` running `mlx_lm.server` on every rank."""

    served_as = "default_model"  # mlx_lm.server serves its --model under this name
    fast_starts = False

    def __init__(self, spec, *, ring_port: int | None = None, **options):
        super().__init__(spec, **options)
        self.ring_port = ring_port or _ring_port()

    def command(self, announce_fd: int, listen_fd: int) -> list[str]:
        argv = [*launcher(self._python), "--backend", "ring", "--hostfile", str(self.run_dir / "hostfile.json"),
                "--starting-port", str(self.ring_port), "--cwd", str(self.run_dir), "--",
                self._python, "-m", "mlx_lm.server", "--model", self.spec.source,
                "--host", self.host, "--port", str(self.port)]
        if self.spec.split == "pipeline":
            argv.append("--pipeline")
        return argv

    def api_key(self) -> str | None:
        return None  # mlx_lm.server takes no key

    def _spawn_cold(self) -> None:
        """The launcher, started cold (a template holds vllm-mlx, not mlx.launch: `fast_starts`).
        Its port is released for rank 0 to bind: mlx_lm.server binds its own."""
        (self.run_dir / "hostfile.json").write_text(json.dumps(hostfile(self.spec.ranks)))
        self.close_listener()
        popen(self, self.command(-1, -1))
        threading.Thread(target=self._wait_for_exit, name=f"wait-{self.id}", daemon=True).start()

    async def wait_ready(self, timeout: float) -> None:
        """Ready once rank 0 answers /v1/models (every rank has loaded its shard by then)."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            while True:
                if not self.alive():
                    await asyncio.to_thread(self._exited.wait, 2.0)
                    raise WorkerStartError(f"mlx.launch exited with code {self.returncode} while loading",
                                           permanent=False, log_tail=self.log_tail())
                if await self._answers(client):
                    self.ready_at = time.time()
                    return
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    await self.stop(grace=2.0)
                    raise WorkerStartError(f"distributed worker not ready after {timeout:.0f}s", permanent=False,
                                           log_tail=tail)
                await asyncio.sleep(0.25)

    async def _answers(self, client: httpx.AsyncClient) -> bool:
        try:
            return (await client.get(self.address + "/v1/models")).status_code == 200
        except httpx.HTTPError:
            return False

    async def healthy(self, timeout: float = 2.0) -> bool:
        return False  # never adopted: a control plane that restarts starts it again (module docstring)

    def owns_port(self) -> bool:
        return True


def _ring_port() -> int:
    """A starting port for the ring's connections: a free one, with room after it for every rank."""
    import socket

    for _attempt in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + RING_PORT_SPAN < 65535:
            return port
    return 40000 + os.getpid() % 20000




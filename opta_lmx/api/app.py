"""The FastAPI application: one port for inference and admin."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from opta_lmx.api import dashboard, gateway
from opta_lmx.api import fleet
from opta_lmx.api.admin import gitfollow
from opta_lmx.api.admin import router as admin
from opta_lmx.api.admin.gitfollow import GitFollow
from opta_lmx.api.admin.serving import AdminService, MachineMemory
from opta_lmx.api.auth import KeyAuth, Keys, load_keys
from opta_lmx.api.errors import install_error_handlers
from opta_lmx.api.request_gate import RequestGate
from opta_lmx.api.metrics import HostLabelled, GatewayMetrics, watch_loop_lag
from opta_lmx.engine.memory import machine_memory as probe_machine_memory
from opta_lmx.api.security import MAX_ADMIN_BODY_BYTES, install_request_guard
from opta_lmx.reconciler.controller import Reconciler
from opta_lmx.state.store import ModelsStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewaySettings:
    load_wait_timeout: float = 120.0  # a request waits this long for its model to become Ready
    upstream_timeout: float = 600.0  # longest silence from a worker mid-response
    queue_limit: int = 256  # requests waiting per model before 429
    max_body_bytes: int = 32 * 1024 * 1024
    # The browser-facing edge (api/security.py, docs/security.md).
    bind_host: str = "127.0.0.1"  # its name is a Host the server answers to
    allowed_hosts: tuple[str, ...] = ()  # more Host names (also LMX_ALLOWED_HOSTS)
    cors_origins: tuple[str, ...] = ()  # CORS stays off unless origins are named (also LMX_CORS_ORIGINS)
    max_admin_body_bytes: int = MAX_ADMIN_BODY_BYTES


def create_app(reconciler: Reconciler, settings: GatewaySettings = GatewaySettings(), *,
               store: ModelsStore | None = None, keys: Keys | None = None,
               machine_memory: MachineMemory = probe_machine_memory, git_interval: float = 30.0) -> FastAPI:
    """The app over one loop; `machine_memory` is the (physical, available) probe /admin/memory shows."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # aiohttp rather than httpx: its C HTTP parser halves the CPU per relayed chunk (docs/benchmarks.md).
        # No cookie jar: one client's cookies must never reach another's request.
        app.state.upstream = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=settings.upstream_timeout),
            connector=aiohttp.TCPConnector(limit=0), cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("User-Agent", "Content-Type"),
        )
        loop_task = asyncio.create_task(reconciler.run(), name="reconciler")
        lag_task = asyncio.create_task(watch_loop_lag(app.state.metrics.loop_lag), name="loop-lag")
        follower = app.state.store.git
        app.state.git_follow = GitFollow(follower, reconciler.events, reconciler.nudge, git_interval) \
            if follower is not None else None
        git_task = asyncio.create_task(app.state.git_follow.run(), name="git-follow") if app.state.git_follow else None
        fleet_task = asyncio.create_task(reconciler.fleet.watch(reconciler.nudge), name="fleet-peers") \
            if reconciler.fleet is not None else None
        try:
            yield
        finally:
            log.info("shutting down: stopping every worker")
            lag_task.cancel()
            if git_task is not None:
                git_task.cancel()
                app.state.git_follow.close()
            if fleet_task is not None:
                fleet_task.cancel()
            await reconciler.shutdown()  # stops the loop first (bounded), then every worker
            await asyncio.gather(loop_task, lag_task, return_exceptions=True)
            await app.state.upstream.close()

    app = FastAPI(title="Opta-LMX", version="0.1.0", lifespan=lifespan)
    app.state.reconciler = reconciler
    app.state.settings = settings
    app.state.metrics = GatewayMetrics(reconciler, reconciler.routes)
    reconciler.pass_listeners.append(app.state.metrics.reconcile_duration.observe)
    app.state.traffic = reconciler.routes  # in flight and waiting, per model: the dashboard reads them
    app.state.admission = RequestGate(reconciler, app.state.metrics, queue_limit=settings.queue_limit,
                                    wait_timeout=settings.load_wait_timeout)
    app.state.store = store or ModelsStore(reconciler.config_path)
    app.add_middleware(KeyAuth, keys=keys if keys is not None else load_keys())
    install_request_guard(app, bind_host=settings.bind_host, allowed_hosts=settings.allowed_hosts,
                          cors_origins=settings.cors_origins, max_admin_body=settings.max_admin_body_bytes)
    install_error_handlers(app)
    app.include_router(gateway.router)
    admin.mount(app, AdminService(reconciler, app.state.store, machine_memory))
    app.include_router(gitfollow.router)
    app.include_router(fleet.router)
    app.include_router(dashboard.page)
    app.include_router(dashboard.reads)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        registry = app.state.metrics.registry
        if reconciler.fleet is not None:  # every series says which host it is from
            registry = HostLabelled(registry, reconciler.fleet.me)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app

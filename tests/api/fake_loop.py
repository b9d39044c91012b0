"""A small stand-in for the control loop, behind `ControlLoopView`, for in-process admin API tests.

It reads models.yaml when asked to accept it and (unless told to stall) settles every model in
its desired phase at once, as a loop with instant workers would. No engine, no processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncio
from pathlib import Path

from fastapi import FastAPI

from opta_lmx.api.admin.router import mount
from opta_lmx.api.admin.serving import AdminService
from opta_lmx.api.errors import install_error_handlers
from opta_lmx.reconciler.view import ControlLoopView, LoopHealth
from opta_lmx.state.document import ConfigError, Document, read_document
from opta_lmx.state.spec import DesiredModelState, DesiredState, ModelSpec
from opta_lmx.state.status import ConfigStatus, EventLog, ModelStatus, Phase
from opta_lmx.state.store import ModelsStore

GIB = 1024**3


class FakeLoop:
    def __init__(self, config_path: Path, *, settle: bool = True, running: bool = True):
        self.config_path = config_path
        self.generation = 0
        self.observed_generation = 0
        self.passes = 0
        self.config_status = ConfigStatus(path=str(config_path))
        self.desired: DesiredState | None = None
        self.document: Document | None = None
        self.statuses: dict[str, ModelStatus] = {}
        self.events = EventLog()
        self.unloads_by_reason: dict[str, int] = {}
        self.demand_evictions: dict[tuple[str, str], int] = {}
        self.settle = settle
        self.running = running
        self.nudges = 0
        self.caches: dict[str, dict] = {}  # kept prefix caches, as a test sets them

    def converged(self) -> bool:
        if self.desired is None or self.observed_generation != self.generation:
            return False
        return all(self.statuses.get(m.name, ModelStatus()).phase == self.desired_phase(m)
                   for m in self.desired.models)

    def desired_phase(self, model: ModelSpec) -> Phase:
        return Phase.READY if model.state == DesiredModelState.LOADED else Phase.UNLOADED

    def observation(self) -> dict:
        return {"memory": {"physical_bytes": 16 * GIB, "budget_bytes": 12 * GIB, "reserve_bytes": GIB,
                           "available_bytes": 8 * GIB, "held_bytes": 0},
                "workers": [], "measured_max": {}, "blocked": [], "demand": []}

    def health(self) -> LoopHealth:
        return LoopHealth(running=self.running, last_error=None if self.running else "injected: loop ended")

    def nudge(self) -> None:
        self.nudges += 1

    async def wait_for_change(self, timeout: float) -> None:
        """Statuses of this fake change only in accept_now: a waiter waits its time out."""
        await asyncio.sleep(min(timeout, 0.05))

    def kept_caches(self) -> dict[str, dict]:
        return dict(self.caches)

    async def clear_caches(self, model: str | None) -> tuple[list[str], list[str]]:
        chosen = {name: c for name, c in self.caches.items() if model is None or name == model}
        removed = [f"{name}/{c['key']}" for name, c in chosen.items() if not c["in_use"]]
        self.caches = {n: c for n, c in self.caches.items() if c["in_use"] or n not in chosen}
        return removed, [name for name, c in chosen.items() if c["in_use"]]

    async def accept_now(self) -> int:
        """Read the file like a pass does: a new valid content is a new generation."""
        self.passes += 1
        try:
            document = read_document(self.config_path)
        except ConfigError as error:
            self.config_status = ConfigStatus(path=str(self.config_path), valid=False, error=error.to_dict())
            return self.generation
        if self.document is None or document.etag != self.document.etag:
            self.generation += 1
            self.document, self.desired = document, document.state
        self.config_status = ConfigStatus(path=str(self.config_path), last_good_etag=document.etag)
        if self.settle:
            self.statuses = {m.name: ModelStatus(phase=self.desired_phase(m)) for m in document.state.models}
            self.observed_generation = self.generation
        return self.generation


def admin_app(loop: ControlLoopView, store: ModelsStore, memory=lambda: (16 * GIB, 6 * GIB)) -> FastAPI:
    """Only the admin API, wired as create_app wires it, over `loop`."""
    app = FastAPI()
    install_error_handlers(app)
    mount(app, AdminService(loop, store, memory))
    return app



if TYPE_CHECKING:  # the type checker holds the fake to the view it stands in for (tests/test_types.py)
    _view: ControlLoopView = FakeLoop(Path("models.yaml"))

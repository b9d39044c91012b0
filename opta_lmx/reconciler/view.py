"""What the api layer may read of the control loop, and what it may ask of it.

The admin API and the metrics read the loop through `ControlLoopView` (plus `nudge`, `accept_now`
and `wait_for_change`), the gateway through `GatewayView`; never through the loop's private
members, so the loop can change inside without the api noticing, and api tests can stand in
small fakes (checked against these Protocols by the type checker, tests/test_types.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from opta_lmx.reconciler.fleet import Fleet
from opta_lmx.reconciler.routes import Route, RouteTable
from opta_lmx.state.document import Document
from opta_lmx.state.spec import DesiredState, ModelSpec
from opta_lmx.state.status import ConfigStatus, EventLog, ModelStatus, Phase


@dataclass(frozen=True)
class LoopHealth:
    """Whether the control loop is alive, and what went wrong in its passes."""

    running: bool  # the loop task is running (False before start and after it ended)
    pass_failures: int = 0  # passes that raised (each logged, recorded as an event, retried)
    last_error: str | None = None  # the last pass's exception, or why the loop task ended


class ControlLoopView(Protocol):
    config_path: Path
    observed_generation: int
    passes: int
    events: EventLog

    @property
    def generation(self) -> int: ...

    @property
    def config_status(self) -> ConfigStatus: ...

    @property
    def desired(self) -> DesiredState | None: ...

    @property
    def document(self) -> Document | None: ...

    @property
    def statuses(self) -> Mapping[str, ModelStatus]: ...

    @property
    def unloads_by_reason(self) -> Mapping[str, int]: ...  # workers unloaded so far, by plan.UnloadReason value

    @property
    def demand_evictions(self) -> Mapping[tuple[str, str], int]: ...  # (evicted, the model it was evicted for)

    def converged(self) -> bool: ...

    def desired_phase(self, model: ModelSpec) -> Phase: ...

    def observation(self) -> dict: ...

    def health(self) -> LoopHealth: ...

    def nudge(self) -> None: ...

    async def accept_now(self) -> int: ...

    async def wait_for_change(self, timeout: float) -> None: ...

    def kept_caches(self) -> Mapping[str, dict]: ...  # each model's kept prefix cache on disk, as last read

    async def clear_caches(self, model: str | None) -> tuple[list[str], list[str]]: ...  # (removed, held by a worker)


class GatewayView(Protocol):
    """What the gateway may read of the loop and tell it: where a model's requests go, and that a
    request asked for one."""

    routes: RouteTable
    fleet: Fleet | None  # this host's view of the fleet (fleet.py); None: not a fleet host

    @property
    def statuses(self) -> Mapping[str, ModelStatus]: ...

    @property
    def desired(self) -> DesiredState | None: ...

    def resolve(self, name_or_alias: str) -> ModelSpec | None: ...

    def note_request(self, name: str) -> None: ...

    def route(self, name: str) -> Route | None: ...

    def expects_ready(self, name: str) -> bool: ...

    def worker_alive(self, worker_id: str) -> bool: ...

    def health(self) -> LoopHealth: ...

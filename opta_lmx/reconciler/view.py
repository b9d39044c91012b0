"""What the api layer may read of the control loop, and the one thing it may ask of it: a pass.

The admin API and the metrics read the loop through this typed, read-only view (plus `nudge`
and `accept_now`), never through the loop's private members, so the loop can change inside
without the api noticing, and api tests can stand in a small fake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
    generation: int
    observed_generation: int
    passes: int
    config_status: ConfigStatus
    desired: DesiredState | None
    document: Document | None
    statuses: Mapping[str, ModelStatus]
    events: EventLog
    unloads_by_reason: Mapping[str, int]  # workers unloaded so far, by plan.UnloadReason value
    demand_evictions: Mapping[tuple[str, str], int]  # (evicted model, model it was evicted for) -> count

    def converged(self) -> bool: ...

    def desired_phase(self, model: ModelSpec) -> Phase: ...

    def observation(self) -> dict: ...

    def health(self) -> LoopHealth: ...

    def nudge(self) -> None: ...

    async def accept_now(self) -> int: ...

"""The admin API's logic: read the loop, write models.yaml, wait for convergence; values out.

Reads go through `ControlLoopView` (never the loop's private members) and writes through the
one store; nothing here starts or stops a worker, and nothing here knows about requests or
responses beyond the `Answer` it returns for the router to send.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opta_lmx.api.admin.protocol import edit_error_status, if_match_precondition, invalid_state
from opta_lmx.api.errors import APIError
from opta_lmx.reconciler.view import ControlLoopView
from opta_lmx.state.document import ConfigError, parse_document
from opta_lmx.state.spec import DesiredModelState, DesiredState, MemorySpec
from opta_lmx.state.status import Phase
from opta_lmx.state.store import EditConflict, ModelsStore, PreconditionFailed, Snapshot, WriteResult
from opta_lmx.state.yamledit import EditError

log = logging.getLogger(__name__)

MEMORY_PHASES = {Phase.READY, Phase.LOADING, Phase.DRAINING, Phase.UNLOADING}

MachineMemory = Callable[[], tuple[int, int]]  # (physical bytes, available bytes), injected at app creation


@dataclass
class Answer:
    """What a write answers: 202/200/504/502, a JSON body, and the file's ETag."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    etag: str | None = None


class AdminService:
    """The admin API over one control loop and one models.yaml store."""

    def __init__(self, loop: ControlLoopView, store: ModelsStore, machine_memory: MachineMemory):
        self.loop = loop
        self.store = store
        self.machine_memory = machine_memory

    # -- reads ------------------------------------------------------------------------------
    async def current(self) -> tuple[Snapshot, DesiredState | None]:
        """The file as it is now, and what it means if it is valid (else the loop's last good state).

        Read and parsed in a thread: a huge or hostile file must not stall the gateway's event loop.
        """
        return await asyncio.to_thread(self._read_current)

    def _read_current(self) -> tuple[Snapshot, DesiredState | None]:
        snap = self.store.snapshot()
        accepted = self.loop.document
        if accepted is not None and accepted.etag == snap.etag:
            return snap, accepted.state  # the loop already parsed these very bytes
        if not snap.exists or snap.blank or snap.problem is not None:
            return snap, self.loop.desired  # not an empty desired state: the last good one stays
        try:
            return snap, parse_document(snap.text, str(self.store.path)).state
        except (ConfigError, UnicodeDecodeError):
            return snap, self.loop.desired

    def model_view(self, name: str, state: DesiredState | None) -> dict:
        spec = state.model(name) if state else None
        status = self.loop.statuses.get(name)
        return {
            "name": name,
            "spec": spec.model_dump(mode="json", exclude_unset=True) if spec else None,
            "status": status.model_dump(mode="json") if status else None,
        }

    def overview(self, etag: str) -> dict:
        """What every whole-state answer starts with: where the loop is, and the file it read."""
        return {
            "generation": self.loop.generation,
            "observed_generation": self.loop.observed_generation,
            "converged": self.loop.converged(),
            "etag": etag,
            "config": self.loop.config_status.model_dump(mode="json"),
        }

    async def models(self) -> tuple[dict, str]:
        snap, state = await self.current()
        names = [m.name for m in state.models] if state else []
        names += [n for n in self.loop.statuses if n not in names]
        body = {
            **self.overview(snap.etag),
            "models": [self.model_view(n, state) for n in names],
            "observed": self.loop.observation(),  # what `lmx plan` plans against
        }
        return body, snap.etag

    async def model(self, name: str) -> tuple[dict, str]:
        snap, state = await self.current()
        if (state is None or state.model(name) is None) and name not in self.loop.statuses:
            raise APIError(404, f"no model named `{name}` in models.yaml", "model_not_found")
        return self.model_view(name, state) | {"generation": self.loop.generation, "etag": snap.etag}, snap.etag

    def memory(self, state: DesiredState | None) -> dict:
        """Budget from the desired state, use from the loop's statuses, machine figures from the probe."""
        total, available = self.machine_memory()
        spec = state.memory if state else MemorySpec()
        budget = spec.budget_bytes(total)
        observation = self.loop.observation()
        fixed = observation["memory"].get("fixed_bytes", 0)
        models = []
        used = fixed  # the fast starts' helpers, counted once (docs/reconciler.md, "Memory accounting")
        for name, status in self.loop.statuses.items():
            counted = status.counted_bytes or status.measured_bytes or status.estimated_bytes or 0
            if status.phase in MEMORY_PHASES:
                used += counted
            models.append({"name": name, "phase": status.phase.value, "measured_bytes": status.measured_bytes,
                           "estimated_bytes": status.estimated_bytes, "counted_bytes": status.counted_bytes})
        return {
            "budget_bytes": budget,
            "budget": spec.budget,
            "reserve_bytes": spec.reserve_bytes(),
            "used_bytes": used,
            "free_bytes": max(budget - used, 0),
            "fixed_bytes": fixed,
            "engine_start": observation.get("engine_start"),
            "machine": {"total_bytes": total, "available_bytes": available, "used_bytes": total - available,
                        "percent": round((total - available) / total * 100, 1) if total else 0.0},
            "models": models,
            # What the planner counts (measured bytes or `memory:` overrides, loads at their estimate).
            "planner": observation["memory"],
        }

    async def status(self) -> tuple[dict, str]:
        snap, state = await self.current()
        memory = self.memory(state)
        body = {
            **self.overview(snap.etag),
            "memory": {k: v for k, v in memory.items() if k != "models"},
            "models": {name: s.phase.value for name, s in self.loop.statuses.items()},
        }
        return body, snap.etag

    async def health(self) -> dict:
        """`/admin/health`: each model's phase against what is desired, memory, convergence, the loop."""
        loop = self.loop
        snap, state = await self.current()
        names = [m.name for m in state.models] if state else []
        names += [n for n in loop.statuses if n not in names]
        models = []
        for name in names:
            spec = state.model(name) if state else None
            status = loop.statuses.get(name)
            models.append({"name": name, "phase": status.phase.value if status else None,
                           "desired": spec.state.value if spec else None,
                           "desired_phase": loop.desired_phase(spec).value if spec else Phase.UNLOADED.value})
        health = loop.health()
        converged = loop.converged()
        valid = loop.config_status.valid and snap.problem is None
        verdict = "ok" if health.running and converged and valid else (
            "converging" if health.running and valid else "degraded")
        return {
            "status": verdict,
            "models": models,
            "memory": loop.observation()["memory"],
            "convergence": {"generation": loop.generation, "observed_generation": loop.observed_generation,
                            "converged": converged},
            "loop": {"running": health.running, "pass_failures": health.pass_failures,
                     "last_error": health.last_error},
            "config": loop.config_status.model_dump(mode="json") | ({"file_error": snap.problem} if snap.problem else {}),
            "etag": snap.etag,
        }

    def readiness(self) -> dict:
        """Ready once the loop runs, a valid desired state is in force and every model is as desired."""
        loop = self.loop
        reasons = []
        health = loop.health()
        if not health.running:
            reasons.append("the control loop is not running" + (f": {health.last_error}" if health.last_error else ""))
        if loop.desired is None:
            reasons.append("no valid models.yaml accepted yet")
        elif not loop.converged():
            pending = {}
            for n, s in loop.statuses.items():
                spec = loop.desired.model(n)
                if spec is None or s.phase != loop.desired_phase(spec):
                    pending[n] = s.phase.value
            reasons.append(f"converging: {pending}" if pending else "converging")
        return {"ready": not reasons, "generation": loop.generation,
                "observed_generation": loop.observed_generation, "reasons": reasons}

    # -- writes -----------------------------------------------------------------------------
    async def write(self, endpoint: str, mutate: Callable | None = None, *, text: str | None = None,
                    if_match: str | None = None, dry_run: bool = False, create: bool = False,
                    subject: str | Callable[[], str] = "config") -> tuple[WriteResult, int]:
        """Edit models.yaml (or replace it with `text`), then have the loop accept it now.

        `if_match` (an If-Match header) guards the write: 412 if it names an older version. An edit
        of a missing or blank file is refused (409) unless `create` (`?create=true`).
        """
        precondition = if_match_precondition(if_match)
        try:
            if text is not None:
                result = await asyncio.to_thread(self.store.replace, text, precondition=precondition,
                                                 endpoint=endpoint, dry_run=dry_run)
            else:
                assert mutate is not None, "an edit without a new text needs a change to make"
                result = await asyncio.to_thread(self.store.edit, mutate, precondition=precondition,
                                                 endpoint=endpoint, dry_run=dry_run, create=create)
        except PreconditionFailed as error:
            raise APIError(412, f"models.yaml changed since you read it (If-Match {if_match}, now "
                                f"{error.current}); nothing was written: read it again and retry",
                           "etag_mismatch", headers={"ETag": error.current},
                           extra={"current_etag": error.current}) from None
        except ConfigError as error:
            raise invalid_state(error) from None
        except EditError as error:
            raise APIError(edit_error_status(error), error.message, error.code) from None
        except EditConflict as error:
            raise APIError(409, str(error), "edit_conflict") from None
        except (RecursionError, OverflowError, ValueError) as error:  # input a validator could not take
            raise APIError(422, f"the result cannot be validated, so nothing was written: "
                                f"{type(error).__name__}: {str(error)[:200]}", "invalid_desired_state") from None
        if dry_run:
            return result, self.loop.generation
        if result.changed:
            about = subject() if callable(subject) else subject  # a model's name shows in `lmx describe`
            self.loop.events.record(about, "AdminEdit", f"{result.summary} (via {endpoint})")
            if result.commit_error:
                self.loop.events.record("config", "GitCommitFailed", result.commit_error, kind="Warning")
        try:
            async with asyncio.timeout(30):
                generation = await self.loop.accept_now()
        except Exception:  # noqa: BLE001 - the write stands; the loop will pick it up by itself
            log.exception("reconcile after an admin write failed")
            self.loop.nudge()
            generation = self.loop.generation
        return result, generation

    def settled(self, name: str | None, generation: int) -> bool | str:
        """True when the loop has seen `generation` and `name` (or everything) is as desired.

        A string instead says the wait is hopeless (the model failed permanently).
        """
        loop = self.loop
        if loop.observed_generation < generation:
            return False
        if name is None:
            return loop.converged()
        spec = loop.desired.model(name) if loop.desired else None
        status = loop.statuses.get(name)
        if spec is None:
            return status is None or status.phase == Phase.UNLOADED
        want = loop.desired_phase(spec)
        phase = status.phase if status else (Phase.UNLOADED if spec.state != DesiredModelState.LOADED else None)
        if phase == want:
            return True
        if phase in (Phase.FAILED, Phase.UNSCHEDULABLE) and want == Phase.READY:
            return f"{phase.value}: {status.message or status.last_error}" if status else phase.value
        return False

    async def wait(self, name: str | None, generation: int, timeout: float) -> bool | str:
        """Until settled or `timeout`: woken each time the loop writes statuses (after every pass,
        and as a model becomes Ready or fails between passes), never by a timer of its own."""
        deadline = time.monotonic() + timeout
        while True:
            outcome = self.settled(name, generation)
            remaining = deadline - time.monotonic()
            if outcome is not False or remaining <= 0:
                return outcome
            await self.loop.wait_for_change(remaining)

    async def answer(self, result: WriteResult, generation: int, name: str | None, timeout: float | None,
                     *, extra: dict | None = None) -> Answer:
        """202 with the generation, or (waiting) 200 once settled, 504 on timeout, 502 if it failed."""
        status_code, problem = 202, None
        if timeout is not None:
            outcome = await self.wait(name, generation, timeout)
            if outcome is True:
                status_code = 200
            elif outcome is False:
                status_code = 504
                problem = (f"not settled within {timeout:g}s (generation {generation}, observed "
                           f"{self.loop.observed_generation}); the edit is written and the loop keeps converging")
            else:
                status_code = 502
                problem = f"the edit is written (generation {generation}) but the model did not come up: {outcome}"
        body: dict[str, Any] = self.model_view(name, result.state) if name is not None else {}
        body.update({
            "generation": generation,
            "observed_generation": self.loop.observed_generation,
            "converged": self.loop.converged(),
            "etag": result.etag,
            "changed": result.changed,
        })
        if result.commit:
            body["git_commit"] = result.commit
        if result.commit_error:
            body["git_error"] = result.commit_error
        body.update(extra or {})
        if problem is not None:
            timed_out = status_code == 504
            body["error"] = {"message": problem, "type": "timeout_error" if timed_out else "api_error",
                             "param": None, "code": "wait_timeout" if timed_out else "model_failed"}
        return Answer(status_code, body, result.etag)

"""Which fast start the pool uses: the worker template (Linux), waiting spares, or none (cold).

The loop hands over what it chose every pass (`configure`: models.yaml's `engine_start`, or cold
where the budget cannot hold the helpers, reconciler/starts.py), which also restarts a template
or refills spares that died. What the helpers hold is measured (`memory`) for the memory plan.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from opta_lmx.engine.announce import PreparedStart
from opta_lmx.engine.memory import process_bytes, tree_bytes
from opta_lmx.engine.spare import SpareWorkers, worker_environment
from opta_lmx.engine.template import TemplateError, WorkerTemplate, fork_supported
from opta_lmx.state.spec import EngineStart

log = logging.getLogger(__name__)

TEMPLATE, SPARE, COLD = "template", "spare", "cold"


def resolve_mode(mode: str) -> str:
    """`auto` (and `template` where fork is unsafe) to the start this platform uses."""
    if mode == "auto":
        return TEMPLATE if fork_supported() else SPARE
    if mode == TEMPLATE and not fork_supported():
        log.warning("engine_start: template needs Linux; using spares")
        return SPARE
    return mode


@dataclass(frozen=True)
class HelperMemory:
    """What the fast starts hold now, as measured (the plan's rules: reconciler/starts.py)."""

    mode: str = COLD  # what runs now: template, spare or cold
    waiting: int = 0  # helper processes that could start a worker now
    starting: int = 0  # helper processes still importing or warming up
    waiting_bytes: int = 0  # what the waiting ones hold (a template: itself, not its children)
    starting_bytes: int = 0  # what the starting ones hold, with their warm-up children
    forked_workers: int = 0  # live workers forked from a template (they share its pages)
    orphan_forked: int = 0  # ...of a template that is no longer the running one

    def to_dict(self) -> dict:
        return asdict(self)


def _bytes(pid: int | None, *, tree: bool) -> int:
    if pid is None:
        return 0
    try:
        return (tree_bytes(pid) or 0) if tree else process_bytes(psutil.Process(pid), private=False)
    except psutil.Error:
        return 0


class PreparedStarts:
    """The pool's template or spares, created, swapped and closed as `engine_start` says."""

    def __init__(self, run_dir: Path, worker_env: dict[str, str] | None = None, *,
                 warm_up_model: Path | None = None, python: str = sys.executable):
        self.run_dir = Path(run_dir)
        self._env = worker_environment(worker_env)
        self.warm_up_model = warm_up_model
        self._python = python
        self.mode = COLD  # until the loop has read models.yaml
        self._spares_count = 0
        self.template: WorkerTemplate | None = None
        self.spares: SpareWorkers | None = None
        self._closed = False

    def configure(self, wanted: EngineStart | None) -> None:
        """Apply models.yaml's choice (idempotent); restart a dead template, refill spares."""
        if self._closed:
            return
        wanted = wanted or EngineStart()
        mode = resolve_mode(wanted.mode)
        if mode != self.mode or (mode == SPARE and wanted.spares != self._spares_count):
            log.info("engine start: %s%s", mode, f" ({wanted.spares} spare(s))" if mode == SPARE else "")
            self._stop_current()
            self.mode, self._spares_count = mode, wanted.spares
        try:
            if self.mode == TEMPLATE:
                if self.template is None:
                    self.template = WorkerTemplate(self.run_dir / "template", self._env, python=self._python,
                                                   warm_up_model=self.warm_up_model)
                self.template.ensure()
            elif self.mode == SPARE and self.spares is None:
                # Once: SpareWorkers refills by itself, after a taken spare's worker serves (so
                # the refill's imports do not slow that load) and when a waiting one dies.
                self.spares = SpareWorkers(self.run_dir / "spares", self._env, count=self._spares_count,
                                           python=self._python, warm_up_model=self.warm_up_model)
                self.spares.fill()
        except (OSError, TemplateError) as error:
            log.warning("could not prepare fast starts (workers start cold): %s", error)

    def take(self, env: dict[str, str]) -> PreparedStart | None:
        """What to start a worker with this environment through, or None (start it cold)."""
        if self.template is not None and self.template.suits(env):
            return self.template
        if self.spares is not None:
            return self.spares.take(env)
        return None

    def pids(self) -> list[int]:
        """The processes waiting now (the template, or the spares)."""
        if self.template is not None and self.template.alive() and self.template.pid:
            return [self.template.pid]
        if self.spares is not None:
            return [s.pid for s in self.spares.spares() if s.pid and s.alive()]
        return []

    def memory(self) -> HelperMemory:
        """What the template or spares hold now (reads /proc: call it off the event loop)."""
        template, spares = self.template, self.spares
        if template is not None and template.alive():
            if template.waiting.is_set():  # itself only: its children are the workers it forked
                return HelperMemory(TEMPLATE, waiting=1, waiting_bytes=_bytes(template.pid, tree=False))
            return HelperMemory(TEMPLATE, starting=1, starting_bytes=_bytes(template.pid, tree=True))
        if spares is not None:
            alive = [s for s in spares.spares() if s.alive()]
            ready = [s for s in alive if s.waiting]
            return HelperMemory(SPARE, waiting=len(ready), starting=len(alive) - len(ready),
                                waiting_bytes=sum(_bytes(s.pid, tree=True) for s in ready),
                                starting_bytes=sum(_bytes(s.pid, tree=True) for s in alive if s not in ready))
        return HelperMemory(self.mode if self.mode != TEMPLATE else COLD)

    def template_id(self) -> str | None:
        """The running template's id (workers forked from another one are its orphans)."""
        return self.template.id if self.template is not None and self.template.alive() else None

    def _stop_current(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None
        if self.spares is not None:
            self.spares.close()
            self.spares = None

    def close(self) -> None:
        """Stop the template or spares and start no more (the workers they started stay)."""
        self._closed = True
        self._stop_current()

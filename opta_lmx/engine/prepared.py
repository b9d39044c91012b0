"""Which fast start the pool uses: the worker template (Linux), waiting spares, or none (cold).

models.yaml's `engine_start` chooses (state/spec.py `EngineStart`); the loop hands it over every
pass (`configure`), which also restarts a template or refills spares that died. What the chosen
start holds while it waits is measured (`fixed_bytes`) so the memory plan counts it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import psutil

from opta_lmx.engine.announce import PreparedStart
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


def process_bytes(pid: int | None) -> int:
    """What a waiting process holds: PSS on Linux (its shared pages split fairly), else USS."""
    if pid is None:
        return 0
    try:
        info = psutil.Process(pid).memory_full_info()
    except psutil.Error:
        return 0
    return int(getattr(info, "pss", 0) or getattr(info, "uss", 0))


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
        self._most_bytes = 0  # the most the waiting process(es) were measured at, this mode

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

    def fixed_bytes(self) -> int:
        """What the template or the spares hold (the most measured in this mode), for the plan."""
        now = sum(process_bytes(pid) for pid in self.pids())
        self._most_bytes = max(self._most_bytes, now)
        return self._most_bytes

    def _stop_current(self) -> None:
        if self.template is not None:
            self.template.close()
            self.template = None
        if self.spares is not None:
            self.spares.close()
            self.spares = None
        self._most_bytes = 0

    def close(self) -> None:
        """Stop the template or spares and start no more (the workers they started stay)."""
        self._closed = True
        self._stop_current()

"""models.yaml in: read and validated off the event loop, accepted as a generation, or refused
with the last good state kept live.

Reading and validating run in a thread (issue 12), so a huge or hostile file never stalls the
gateway; past READ_TIMEOUT the pass goes on with the last good state. An accepted change of the
file's bytes bumps the generation; a refused file changes nothing and says where it is broken.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from opta_lmx.state.document import ConfigError, Document, FieldProblem, read_document
from opta_lmx.state.spec import DesiredState
from opta_lmx.state.status import ConfigStatus, EventLog

log = logging.getLogger(__name__)

# Past this the pass goes on with the last good state (the read is not abandoned: a thread cannot
# be killed, and the file's own limits bound it).
READ_TIMEOUT = 30.0


class ConfigIntake:
    """The desired state in force: the last accepted document, its generation, and the file's status."""

    def __init__(self, config_path: Path, events: EventLog, clock: Callable[[], float]):
        self.config_path = Path(config_path)
        self.events = events
        self.clock = clock
        self.document: Document | None = None
        self.desired: DesiredState | None = None
        self.generation = 0
        self.status = ConfigStatus(path=str(self.config_path))

    async def read(self) -> bool:
        """Accept models.yaml as a new generation if it changed (True); a bad file leaves the last
        good state live, says why in status and events, and returns False."""
        try:
            try:
                async with asyncio.timeout(READ_TIMEOUT):  # not wait_for: on 3.11 it can swallow a cancel
                    document = await asyncio.to_thread(read_document, self.config_path)
            except TimeoutError:
                raise ConfigError(str(self.config_path), [FieldProblem(
                    "", f"reading the file took longer than {READ_TIMEOUT:.0f}s", None, None)]) from None
        except ConfigError as error:
            self._refused(error)
            return False
        changed = self.document is None or document.etag != self.document.etag
        if changed:
            self.generation += 1
            self.events.record("config", "ConfigAccepted",
                               f"generation {self.generation} ({len(document.state.models)} models)")
            log.info("models.yaml accepted as generation %d", self.generation)
            self.document, self.desired = document, document.state
        self.status = ConfigStatus(path=str(self.config_path), valid=True, last_good_etag=document.etag,
                                   checked_at=self.clock())
        return changed

    def _refused(self, error: ConfigError) -> None:
        if self.status.valid or self.status.error != error.to_dict():
            if error.kind == "incomplete":  # a file being written (truncated, then filled): not "no models"
                log.info("models.yaml is empty for now; the last good state stays live")
                self.events.record("config", "ConfigIncomplete", error.describe())
            else:
                log.error("models.yaml rejected; the last good state stays live:\n%s", error.describe())
                self.events.record("config", "InvalidConfig", error.describe(), kind="Warning")
        self.status = ConfigStatus(path=str(self.config_path), valid=False, error=error.to_dict(),
                                   last_good_etag=self.document.etag if self.document else None,
                                   checked_at=self.clock())

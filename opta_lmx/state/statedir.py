"""The state directory must be a directory this process can write, checked once at start-up.

Worker records, the instance lock and the logs all live there; finding out that it is read-only
from a traceback deep in the first record write (or the lock) helps nobody, so `lmx serve`
checks it first and says in one line what is wrong.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


class StateDirError(Exception):
    """The state directory cannot be created or written; the message says which and how to fix it."""


def prepare_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` if needed and prove it writable (a file is created and removed in it)."""
    state_dir = Path(path)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=state_dir, prefix=".lmx-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise StateDirError(f"state dir {state_dir} is not a writable directory ({reason}); make it "
                            "writable (or free space on its disk), or pass another --state-dir") from None
    return state_dir

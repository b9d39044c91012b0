"""Log output: the control plane's own format (human or JSON), and reading a model's worker log.

Human lines for a terminal; one JSON object per line for log shippers (`--log-format json`).
Each worker process writes its own file (<log dir>/<model>/<worker id>.log); `lmx logs MODEL`
finds the current one through the worker records and follows the model across workers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

HUMAN_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (unix seconds), time (ISO 8601 UTC), level, logger, msg."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "human") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(HUMAN_FORMAT, datefmt="%H:%M:%S"))
    handler._lmx = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, "_lmx", False)]
    if len(ours) == len(root.handlers):  # like basicConfig: leave a host's handlers (pytest's) alone
        for old in ours:
            root.removeHandler(old)
        root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.getLogger("httpx").setLevel(logging.WARNING)


def uvicorn_log_config(fmt: str) -> dict | None:
    """uvicorn's own loggers in the same format (None keeps uvicorn's default human output)."""
    if fmt != "json":
        return None
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "opta_lmx.cli.logs.JsonFormatter"}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
    }


from opta_lmx.state.worker_logs import model_log_path, tail  # noqa: E402,F401 (re-exported for lmx logs)


def worker_log_dir(state_dir: Path, state_dir_given: bool) -> Path:
    """Where workers' logs go: LMX_LOG_DIR, else beside an explicit --state-dir, else the user log dir."""
    from opta_lmx import paths, settings

    if settings.current().log_dir:
        return paths.log_dir() / "workers"
    if state_dir_given:
        return state_dir / "logs"
    return paths.log_dir() / "workers"


def follow(path: Path, offset: int, out=None, poll: float = 0.5, until=None, current=None) -> None:
    """Print what is appended to `path` from `offset`, like `tail -F`: when the file is rotated,
    finish the old one (it stays open) and go on with the new one from its start.

    `current()`, if given, names the file to follow now (a model's newest worker's log): when it
    names another file, the old one is finished and the new one followed from its start, so a
    model's log reads as one stream across swaps and restarts."""
    out = out or sys.stdout
    handle = None
    try:
        while until is None or not until():
            newer = current() if current is not None else None
            if newer is not None and newer != path:
                if handle is not None:
                    rest = handle.read()
                    if rest:
                        out.write(rest.decode("utf-8", "replace"))
                        out.flush()
                    handle.close()
                out.write(f"==> {newer} <==\n")
                handle, path, offset = None, newer, 0
            if handle is None:
                try:
                    handle = open(path, "rb")
                    handle.seek(offset)
                except FileNotFoundError:
                    time.sleep(poll)
                    continue
            data = handle.read()
            if data:
                out.write(data.decode("utf-8", "replace"))
                out.flush()
            try:
                info = path.stat()
                replaced = info.st_ino != os.fstat(handle.fileno()).st_ino
                truncated = info.st_size < handle.tell()
            except FileNotFoundError:
                replaced, truncated = False, False
            if replaced or truncated:
                if replaced:
                    rest = handle.read()  # whatever the old file got after our last read
                    if rest:
                        out.write(rest.decode("utf-8", "replace"))
                        out.flush()
                handle.close()
                handle, offset = None, 0
                continue
            time.sleep(poll)
    finally:
        if handle is not None:
            handle.close()

"""Reading small files the control plane does not control (a model's config.json, a worker
record) without ever blocking: a FIFO, a device or a link to one is refused before any read."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class UnreadableFile(ValueError):
    """A file that is not a regular file under its size cap, or cannot be opened or read."""


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, None if it does not exist (a dangling link is UnreadableFile).

    Opened with O_NONBLOCK, so a FIFO with no writer does not wait; refused by its type (fstat)
    before a byte is read, so /dev/zero is never read; refused past `limit` bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        if Path(path).is_symlink():
            raise UnreadableFile(f"{Path(path).name} is a dangling link") from None
        return None
    except (OSError, ValueError) as error:
        raise UnreadableFile(f"cannot open {Path(path).name}: {getattr(error, 'strerror', None) or error}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{Path(path).name} is not a regular file")
        if info.st_size > limit:
            raise UnreadableFile(f"{Path(path).name} is {info.st_size} bytes, over its limit of {limit}")
        chunks, size = [], 0
        while chunk := os.read(fd, 1024 * 1024):
            size += len(chunk)
            if size > limit:
                raise UnreadableFile(f"{Path(path).name} is over its limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise UnreadableFile(f"cannot read {Path(path).name}: {error.strerror or error}") from None
    finally:
        os.close(fd)

"""Sizes and durations as people write them in models.yaml (`600MiB`, `75%`, `30m`)."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: int | float | str) -> int:
    """Bytes from `600MiB`, `48GiB`, `1.5GB` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string like 48GiB")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return int(value)
    match = _SIZE_RE.match(value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size; write it like 600MiB, 48GiB or 2GB")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(num_bytes: int | float | None) -> str:
    """The short binary form used in messages: 1.5 GiB, 600 MiB."""
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration(value: int | float | str) -> float:
    """Seconds from `30m`, `1h30m`, `90s`, `500ms` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be seconds or a string like 30m")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    text = value.strip().replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    for match in _DURATION_RE.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text):
        raise ValueError(f"{value!r} is not a duration; write it like 30m, 1h or 90s")
    return total

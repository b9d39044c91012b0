"""Sizes and durations as people write them in models.yaml (`600MiB`, `75%`, `30m`).

Every parser here is total: a value is either in range or a ValueError, never an
OverflowError, an infinity or a number so large that later arithmetic breaks.
"""

from __future__ import annotations

import math
import re

MAX_BYTES = 2**63  # the largest size accepted anywhere (8 EiB)
MAX_SECONDS = 10**9  # the longest duration accepted (about 31 years)
_MAX_TEXT = 64  # a size or duration written as text is never longer than this

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
_SIZE_RE = re.compile(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([a-zA-Z]{0,3})\s*")
_DURATION_RE = re.compile(r"(\d{1,20}(?:\.\d{1,20})?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _finite_number(value: int | float, what: str, limit: float) -> float:
    """`value` as a float in [0, limit], or a ValueError (also for huge ints and NaN)."""
    if isinstance(value, int) and abs(value) > limit:
        raise ValueError(f"{what} is too large (at most {limit:.0f})")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number")
    if number < 0:
        raise ValueError(f"{what} cannot be negative")
    if number > limit:
        raise ValueError(f"{what} is too large (at most {limit:.0f})")
    return number


def parse_size(value: int | float | str) -> int:
    """Bytes from `600MiB`, `48GiB`, `1.5GB` or a plain number of bytes (at most 2^63)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("a size must be a number of bytes or a string like 48GiB")
    if isinstance(value, (int, float)):
        return int(_finite_number(value, "a size", MAX_BYTES))
    match = _SIZE_RE.fullmatch(value) if len(value) <= _MAX_TEXT else None
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        shown = value if len(value) <= _MAX_TEXT else value[:_MAX_TEXT] + "..."
        raise ValueError(f"{shown!r} is not a size; write it like 600MiB, 48GiB or 2GB")
    number = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    return int(_finite_number(number, "a size", MAX_BYTES))


def format_size(num_bytes: int | float | None) -> str:
    """The short binary form used in messages: 1.5 GiB, 600 MiB (never raises)."""
    if num_bytes is None:
        return "-"
    try:
        value = float(num_bytes)
    except (OverflowError, TypeError, ValueError):
        return "huge" if isinstance(num_bytes, int) else "?"
    if not math.isfinite(value):
        return "?"
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_duration(value: int | float | str) -> float:
    """Seconds from `30m`, `1h30m`, `90s`, `500ms` or a plain number of seconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("a duration must be seconds or a string like 30m")
    if isinstance(value, (int, float)):
        return _finite_number(value, "a duration", MAX_SECONDS)
    if len(value) > _MAX_TEXT:
        raise ValueError(f"{value[:_MAX_TEXT]!r}... is not a duration; write it like 30m, 1h or 90s")
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
    return _finite_number(total, "a duration", MAX_SECONDS)

"""Where Opta-LMX keeps things: platformdirs conventions, each overridable (see settings)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from opta_lmx import settings

APP = "opta-lmx"


def _given_or(value: str | None, default: str) -> Path:
    return Path(value or default).expanduser()


def config_dir() -> Path:
    return _given_or(settings.current().config_dir, platformdirs.user_config_dir(APP))


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """`override` (a --state-dir flag) if given, else LMX_STATE_DIR, else the platform's default."""
    if override:
        return Path(override).expanduser()
    return _given_or(settings.current().state_dir, platformdirs.user_state_dir(APP))


def cache_dir() -> Path:
    return _given_or(settings.current().cache_dir, platformdirs.user_cache_dir(APP))


def log_dir() -> Path:
    return _given_or(settings.current().log_dir, platformdirs.user_log_dir(APP))


def default_config_path() -> Path:
    return config_dir() / "models.yaml"

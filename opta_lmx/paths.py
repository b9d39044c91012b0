"""Where Opta-LMX keeps things: platformdirs conventions, each overridable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "opta-lmx"


def _env_or(variable: str, default: str) -> Path:
    return Path(os.environ.get(variable) or default).expanduser()


def config_dir() -> Path:
    return _env_or("LMX_CONFIG_DIR", platformdirs.user_config_dir(APP))


def state_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """`override` (a --state-dir flag) if given, else LMX_STATE_DIR, else the platform's default."""
    if override:
        return Path(override).expanduser()
    return _env_or("LMX_STATE_DIR", platformdirs.user_state_dir(APP))


def cache_dir() -> Path:
    return _env_or("LMX_CACHE_DIR", platformdirs.user_cache_dir(APP))


def log_dir() -> Path:
    return _env_or("LMX_LOG_DIR", platformdirs.user_log_dir(APP))


def default_config_path() -> Path:
    return config_dir() / "models.yaml"

"""Every default and every `LMX_*` variable, read in one place.

Modules ask `current()` for a `Settings` instead of reading `os.environ` themselves, so the
default host and port are written once and a variable means the same thing to the server and
to the `lmx` client (it once read `LMX_ADMIN_KEY` but not `LMX_ADMIN_KEY_FILE`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1234

_TRUE = ("1", "true", "yes", "on")


class SecretFileError(Exception):
    """A key file named by an `LMX_*_FILE` variable cannot be read, or is empty."""


@dataclass(frozen=True)
class Settings:
    """Defaults overridden by the environment; command-line flags override these in turn."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    server: str | None = None  # LMX_SERVER: the admin API the `lmx` client talks to
    admin_key: str | None = None  # LMX_ADMIN_KEY
    admin_key_file: str | None = None  # LMX_ADMIN_KEY_FILE
    api_key: str | None = None  # LMX_API_KEY
    api_key_file: str | None = None  # LMX_API_KEY_FILE
    config_dir: str | None = None  # LMX_CONFIG_DIR
    state_dir: str | None = None  # LMX_STATE_DIR
    cache_dir: str | None = None  # LMX_CACHE_DIR
    log_dir: str | None = None  # LMX_LOG_DIR
    log_level: str = "INFO"  # LMX_LOG_LEVEL
    log_format: str = "human"  # LMX_LOG_FORMAT
    git_commit: bool = False  # LMX_GIT_COMMIT
    git_follow: str | None = None  # LMX_GIT_FOLLOW: the git remote models.yaml follows
    fleet_host: str | None = None  # LMX_FLEET_HOST: which of the fleet's hosts this server is
    fleet_key: str | None = None  # LMX_FLEET_KEY: what hosts of one fleet present to each other
    fleet_key_file: str | None = None  # LMX_FLEET_KEY_FILE
    engine_start: str | None = None  # LMX_ENGINE_START: the start mode where models.yaml names none

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        def get(name: str) -> str | None:
            return environ.get(name) or None

        return cls(
            server=get("LMX_SERVER"),
            admin_key=get("LMX_ADMIN_KEY"),
            admin_key_file=get("LMX_ADMIN_KEY_FILE"),
            api_key=get("LMX_API_KEY"),
            api_key_file=get("LMX_API_KEY_FILE"),
            config_dir=get("LMX_CONFIG_DIR"),
            state_dir=get("LMX_STATE_DIR"),
            cache_dir=get("LMX_CACHE_DIR"),
            log_dir=get("LMX_LOG_DIR"),
            log_level=get("LMX_LOG_LEVEL") or cls.log_level,
            log_format=get("LMX_LOG_FORMAT") or cls.log_format,
            git_commit=(get("LMX_GIT_COMMIT") or "").lower() in _TRUE,
            engine_start=get("LMX_ENGINE_START"),
            git_follow=get("LMX_GIT_FOLLOW"),
            fleet_host=get("LMX_FLEET_HOST"),
            fleet_key=get("LMX_FLEET_KEY"),
            fleet_key_file=get("LMX_FLEET_KEY_FILE"),
        )

    @property
    def server_url(self) -> str:
        """Where the client finds the server: LMX_SERVER, else the default host and port."""
        return self.server or f"http://{self.host}:{self.port}"

    def admin_secret(self) -> str | None:
        """The admin key: LMX_ADMIN_KEY, else the contents of LMX_ADMIN_KEY_FILE."""
        return read_secret("LMX_ADMIN_KEY", self.admin_key, self.admin_key_file)

    def fleet_secret(self) -> str | None:
        """The fleet key: LMX_FLEET_KEY, else the contents of LMX_FLEET_KEY_FILE."""
        return read_secret("LMX_FLEET_KEY", self.fleet_key, self.fleet_key_file)

    def api_secret(self) -> str | None:
        """The inference key: LMX_API_KEY, else the contents of LMX_API_KEY_FILE."""
        return read_secret("LMX_API_KEY", self.api_key, self.api_key_file)


def read_secret(variable: str, value: str | None, path: str | None) -> str | None:
    """A key given directly, else read from the file named by `<variable>_FILE`."""
    if value and value.strip():
        return value.strip()
    if not path:
        return None
    try:
        if Path(path).expanduser().stat().st_mode & 0o077:
            raise SecretFileError(f"{variable}_FILE={path} is readable by other users; run `chmod 600 {path}`")
        key = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except OSError as error:
        raise SecretFileError(f"{variable}_FILE={path}: cannot read the key: {error}") from None
    if not key:
        raise SecretFileError(f"{variable}_FILE={path} is empty")
    return key


def current() -> Settings:
    """The settings as the environment says now (read on every call, so tests may set variables)."""
    return Settings.from_env(os.environ)

"""Which key files a service carries: never a key's value, only a file readable by its owner alone.

A service file is read by the service manager and sits in a backed-up home directory: it may
name the files that hold the keys, never hold a key itself.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path

from opta_lmx import settings

KEY_FILE_OF = {"LMX_ADMIN_KEY": "LMX_ADMIN_KEY_FILE", "LMX_API_KEY": "LMX_API_KEY_FILE"}


class ServiceError(Exception):
    """Installing or driving the service failed; the message says what to do."""


def key_value_refusal(variable: str) -> str:
    return (f"a service file must not hold {variable}'s value (and without it the service would run without "
            f"the key): put the key in a file only you can read (chmod 600 FILE) and pass --env "
            f"{KEY_FILE_OF[variable]}=FILE, or set {KEY_FILE_OF[variable]} when you run install")


def key_file_env(env: dict[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The key files the service gets (absolute, checked), from `--env` or else the environment.

    A key set only as a value in the environment is refused: the service would run without it.
    """
    out = {}
    for variable, file_variable in KEY_FILE_OF.items():
        path = env.get(file_variable) or environ.get(file_variable)
        if variable in env or (environ.get(variable) and not path):
            raise ServiceError(key_value_refusal(variable))
        if path:
            file = Path(path).expanduser().absolute()
            try:
                settings.read_secret(variable, None, str(file))
                mode = stat.S_IMODE(file.stat().st_mode)
            except (settings.SecretFileError, OSError) as error:
                raise ServiceError(str(error)) from None
            if mode & 0o077:
                raise ServiceError(f"{file_variable}={file} is readable by others (mode {mode:o}): chmod 600 {file}")
            out[file_variable] = str(file)
    return out

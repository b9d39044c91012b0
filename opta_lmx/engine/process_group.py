"""A worker's process group seen through psutil: its members, whether any lives, signalling it.

A worker runs in its own process group (its own session), so stopping it means signalling the
whole group and waiting until no member of it is left.
"""

from __future__ import annotations

import os

import psutil


def children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for proc in [*try_process(pgid), *children(pgid)]:
        members.append(proc)
    return members


def try_process(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid)]
    except psutil.Error:
        return []


def any_alive(processes: list[psutil.Process]) -> bool:
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            continue
    return False


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

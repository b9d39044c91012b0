"""`git commit` of models.yaml after an admin write (opt-in: `lmx serve --git-commit`)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

Git = Callable[..., subprocess.CompletedProcess[str]]


def identity(git: Git) -> list[str]:
    """`-c` options naming Opta-LMX as the author when git has no identity configured, else none."""
    if git("config", "user.email").stdout.strip():
        return []
    return ["-c", "user.name=Opta-LMX", "-c", "user.email=opta-lmx@localhost"]


def commit_file(target: Path, message: str) -> tuple[str | None, str | None]:
    """Commit just `target` in the repository that holds it: (sha, None) or (None, why)."""
    cwd = target.parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return None, f"{target} is not in a git repository"
        added = git("add", "--", target.name)
        if added.returncode != 0:
            return None, added.stderr.strip()
        done = git(*identity(git), "commit", "--no-verify", "-q", "-m", message, "--", target.name)
        if done.returncode != 0:
            return None, (done.stderr or done.stdout).strip()
        return git("rev-parse", "HEAD").stdout.strip(), None
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"git failed: {error}"

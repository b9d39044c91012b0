"""`git commit` of models.yaml after an admin write (opt-in: `lmx serve --git-commit`)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit_file(target: Path, message: str) -> tuple[str | None, str | None]:
    """Commit just `target` in the repository that holds it: (sha, None) or (None, why)."""
    cwd = target.parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0:
            return None, f"{target} is not in a git repository"
        identity: list[str] = []
        if not git("config", "user.email").stdout.strip():
            identity = ["-c", "user.name=Opta-LMX", "-c", "user.email=opta-lmx@localhost"]
        added = git("add", "--", target.name)
        if added.returncode != 0:
            return None, added.stderr.strip()
        done = git(*identity, "commit", "--no-verify", "-q", "-m", message, "--", target.name)
        if done.returncode != 0:
            return None, (done.stderr or done.stdout).strip()
        return git("rev-parse", "HEAD").stdout.strip(), None
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"git failed: {error}"

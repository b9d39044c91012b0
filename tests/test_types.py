"""The type checker (mypy, configured in pyproject.toml) passes on the package and on the fakes the
tests stand in for its Protocols (Pool, WorkerHandle, ControlLoopView): a fake cannot drift from
the real thing without this failing (issue 20: the fake worker once had no `api_key()`)."""

from __future__ import annotations

import subprocess
import sys

from tests.lmx_harness import REPO


def test_the_package_and_its_fakes_type_check():
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", "/tmp/lmx-mypy-cache"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert result.returncode == 0 and not errors, result.stdout[-4000:] + result.stderr[-2000:]

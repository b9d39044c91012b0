"""The admin API fuzzed from its own OpenAPI schema (issue 12 item 9), in process over the fake loop.

Schemathesis generates requests for every admin operation from `/openapi.json` (valid ones and,
in its negative mode, ones that break the schema), each against one of four files in turn (good,
missing, blank, not UTF-8). Whatever it sends: never a 5xx, every 4xx is an OpenAI-shaped error,
a 4xx never changes models.yaml (its bytes are compared), and a missing or blank file is only
ever created by `PUT /admin/desired` or `?create=true`. The
budget is small (a few examples per operation) so it runs in CI in seconds; raise
`LMX_FUZZ_EXAMPLES` to fuzz longer by hand. Under CI (`CI=true`) the examples are derandomized, so
a run there is repeatable; by hand they are random.

The one 5xx allowed is the one documented: `GET /readyz` answers 503 with `ready: false` while
the server is not ready (a missing or blank file is exactly that).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis  # a declared test dependency: missing, the fuzz fails rather than skips
from hypothesis import HealthCheck, settings

from opta_lmx.state.store import ModelsStore  # noqa: E402
from tests.api.fake_loop import FakeLoop, admin_app  # noqa: E402

CONFIG = b"""\
# fuzzed: every 4xx must leave these bytes alone
memory:
  budget: 50%
models:
  - name: alpha
    source: org/alpha
    aliases: [default]
  - name: beta
    source: org/beta
    state: unloaded
"""
EXAMPLES = int(os.environ.get("LMX_FUZZ_EXAMPLES", "25"))


def _fuzzed_app():
    """One app for the whole run over a temp models.yaml (put back before every case)."""
    path = Path(tempfile.mkdtemp(prefix="lmx-fuzz-")) / "models.yaml"
    path.write_bytes(CONFIG)
    app = admin_app(FakeLoop(path), ModelsStore(path))
    app.state.stopping = True  # `GET /admin/events?follow=true` sends the backlog and ends
    return app, path


# Built at import rather than from a fixture: schemathesis's lazy fixture loader reads a private
# attribute pytest 9 no longer has.
APP, PATH = _fuzzed_app()
# The fuzzing phase only: schemathesis's coverage phase sends thousands of boundary cases (about
# a minute here), too much for every CI run.
CONFIG_FOR_CI = schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, config=CONFIG_FOR_CI)


@pytest.fixture(scope="module", autouse=True)
def _remove_the_temp_dir():
    yield
    shutil.rmtree(PATH.parent, ignore_errors=True)


# The file each case starts from, in turn: a good one, none at all, a blank one, a non-UTF-8 one.
STARTS = [CONFIG, None, b"\n", CONFIG.replace(b"org/beta", b"org/b\xe9ta")]
_cases = itertools.count()


def _put_back(start: bytes | None) -> None:
    if start is None:
        PATH.unlink(missing_ok=True)
    else:
        PATH.write_bytes(start)


def _read() -> bytes | None:
    return PATH.read_bytes() if PATH.exists() else None


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI", "").lower() == "true")
def test_no_input_makes_a_5xx_or_a_4xx_that_writes(case):
    start = STARTS[next(_cases) % len(STARTS)]
    _put_back(start)
    response = case.call()
    what = f"{case.method} {case.formatted_path} {case.query} from {start!r:.40}"
    if (case.method, case.path) == ("GET", "/readyz") and response.status_code == 503:
        assert response.json()["ready"] is False and response.json()["reasons"], response.text
        return
    assert response.status_code < 500, f"{what}: {response.text[:500]}"
    if 400 <= response.status_code < 500:
        assert _read() == start, f"{what} answered {response.status_code} but changed models.yaml"
        error = response.json()["error"]
        assert error["message"] and error["type"], response.text
    elif start is None or not start.strip():  # a missing or blank file is created only on request
        explicit = (case.method, case.path) == ("PUT", "/admin/desired") or \
            str((case.query or {}).get("create")).lower() in ("true", "1", "yes")
        assert explicit or _read() == start, f"{what} created models.yaml without being asked to"

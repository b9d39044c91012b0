"""Fixtures shared by every test tree. No test downloads anything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# In-process loops on real pools start cold, like the harness's servers: a template each test never
# uses would warm up (seconds of CPU) beside the next tests. The fast-start tests name their mode.
os.environ.setdefault("LMX_ENGINE_START", "cold")

from tests.lmx_harness import Server, start_server, stop_and_check  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A genuine tiny llama model (about 1 MB), generated once per test session."""
    from opta_lmx.devmodel import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory) -> Path:
    """A second, different tiny model (another seed), for swaps and multi-model tests."""
    from opta_lmx.devmodel import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-b", size="tiny", seed=1)


@pytest.fixture
def serve(tmp_path):
    """Start `lmx serve` on a models.yaml text; every server is stopped and checked for leftovers."""
    servers: list[Server] = []

    def _start(config_text: str, *extra_args: str, **kwargs) -> Server:
        config = tmp_path / "models.yaml"
        config.write_text(config_text)
        server = start_server(config, tmp_path / "state", *extra_args, **kwargs)
        servers.append(server)
        return server

    yield _start
    problems = []
    for server in servers:  # every server is stopped (and its leftovers killed) even if one check fails
        try:
            stop_and_check(server)
        except AssertionError as error:
            problems.append(str(error))
    assert not problems, problems

"""The examples are runnable and stay valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from opta_lmx.state.document import read_document

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: p.name)
def test_example_models_yaml_is_valid(path):
    assert read_document(path).state.models


@pytest.mark.e2e
def test_openai_client_example_runs(serve, tiny_model):
    server = serve(f"models:\n  - name: tiny\n    source: {tiny_model}\n    aliases: [default]\n")
    server.wait_ready("tiny")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_chat.py")], capture_output=True, text=True, timeout=120,
        env={"LMX_BASE_URL": server.base_url + "/v1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "models: ['tiny', 'default']" in result.stdout
    assert "answer: " in result.stdout and "stream: " in result.stdout

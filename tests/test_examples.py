"""The examples are runnable and stay valid: each numbered example's README steps, run for real.

The examples name hub models; here each `source:` is replaced by a generated tiny model (and
sizes are scaled down where the example is about memory), everything else is the file as shipped.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from opta_lmx.state.document import read_document
from tests.lmx_harness import REPO, lmx_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LMX = [sys.executable, "-m", "opta_lmx.cli"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_models_yaml_is_valid(path):
    assert read_document(path).state.models
    check = subprocess.run([*LMX, "check", "-f", str(path)], capture_output=True, text=True, env=lmx_env(), cwd=REPO,
                           timeout=60)
    assert check.returncode == 0, check.stderr


def adapted(example: str, sources: list[Path], replacements: dict[str, str] | None = None) -> str:
    """The example's models.yaml with tiny models as sources (in order, the last one repeated)."""
    text = (EXAMPLES / example / "models.yaml").read_text()
    for old, new in (replacements or {}).items():
        assert old in text, f"{example}/models.yaml no longer has {old!r}: update this test with it"
        text = text.replace(old, new)
    chosen = itertools.chain(sources, itertools.repeat(sources[-1]))
    return re.sub(r"(?m)^(\s*source:\s*)\S+", lambda m: m.group(1) + str(next(chosen)), text)


def lmx(server, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*LMX, *args, "--server", server.base_url], capture_output=True, text=True,
                            env=lmx_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def chat(server, model: str) -> httpx.Response:
    return server.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})


def status(server, name: str) -> dict:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == name)


@pytest.mark.e2e
def test_01_single_model(serve, tiny_model):
    server = serve(adapted("01-single-model", [tiny_model]))
    server.wait_ready("qwen")
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "openai_chat.py")], capture_output=True, text=True, timeout=120,
        env={"LMX_BASE_URL": server.base_url + "/v1", "LMX_MODEL": "default", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "models: ['qwen', 'default']" in result.stdout
    assert "answer: " in result.stdout and "stream: " in result.stdout


@pytest.mark.e2e
def test_02_aliases_and_swap(serve, tiny_model, tiny_model_b):
    server = serve(adapted("02-aliases-and-swap", [tiny_model, tiny_model_b]))
    server.wait_ready("qwen-4b", "qwen-8b")
    assert chat(server, "default").json()["model"] == "qwen-4b"
    pids = {name: status(server, name)["pid"] for name in ("qwen-4b", "qwen-8b")}
    lmx(server, "set", "qwen-4b", "aliases=[chat]", "--wait")
    lmx(server, "set", "qwen-8b", "aliases=[default]", "--wait")
    assert chat(server, "default").json()["model"] == "qwen-8b"
    assert chat(server, "chat").json()["model"] == "qwen-4b"
    assert {name: status(server, name)["pid"] for name in pids} == pids  # no worker restarted


@pytest.mark.e2e
def test_03_on_demand_idle_ttl(serve, tiny_model):
    server = serve(adapted("03-on-demand-idle-ttl", [tiny_model], {"idle_ttl: 10m": "idle_ttl: 3s"}))
    server.wait_for(lambda s: s.phases().get("coder") == "Unloaded", 30, "coder standing by")
    assert "Unloaded" in lmx(server, "get", "models").stdout
    assert chat(server, "coder").status_code == 200  # waited for the load
    assert status(server, "coder")["phase"] == "Ready"
    server.wait_for(lambda s: s.phases().get("coder") == "Unloaded", 60, "coder unloaded when idle")
    events = [e["reason"] for e in server.get("/admin/events").json()["events"] if e["object"] == "coder"]
    assert "IdleUnload" in events


@pytest.mark.e2e
def test_04_memory_budget_priorities(serve, tiny_model):
    text = adapted("04-memory-budget-priorities", [tiny_model], {
        "budget: 48GiB": "budget: 2000MiB", "reserve: 4GiB": "reserve: 0", "memory: 20GiB": "memory: 900MiB"})
    server = serve(text)
    plan = lmx(server, "plan", "-f", str(server.config), "--from-nothing").stdout
    assert "summarizer" in plan
    server.wait_ready("coder", "chat")
    server.wait_for(lambda s: s.phases().get("summarizer") == "Unschedulable", 30, "summarizer refused")
    assert "budget" in status(server, "summarizer")["message"]
    lmx(server, "set", "summarizer", "priority=60")
    server.wait_ready("coder", "summarizer", timeout=180)
    server.wait_for(lambda s: s.phases().get("chat") == "Unschedulable", 30, "chat gave way")


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "LMX": " ".join(LMX), "PYTHONPATH": str(REPO)}
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.e2e
def test_05_git_deployed(tmp_path, tiny_model):
    from tests.lmx_harness import start_server, stop_and_check

    origin, laptop, host = tmp_path / "origin.git", tmp_path / "laptop", tmp_path / "host"
    git(tmp_path, "init", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", str(origin), str(laptop))
    hook = laptop / ".git" / "hooks" / "pre-commit"
    hook.write_bytes((EXAMPLES / "05-git-deployed" / "pre-commit").read_bytes())
    hook.chmod(0o755)
    config = laptop / "models.yaml"
    config.write_text(adapted("05-git-deployed", [tiny_model]))
    git(laptop, "add", "models.yaml")
    git(laptop, "commit", "-m", "coder on the Mac")
    git(laptop, "push", "origin", "main")
    git(tmp_path, "clone", str(origin), str(host))
    server = start_server(host / "models.yaml", tmp_path / "state", "--git-commit")
    try:
        server.wait_ready("coder")
        # A change that does not validate is refused by the hook.
        good = config.read_text()
        config.write_text(good.replace("priority: 100", "priority: high"))
        refused = git(laptop, "commit", "-am", "oops", check=False)
        assert refused.returncode != 0 and "models[0].priority" in refused.stderr + refused.stdout
        # A good change: commit, push, pull on the host; the loop converges to it.
        config.write_text(good.replace("aliases: [default]", "aliases: [default, code]"))
        git(laptop, "commit", "-am", "coder also answers as code")
        git(laptop, "push", "origin", "main")
        git(host, "pull", "--ff-only")
        server.wait_for(lambda s: chat(s, "code").status_code == 200, 30, "alias code deployed")
        # Roll back by revert.
        git(laptop, "revert", "--no-edit", "HEAD")
        git(laptop, "push", "origin", "main")
        git(host, "pull", "--ff-only")
        server.wait_for(lambda s: chat(s, "code").status_code == 404, 30, "alias code rolled back")
        # An API edit is a commit in the host's clone.
        lmx(server, "set", "coder", "priority=90")
        subject = git(host, "log", "-1", "--format=%s").stdout.strip()
        assert subject.startswith("set coder: priority=90") and "PATCH" in subject, subject
    finally:
        stop_and_check(server)

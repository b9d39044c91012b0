"""`lmx pull`, run as a user runs it (a subprocess), against the local fake hub (tests/hubserver.py).

HF_ENDPOINT points huggingface_hub at the fake hub and HF_HOME at a temporary cache; only these
tests lift HF_HUB_OFFLINE.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opta_lmx.cli import main
from tests.hubserver import FakeHub
from tests.lmx_harness import REPO, lmx_env

REPO_ID = "opta-test/tiny"
LMX = [sys.executable, "-m", "opta_lmx.cli"]


@pytest.fixture
def hub(tiny_model):
    server = FakeHub(bytes_per_second=4 * 1024**2)
    server.add(REPO_ID, tiny_model)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def env(hub, tmp_path):
    env = lmx_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_HUB_CACHE", None)
    return env


def pull(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*LMX, "pull", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def resolved(hub: FakeHub) -> list[str]:
    """The files fetched (GET) so far, by name."""
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_pull_fetches_the_snapshot_with_a_progress_bar(hub, env, tiny_model, tmp_path):
    result = pull(env, REPO_ID)
    assert result.returncode == 0, result.stderr
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    assert snapshot.is_relative_to(tmp_path / "hf-home" / "hub")
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == hub.repos[REPO_ID].files
    total = sum(len(data) for data in hub.repos[REPO_ID].files.values())
    assert REPO_ID in result.stderr and "100%" in result.stderr  # tqdm's bar, on stderr
    assert f"{total / 1024**2:.2f}M" in result.stderr or f"{total / 1024**2:.1f}M" in result.stderr  # bytes of the repo
    assert sorted(resolved(hub)) == sorted(hub.repos[REPO_ID].files)

    again = pull(env, REPO_ID, "--quiet")  # already cached: nothing fetched, same path
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(snapshot) and again.stderr == ""
    assert len(resolved(hub)) == len(hub.repos[REPO_ID].files)


def test_a_missing_or_private_repo_fails_with_a_clear_message(env):
    endpoint = env.pop("HF_ENDPOINT")  # given as the option instead
    result = pull(env, "opta-test/no-such-model", "--endpoint", endpoint)
    assert result.returncode == 1
    assert "not found on the hub" in result.stderr and "private" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_hub_says_to_run_it_again(env, hub):
    hub.stop()
    result = pull(env, REPO_ID)
    assert result.returncode == 75, result.stderr
    assert f"run `lmx pull {REPO_ID}` again" in result.stderr and "Traceback" not in result.stderr


def test_offline_pull_uses_the_cache_or_says_why_not(env):
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    missing = pull(offline, REPO_ID)
    assert missing.returncode == 1 and "HF_HUB_OFFLINE" in missing.stderr
    assert pull(env, REPO_ID, "-q").returncode == 0
    cached = pull(offline, REPO_ID)
    assert cached.returncode == 0 and Path(cached.stdout.strip()).joinpath("config.json").exists()


def test_a_local_path_is_refused(capsys):
    assert main(["pull", "./models/tiny"]) == 1
    assert "not a hub model id" in capsys.readouterr().err


def test_an_interrupted_pull_resumes_with_the_missing_files(hub, env, tmp_path):
    hub.bytes_per_second = 200 * 1024  # model.safetensors (1 MB) takes about 5 s; the rest well under 1 s
    proc = subprocess.Popen([*LMX, "pull", REPO_ID], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=REPO)
    snapshots = tmp_path / "hf-home" / "hub" / "models--opta-test--tiny" / "snapshots"
    deadline = time.monotonic() + 60
    while not list(snapshots.glob("*/tokenizer.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(snapshots.glob("*/tokenizer.json")), "tokenizer.json never arrived"
    assert not list(snapshots.glob("*/model.safetensors")), "too late to interrupt: the hub is not throttled"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and f"`lmx pull {REPO_ID}` resumes" in err
    assert not list(snapshots.glob("*/model.safetensors"))
    first = resolved(hub)

    hub.bytes_per_second = 4 * 1024**2
    result = pull(env, REPO_ID)
    assert result.returncode == 0, result.stderr
    second = resolved(hub)[len(first):]
    assert "model.safetensors" in second
    assert "tokenizer.json" not in second and "config.json" not in second  # kept from the first run
    snapshot = Path(result.stdout.strip())
    assert {p.name: p.read_bytes() for p in snapshot.iterdir()} == hub.repos[REPO_ID].files
    assert not [p for p in snapshot.parent.parent.rglob("*") if p.name.endswith(".incomplete")]


@pytest.mark.parametrize("hostile", ["etag", "filename", "overrun"])
def test_a_hostile_hub_is_reported_in_one_line(env, hub, hostile, tmp_path):
    """Issue 22: a `../` file name once crashed `lmx pull` with a raw traceback."""
    from tests.hubserver import Hostile

    hub.repos[REPO_ID].hostile = {"etag": Hostile(etag="../../x"), "filename": Hostile(extra_listed={"../x": 3}),
                                  "overrun": Hostile(overrun={"model.safetensors": 8 * 1024**2})}[hostile]
    result = pull(env, REPO_ID, "-q")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmx pull:") and "refused" in lines[0], result.stderr
    assert not (tmp_path / "x").exists()

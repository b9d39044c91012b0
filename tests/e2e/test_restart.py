"""Issue 5 acceptance: clean shutdown during a stream, a forced second signal, and restart after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from tests.lmx_harness import REPO, lmx_env, worker_processes

pytestmark = pytest.mark.e2e

# The tiny models would end a reply after ~30 tokens; banning their end tokens gives a long stream.
LONG_STREAM = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, "stream": True,
               "logit_bias": {"0": -100, "1": -100, "2": -100, "3": -100}}


def _config(*entries: tuple[str, object]) -> str:
    return "models:\n" + "".join(
        f"  - name: {name}\n    source: {source}\n    engine: {{max_tokens: 2000}}\n" for name, source in entries
    )


def _status(server, name: str) -> dict:
    return next(m["status"] for m in server.admin_models()["models"] if m["name"] == name)


def _wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


class Stream:
    """A streaming chat request read on a thread, so the test can signal the server meanwhile."""

    def __init__(self, base_url: str, model: str):
        self.chunks: list[dict] = []
        self.done = False
        self.error: Exception | None = None
        self.started = threading.Event()
        self.paused = threading.Event()  # set: stop reading (to keep the response in flight)
        self._thread = threading.Thread(target=self._read, args=(base_url, model), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, model: str) -> None:
        try:
            with httpx.stream("POST", base_url + "/v1/chat/completions", json={"model": model, **LONG_STREAM},
                              timeout=httpx.Timeout(60.0)) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    while self.paused.is_set():
                        time.sleep(0.05)
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        self.chunks.append(json.loads(line[6:]))
                        if len(self.chunks) >= 20:
                            self.started.set()
        except Exception as error:  # noqa: BLE001 - the test inspects it
            self.error = error
        finally:
            self.started.set()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"


def test_sigterm_lets_an_inflight_stream_finish_then_exits_0(serve, tiny_model):
    server = serve(_config(("a", tiny_model)), "--grace", "30", "--log-format", "json")
    server.wait_ready("a")
    stream = Stream(server.base_url, "a")
    assert stream.started.wait(30) and stream.error is None, stream.error
    before = len(stream.chunks)
    server.proc.send_signal(signal.SIGTERM)

    # Draining: no new connections are accepted, while the stream goes on to its end.
    def refused(s) -> bool:
        try:
            s.get("/healthz")
        except httpx.ConnectError:
            return True
        return False
    server.wait_for(refused, 10, "the listening socket closed")
    stream.join(60)
    assert stream.error is None, stream.error
    assert stream.done, "the stream ended without [DONE]"
    assert len(stream.chunks) > before, "nothing arrived after SIGTERM: the stream was not in flight"
    assert stream.chunks[-1]["usage"]["completion_tokens"] == 2000
    assert server.proc.wait(timeout=30) == 0
    assert _wait_gone([p.pid for p in worker_processes(server.state_dir)]) == []
    records = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert any(r["logger"] == "opta_lmx" and "SIGTERM" in r["msg"] for r in records), server.log()[-3000:]
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert worker_processes(server.state_dir) == []


def test_a_second_signal_forces_shutdown(serve, tiny_model):
    server = serve(_config(("a", tiny_model)), "--grace", "60")
    server.wait_ready("a")
    worker_pid = _status(server, "a")["pid"]
    stream = Stream(server.base_url, "a")
    assert stream.started.wait(30) and stream.error is None, stream.error
    stream.paused.set()  # keep the response in flight: the graceful drain alone would wait for it
    server.proc.send_signal(signal.SIGTERM)
    server.wait_for(lambda s: "Waiting for connections to close" in s.log(), 10, "draining")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0  # long before the 60 s grace
    stream.paused.clear()
    stream.join(30)
    # Cut off: either the connection just ends, or (if the killed worker is noticed first) the
    # gateway's mid-stream error event; never a normal finish.
    finished = [c for c in stream.chunks for choice in c.get("choices", []) if choice.get("finish_reason")]
    assert not finished, "the forced shutdown still let the stream finish"
    assert "forcing shutdown" in server.log()
    assert _wait_gone([worker_pid]) == []
    assert worker_processes(server.state_dir) == []


def test_restart_after_sigkill_adopts_desired_workers_and_stops_the_rest(serve, tiny_model, tiny_model_b):
    first = serve(_config(("a", tiny_model), ("b", tiny_model_b)))
    first.wait_ready("a", "b")
    pid_a, pid_b = _status(first, "a")["pid"], _status(first, "b")["pid"]
    records = sorted((first.state_dir / "workers" / "records").glob("*.json"))
    assert len(records) == 2

    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert psutil.pid_exists(pid_a) and psutil.pid_exists(pid_b), "workers should outlive a killed control plane"

    # While it was down, b was removed from models.yaml: the restart adopts a and stops b.
    first.write_config(_config(("a", tiny_model)))
    second = serve(_config(("a", tiny_model)))
    second.wait_ready("a", timeout=60)
    assert _status(second, "a")["pid"] == pid_a, "the adopted worker was reloaded"
    assert _wait_gone([pid_b]) == [], "the undesired worker from the previous run was left running"
    assert [p.pid for p in worker_processes(second.state_dir, waiting=False)] == [pid_a], "orphan or duplicate"

    events = second.get("/admin/events").json()["events"]
    reasons = {(e["reason"], e["object"]) for e in events}
    assert {("Adopted", "a"), ("StoppedLeftover", "b")} <= reasons, events
    assert not any(e["reason"] == "Loading" for e in events), "a model was loaded again instead of adopted"

    answer = second.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert len(list((second.state_dir / "workers" / "records").glob("*.json"))) == 1

    # `lmx logs a` prints the adopted worker's own log (kept across the restart).
    logs = subprocess.run([sys.executable, "-m", "opta_lmx.cli", "logs", "a", "--state-dir", str(second.state_dir),
                           "-n", "200"], capture_output=True, text=True, env=lmx_env(), cwd=REPO, timeout=30)
    assert logs.returncode == 0, logs.stderr
    assert "/v1/chat/completions" in logs.stdout or "Uvicorn running" in logs.stdout, logs.stdout[-2000:]

    # A clean stop of the restarted server stops the adopted worker too, and clears its record.
    assert second.stop() == 0
    assert _wait_gone([pid_a]) == []
    assert list((second.state_dir / "workers" / "records").glob("*.json")) == []
    # Only the records folder and the control plane's worker secret (kept: adopted workers' keys derive from it).
    left = sorted(p.name for p in (second.state_dir / "workers").iterdir())
    assert left == ["records", "worker.secret"], f"worker dirs left behind: {left}"
    assert (second.state_dir / "workers" / "worker.secret").stat().st_mode & 0o077 == 0
    logs_dir = second.state_dir / "logs"  # one log per worker process, under the model's name
    assert list((logs_dir / "a").glob("*.log")) and list((logs_dir / "b").glob("*.log"))

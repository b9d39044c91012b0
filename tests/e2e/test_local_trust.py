"""Issue 22, another local user against a running `lmx serve`: the state directory is private
whatever the umask, a record planted there is never adopted (its process is not signalled, its
paths are not read or removed), and no one can take a worker's port first. The attacker runs as
a second uid (setpriv), since the tests run as root."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"),
]

NOBODY = 65534
HEAD = "defaults: {engine: {max_tokens: 8}}\nmodels:\n"


def as_nobody(*argv: str, **kwargs) -> subprocess.Popen:
    """`argv` run as uid/gid 65534 with no supplementary groups: another local user."""
    return subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *argv],
                            **kwargs)


def chat(server, model: str):
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": [{"role": "user", "content": "a private prompt"}], "max_tokens": 3})


def test_everything_in_the_state_dir_is_private_even_under_umask_000(serve, tiny_model, tmp_path):
    server = serve(HEAD + f"  - name: a\n    source: {tiny_model}\n", umask=0)
    server.wait_ready("a")
    assert chat(server, "a").status_code == 200
    loose = []
    for root, dirs, files in os.walk(server.state_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            if not stat.S_ISLNK(info.st_mode) and stat.S_IMODE(info.st_mode) & 0o077:
                loose.append(f"{path} {stat.S_IMODE(info.st_mode):o}")
    assert stat.S_IMODE(server.state_dir.stat().st_mode) == 0o700
    assert not loose, loose
    logs = list((server.state_dir / "logs" / "a").glob("*.log"))
    assert logs
    reader = as_nobody(sys.executable, "-c", f"open({str(logs[0])!r}).read()", stderr=subprocess.PIPE)
    assert reader.wait(30) != 0 and b"Permission denied" in reader.stderr.read()


# A process another user runs that pretends to be the worker of `a`: it answers /health as one and
# writes down every request that reaches it (with its headers: a worker key would be in them).
IMPOSTOR = """
import http.server, json, sys
seen = sys.argv[1]
class Impostor(http.server.BaseHTTPRequestHandler):
    def answer(self):
        with open(seen, "a") as out:
            out.write(self.command + " " + self.path + " " + json.dumps(dict(self.headers)) + "\\n")
        body = json.dumps({"status": "healthy", "model_loaded": True, "model_name": "a"}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = answer
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", 0), Impostor)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def test_a_planted_record_is_rejected_and_nothing_it_names_is_touched(serve, tiny_model, tmp_path):
    from opta_lmx.reconciler.accounting import worker_spec
    from opta_lmx.state.document import read_document

    seen = tmp_path / "impostor-saw.txt"
    seen.write_text("")
    seen.chmod(0o666)
    impostor = as_nobody(sys.executable, "-c", IMPOSTOR, str(seen), stdout=subprocess.PIPE)
    innocent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        port = int(impostor.stdout.readline())
        unrelated = tmp_path / "unrelated"
        unrelated.mkdir()
        (unrelated / "keep.txt").write_text("not the server's")
        secret = tmp_path / "root-only.txt"
        secret.write_text("root's secret")
        secret.chmod(0o600)
        config = tmp_path / "models.yaml"
        config.write_text(HEAD + f"  - name: a\n    source: {tiny_model}\n")
        desired = read_document(config).state
        fingerprint = worker_spec(config, desired, desired.models[0]).fingerprint
        records = tmp_path / "state" / "workers" / "records"
        records.mkdir(parents=True)
        for worker_id, proc, record_port in (("a-planted-1", impostor, port), ("a-planted-2", innocent, 1)):
            records.joinpath(f"{worker_id}.json").write_text(json.dumps({
                "worker_id": worker_id, "name": "a", "fingerprint": fingerprint, "source": str(tiny_model),
                "engine": {"max_tokens": 8}, "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
                "host": "127.0.0.1", "port": record_port, "address": f"http://127.0.0.1:{record_port}",
                "log_path": str(secret), "run_dir": str(unrelated), "started_at": time.time(),
                "ready_at": time.time()}))

        server = serve(config.read_text())
        server.wait_ready("a")
        assert chat(server, "a").status_code == 200
        rejected = [e["message"] for e in server.get("/admin/events").json()["events"] if e["reason"] == "RecordRejected"]
        assert len(rejected) == 2, rejected
        assert any(f"belongs to uid {NOBODY}" in m for m in rejected) and any("is not a worker" in m for m in rejected)
        assert "Adopted" not in [e["reason"] for e in server.get("/admin/events").json()["events"]]
        status = next(m["status"] for m in server.admin_models()["models"] if m["name"] == "a")
        assert status["pid"] not in (impostor.pid, innocent.pid)
        # Nothing the records named was touched: both processes live, the directory is there,
        # the impostor was never sent a request (nor a worker key), the root-only file never served.
        assert impostor.poll() is None and innocent.poll() is None
        assert (unrelated / "keep.txt").read_text() == "not the server's"
        assert seen.read_text() == ""
        assert "root's secret" not in server.get("/admin/models/a/log").text
        assert not list(records.glob("a-planted-*.json"))
    finally:
        for proc in (impostor, innocent):
            proc.kill()
            proc.wait()


def test_no_one_can_take_a_cold_workers_port_first(serve, tiny_model, tmp_path):
    """The attack of issue 22: another user watching the process table binds the port a cold
    worker names on its command line before the worker binds it, and answers in its place. The
    control plane binds the socket before the worker exists, so the bind fails."""
    server = serve(HEAD + f"  - name: a\n    source: {tiny_model}\n")
    deadline = time.monotonic() + 60
    port = None
    while port is None and time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "opta_lmx.engine.worker_main" in cmdline and "--port" in cmdline and str(server.state_dir) in str(
                    proc.environ().get("HOME", "")):
                port = int(cmdline[cmdline.index("--port") + 1])
        time.sleep(0.02)
    assert port is not None, "no worker process seen"
    squatter = as_nobody(sys.executable, "-c", (
        "import socket, sys\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"try:\n    s.bind(('127.0.0.1', {port}))\nexcept OSError as e:\n    print(e.errno); sys.exit(0)\n"
        "print('bound'); sys.exit(1)"), stdout=subprocess.PIPE)
    out = squatter.communicate(timeout=30)[0].decode().strip()
    assert squatter.returncode == 0 and out == "98", out  # EADDRINUSE: the worker's socket was already bound
    server.wait_ready("a")
    assert chat(server, "a").status_code == 200
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # the worker serves on it

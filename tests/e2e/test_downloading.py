"""Issue 14, downloads as their own phase: a real `lmx serve` whose models.yaml names hub ids served
by the local fake hub (tests/hubserver.py), throttled so the Downloading phase can be watched.

HF_ENDPOINT points the server (and its workers) at the fake hub and HF_HOME at an empty cache;
only this test lifts HF_HUB_OFFLINE.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil
import pytest

from opta_lmx.cli import main
from tests.hubserver import FakeHub
from tests.lmx_harness import lmx_env

pytestmark = pytest.mark.e2e

REPO_ID = "opta-test/tiny"
MISSING = "opta-test/no-such-model"
SHARDS = 8


def sharded_copy(model: Path, target: Path, shards: int = SHARDS) -> Path:
    """The tiny model with its weights in `shards` files and an index, as hub repos of big models are
    (so the download has several files to fetch, and progress several steps to show)."""
    from safetensors.numpy import load_file, save_file

    target.mkdir()
    for path in model.iterdir():
        if path.name != "model.safetensors":
            (target / path.name).write_bytes(path.read_bytes())
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    weight_map, total = {}, 0
    for index in range(shards):
        part = names[index::shards]
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, target / filename, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(part, filename))
        total += sum(tensors[n].nbytes for n in part)
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return target


@pytest.fixture
def hub(tiny_model, tmp_path):
    server = FakeHub(bytes_per_second=48 * 1024)  # per connection: the 1 MB model takes a few seconds
    server.add(REPO_ID, sharded_copy(tiny_model, tmp_path / "sharded"))
    server.start()
    yield server
    server.stop()


def passes(server) -> float:
    return float(re.search(r"^lmx_reconcile_passes_total (\S+)$", server.get("/metrics").text, re.M).group(1))


def metric(text: str, name: str, model: str) -> float | None:
    found = re.search(rf'^{name}{{model="{model}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_hub_model_downloads_in_its_own_phase_then_serves(serve, hub, tmp_path, capsys):
    env = lmx_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_HUB_CACHE", None)
    server = serve(f"models:\n  - {{name: h, source: {REPO_ID}}}\n  - {{name: gone, source: {MISSING}}}\n", env=env)
    total = sum(len(data) for data in hub.repos[REPO_ID].files.values())

    seen: list[dict] = []  # the `download` blocks seen while h was Downloading
    cli_seen = metrics_seen = False
    passes_at_failure = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        models = {m["name"]: m["status"] or {} for m in server.admin_models()["models"]}
        h = models.get("h", {})
        if passes_at_failure is None and models.get("gone", {}).get("phase") == "Failed":
            passes_at_failure = passes(server)
        if h.get("phase") == "Downloading" and h.get("download"):
            seen.append(h["download"])
            assert h["reason"] == "Downloading" and "downloading opta-test/tiny" in h["message"]
            if not metrics_seen and h["download"]["total_bytes"]:
                text = server.get("/metrics").text
                metrics_seen = metric(text, "lmx_model_download_total_bytes", "h") == total
                assert metric(text, "lmx_model_download_done_bytes", "h") is not None
            if not cli_seen:
                main(["get", "models", "--server", server.base_url])
                main(["describe", "h", "--server", server.base_url])
                out = capsys.readouterr().out
                cli_seen = "Downloading" in out and f"download: {REPO_ID}:" in out
        elif h.get("phase") in ("Loading", "Ready"):
            break
        time.sleep(0.1)
    assert seen, "the Downloading phase was never observed"
    done = [d["done_bytes"] for d in seen]
    assert done == sorted(done) and len(set(done)) >= 2, done  # growing
    assert {d["total_bytes"] for d in seen if d["total_bytes"]} == {total}
    assert min(done) < total and cli_seen and metrics_seen

    server.wait_ready("h", timeout=120)
    answer = server.post("/v1/chat/completions", json={
        "model": "h", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    snapshot = tmp_path / "hf-home" / "hub" / "models--opta-test--tiny" / "snapshots"
    assert {p.name for p in next(snapshot.iterdir()).iterdir()} == set(hub.repos[REPO_ID].files)

    reasons = [e["reason"] for e in server.get("/admin/events").json()["events"] if e["object"] == "h"]
    for earlier, later in [("Downloading", "Downloaded"), ("Downloaded", "Loading"), ("Loading", "Ready")]:
        assert reasons.index(earlier) < reasons.index(later), reasons

    # The missing repo: Failed with the hub's answer, asked once, not again on later passes.
    gone = server.admin_models()
    (status,) = [m["status"] for m in gone["models"] if m["name"] == "gone"]
    assert status["phase"] == "Failed" and f"{MISSING} was not found on the hub" in status["message"]
    asked = [r for r in hub.requests if MISSING in r.path]
    before = passes(server)
    server.write_config(server.config.read_text() + "# a change that makes the loop pass again\n")
    server.wait_for(lambda s: passes(s) > before, 30, "another pass")
    assert passes_at_failure is not None and passes(server) >= passes_at_failure + 3  # the loop went on...
    assert [r for r in hub.requests if MISSING in r.path] == asked and len(asked) == 1  # ...without asking again
    assert server.phases()["gone"] == "Failed"


def test_stalled_downloads_never_wedge_the_loop_and_a_stop_ends_them_within_the_grace(serve, hub, tiny_model,
                                                                                       tmp_path):
    """Issue 22: a few slow (here: stalled) hub downloads once left /admin/models hanging, models.yaml
    rejected ("reading the file took longer than 30s") and SIGTERM unfinished after two minutes.
    Downloads run in processes of their own now: the admin API answers, an edit converges, removing
    a model ends its download at once, and a stop ends them all within the stop grace."""
    for index in range(4):  # more stalled repos than download slots, and than the default pool holds
        repo = hub.add(f"opta-test/stalled-{index}", tiny_model)
        repo.hostile.stall = {"model.safetensors"}
    env = lmx_env(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"))
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_HUB_CACHE", None)
    stalled = "".join(f"  - {{name: s{i}, source: opta-test/stalled-{i}}}\n" for i in range(4))
    server = serve("models:\n" + stalled, env=env)
    server.wait_for(lambda s: sum(p == "Downloading" for p in s.phases().values()) >= 2, 60, "downloads stalled")
    time.sleep(2.0)
    for _ in range(5):  # the admin API answers at once, while every download is stuck
        started = time.monotonic()
        assert server.get("/admin/models").status_code == 200
        assert time.monotonic() - started < 2.0
    server.write_config("models:\n" + stalled + f"  - {{name: local, source: {tiny_model}}}\n")
    server.wait_ready("local", timeout=90)  # an edit is read and converges beside them
    processes = [p for p in psutil.process_iter(["cmdline"]) if "opta_lmx.engine.download_main" in (
        p.info["cmdline"] or []) and "opta-test/stalled-0" in p.info["cmdline"]]
    server.write_config("models:\n" + stalled.split("\n", 1)[1] + f"  - {{name: local, source: {tiny_model}}}\n")
    server.wait_for(lambda s: "s0" not in s.phases(), 30, "s0 removed")
    assert processes
    server.wait_for(lambda s: not any(p.is_running() and p.status() != "zombie" for p in processes), 10,
                    "the removed model's download process gone")
    assert "DownloadCancelled" in [e["reason"] for e in server.get("/admin/events").json()["events"]
                                   if e["object"] == "s0"]
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 5 + 5  # the stop grace (5 s here), with room for the process exit
    left = [p for p in psutil.process_iter(["cmdline"]) if "opta_lmx.engine.download_main" in (p.info["cmdline"] or [])]
    assert not [p for p in left if p.is_running() and p.status() != "zombie"]

"""One model across two hosts (issue 21) through MLX's own runtime: `mlx.launch --backend ring`
runs `mlx_lm.server` as two ranks on loopback (standing in for two Macs), started by the host of
rank 0; both hosts' gateways answer for it, and no rank outlives an unload or a shutdown."""

from __future__ import annotations

import json

import httpx
import psutil
import pytest

from tests.lmx_harness import free_port, lmx_env, start_server, stop_and_check

FLEET_KEY = "fleet-key-for-tests-0123456789"


def fleet_yaml(ports: dict[str, int], model: str, state: str = "loaded") -> str:
    hosts = "".join(f'    - {{name: {name}, url: "http://127.0.0.1:{port}"}}\n' for name, port in ports.items())
    return (f"fleet:\n  grace: 5s\n  hosts:\n{hosts}models:\n"
            f"  - name: big\n    source: {model}\n    state: {state}\n"
            f"    distributed: {{hosts: [r0, r1], split: tensor}}\n")


def ranks() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "mlx_lm.server" in cmdline and not any(arg.endswith("mlx.launch") for arg in cmdline):
            found.append(proc)  # a rank (not the launcher, whose command line names it too)
    return found


def chat(base: str, stream: bool = False, **headers) -> httpx.Response:
    body = {"model": "big", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "stream": stream}
    return httpx.post(base + "/v1/chat/completions", json=body, headers=headers, timeout=120)


@pytest.mark.timeout(300)
def test_a_model_over_two_ranks_answers_through_either_host_and_no_rank_outlives_it(tmp_path, tiny_model):
    assert not ranks(), "another test left mlx_lm.server running"
    ports = {"r0": free_port(), "r1": free_port()}
    servers = {}
    try:
        for name, port in ports.items():
            config = tmp_path / name / "models.yaml"
            config.parent.mkdir()
            config.write_text(fleet_yaml(ports, str(tiny_model)))
            servers[name] = start_server(config, tmp_path / name / "state", "--fleet-host", name, port=port,
                                         env=lmx_env(LMX_FLEET_KEY=FLEET_KEY))
        r0, r1 = servers["r0"], servers["r1"]
        r0.wait_ready("big", timeout=180)
        assert len(ranks()) == 2, [p.info["cmdline"] for p in ranks()]
        status = {m["name"]: m["status"] for m in r1.admin_models()["models"]}["big"]
        assert status["phase"] == "Unloaded" and status["reason"] == "OnAnotherHost" and status["host"] == "r0"

        direct = chat(r0.base_url)
        assert direct.status_code == 200, direct.text
        assert direct.json()["choices"][0]["message"]["content"] is not None
        forwarded = chat(r1.base_url)
        assert forwarded.status_code == 200 and forwarded.headers["x-lmx-host"] == "r0", forwarded.text
        streamed = chat(r1.base_url, stream=True)
        chunks = [line for line in streamed.text.splitlines() if line.startswith("data: {")]
        assert streamed.status_code == 200 and len(chunks) >= 2, streamed.text[:500]
        assert all(json.loads(c[6:])["object"] == "chat.completion.chunk" for c in chunks)
        scraped = httpx.get(r1.base_url + "/metrics").text
        (counted,) = [line for line in scraped.splitlines() if line.startswith("lmx_requests_forwarded_total{")]
        assert all(label in counted for label in ('model="big"', 'peer="r0"', 'host="r1"')), counted
        assert counted.endswith(" 2.0"), counted
        assert all('host="r1"' in line for line in scraped.splitlines() if line and not line.startswith("#"))
        listed = {m["id"]: m for m in httpx.get(r1.base_url + "/v1/models").json()["data"]}
        assert listed["big"]["host"] == "r0" and listed["big"]["status"] == "Ready"

        # peers take fleet calls only with the fleet key
        assert httpx.get(r0.base_url + "/fleet/status").status_code == 401
        assert httpx.get(r0.base_url + "/fleet/status", headers={"x-lmx-fleet-key": "wrong"}).status_code == 401
        assert chat(r0.base_url, **{"x-lmx-hop": "r1"}).status_code == 401
        # a forwarded request for a model this host does not run is sent back (421), never served 503
        misdirected = chat(r1.base_url, **{"x-lmx-hop": "r0", "x-lmx-fleet-key": FLEET_KEY})
        assert misdirected.status_code == 421 and misdirected.json()["error"]["code"] == "misdirected"

        for server in servers.values():  # unloading stops every rank
            server.write_config(fleet_yaml(ports, str(tiny_model), "unloaded"))
        r0.wait_for(lambda s: s.phases()["big"] == "Unloaded" and not ranks(), 60, "every rank stopped")

        for server in servers.values():
            server.write_config(fleet_yaml(ports, str(tiny_model)))
        r0.wait_ready("big", timeout=180)
        assert len(ranks()) == 2
    finally:
        for server in servers.values():
            stop_and_check(server)  # shutdown stops every rank, and fails if one is left
    assert not ranks()

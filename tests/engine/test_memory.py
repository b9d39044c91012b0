"""Memory estimates from a model's files, and measurement of a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from opta_lmx.engine.memory import (
    CONTEXT_CAP_TOKENS,
    FORKED_OVERHEAD_BYTES,
    KV_SEQUENCES,
    WORKER_OVERHEAD_BYTES,
    estimate,
    kv_cache_bytes,
    process_bytes,
    tree_bytes,
    weights_bytes,
)
from opta_lmx.state.spec import EngineOptions

CONFIG = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
          "hidden_size": 256, "max_position_embeddings": 100_000, "torch_dtype": "bfloat16"}


def write_model(tmp_path, config=CONFIG, shards=(1000, 2000)):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for index, size in enumerate(shards):
        (tmp_path / f"model-{index}.safetensors").write_bytes(b"\0" * size)
    return tmp_path


def test_weights_are_the_safetensors_sizes_or_the_index_total(tmp_path):
    assert weights_bytes(write_model(tmp_path / "m")) == 3000
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1234}}))
    assert weights_bytes(tmp_path / "idx") == 1234
    assert weights_bytes(tmp_path) is None


def test_kv_allowance_from_config_and_engine_options():
    per_token = 2 * 4 * 2 * (256 // 8) * 2  # K and V x layers x kv heads x head dim x bf16
    assert kv_cache_bytes(CONFIG, EngineOptions()) == per_token * CONTEXT_CAP_TOKENS  # capped context, 1 sequence
    assert kv_cache_bytes(CONFIG, EngineOptions(max_kv_size=1000)) == per_token * 1000
    batching = EngineOptions(continuous_batching=True, max_num_seqs=64, max_kv_size=1000)
    assert kv_cache_bytes(CONFIG, batching) == per_token * 1000 * KV_SEQUENCES
    assert kv_cache_bytes({**CONFIG, "head_dim": 64}, EngineOptions(max_kv_size=10)) == per_token * 2 * 10
    assert kv_cache_bytes(CONFIG, EngineOptions(max_kv_size=10, kv_cache_quantization=True)) == per_token // 2 * 10
    assert kv_cache_bytes({}, EngineOptions()) == 0


def test_estimate_adds_weights_kv_and_worker_and_override_wins(tmp_path):
    path = write_model(tmp_path / "m")
    est = estimate(str(path), EngineOptions(max_kv_size=100))
    assert est.total_bytes == 3000 + kv_cache_bytes(CONFIG, EngineOptions(max_kv_size=100)) + WORKER_OVERHEAD_BYTES
    assert "weights" in est.describe()
    assert estimate(str(path), EngineOptions(), override_bytes=42).total_bytes == 42
    unknown = estimate("some-org/not-cached-anywhere", EngineOptions())
    assert not unknown.known and unknown.total_bytes == WORKER_OVERHEAD_BYTES and "unknown" in unknown.describe()


def test_estimate_of_a_generated_model_matches_its_files(tiny_model):
    files = sum(f.stat().st_size for f in tiny_model.glob("*.safetensors"))
    assert estimate(str(tiny_model), EngineOptions()).weights_bytes == files > 0


def test_a_process_is_measured_and_a_dead_pid_reads_none():
    assert tree_bytes(os.getpid()) > 10 * 1024**2
    assert tree_bytes(2**22 + 12345) is None


def test_an_estimate_knows_how_its_worker_starts(tmp_path):
    est = estimate(str(write_model(tmp_path / "m")), EngineOptions(max_kv_size=100))
    assert est.started(False) == est and est.overhead_bytes == WORKER_OVERHEAD_BYTES
    forked = est.started(True)
    assert forked.total_bytes == est.total_bytes - WORKER_OVERHEAD_BYTES + FORKED_OVERHEAD_BYTES
    assert estimate(str(tmp_path / "m"), EngineOptions(), override_bytes=42).started(True).total_bytes == 42


# A parent that fills 200 MiB, forks a child that shares those pages and writes 20 MiB of its own.
_FAMILY = """
import os, sys, time
block = bytearray(os.urandom(1024)) * (200 * 1024)
child = os.fork()
if child == 0:
    own = bytearray(os.urandom(1024)) * (20 * 1024)
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    time.sleep(60)
    os._exit(0)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the figures are Linux's (/proc)")
def test_forked_pages_are_counted_once_in_the_parent_and_the_child_counts_its_own():
    """The accounting model (docs/reconciler.md): a template's anonymous memory does not change as
    children fork from it, and a forked child counts only its own pages (never the shared ones again)."""
    proc = subprocess.Popen([sys.executable, "-c", _FAMILY], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        parent = psutil.Process(proc.pid)
        (child,) = parent.children()
        MiB = 1024**2
        assert process_bytes(parent, private=False) > 200 * MiB  # the shared block is the parent's
        assert 20 * MiB < process_bytes(child, private=True) < 60 * MiB  # the child: its own 20 MiB
        assert process_bytes(child, private=False) > 200 * MiB  # (anonymous would count the block again)
    finally:
        for member in psutil.Process(proc.pid).children():
            member.kill()
        proc.kill()
        proc.wait()


def test_estimate_from_listing_matches_the_local_estimate(tmp_path):
    from opta_lmx.engine.memory import estimate_from_listing

    directory = write_model(tmp_path / "m")
    sizes = {p.name: p.stat().st_size for p in directory.iterdir()}
    sizes["sub/model-9.safetensors"] = 10**9  # not a top-level weight file: not counted, as on disk
    engine = EngineOptions()
    assert estimate_from_listing(sizes, CONFIG, engine) == estimate(str(directory), engine)
    assert not estimate_from_listing({"config.json": 10}, CONFIG, engine).known

"""Kept prefix caches (engine/prefix_cache.py): keyed by what makes them valid, one writer at a
time, bounded on disk. Pure file-system tests; tests/e2e/test_warm_swaps.py runs real workers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from opta_lmx.engine.prefix_cache import LINK_PARENT, PREFIX_DIR, SSD_DIR, KeptCaches, cache_key

KiB = 1024


def saved(home: Path, name: str = "entry_0.safetensors", size: int = 10 * KiB, entries: int = 1) -> None:
    """What vllm-mlx writes at shutdown into HOME/.cache/vllm-mlx/prefix_cache/<model>/<provenance>/."""
    directory = home / LINK_PARENT / PREFIX_DIR / "--models--m" / "abc123"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(b"k" * size)
    (directory / "index.json").write_text(json.dumps({"num_entries": entries}))


def spilled(home: Path, size: int = 10 * KiB) -> None:
    data = home / LINK_PARENT / SSD_DIR / "data" / f"e{time.monotonic_ns()}"
    data.mkdir(parents=True)
    (data / "layer0.bin").write_bytes(b"s" * size)


def new_home(tmp_path: Path, worker: str) -> Path:
    home = tmp_path / "workers" / worker / "home"
    home.mkdir(parents=True)
    return home


def test_a_worker_writes_into_the_models_kept_cache_and_the_next_one_reads_it(tmp_path):
    caches = KeptCaches(tmp_path / "kept")
    first = new_home(tmp_path, "w1")
    assert caches.attach("w1", "m", "k1", first)
    assert (first / LINK_PARENT / PREFIX_DIR).is_symlink()
    saved(first, entries=3)
    spilled(first)
    caches.release("w1")
    figures = caches.figures()["m"]
    assert figures.entries == 4 and figures.size_bytes >= 20 * KiB and not figures.in_use
    second = new_home(tmp_path, "w2")
    assert caches.attach("w2", "m", "k1", second)
    assert (second / LINK_PARENT / PREFIX_DIR / "--models--m" / "abc123" / "index.json").is_file()
    assert caches.figures()["m"].in_use


def test_a_changed_key_never_reuses_the_old_cache_and_removes_it_once_free(tmp_path):
    caches = KeptCaches(tmp_path / "kept")
    old = new_home(tmp_path, "w1")
    caches.attach("w1", "m", "old", old)
    saved(old)
    new = new_home(tmp_path, "w2")
    caches.attach("w2", "m", "new", new)  # make-before-break: the old worker still serves
    assert not (new / LINK_PARENT / PREFIX_DIR / "--models--m").exists()
    assert caches.directory("m", "old").is_dir()  # its worker still holds it
    caches.release("w1")
    assert not caches.directory("m", "old").exists()
    assert caches.directory("m", "new").is_dir()


def test_two_workers_of_one_key_never_write_one_cache_at_once(tmp_path):
    caches = KeptCaches(tmp_path / "kept")
    first = new_home(tmp_path, "w1")
    caches.attach("w1", "m", "k", first)
    saved(first, "entry_0.safetensors")
    second = new_home(tmp_path, "w2")
    assert not caches.attach("w2", "m", "k", second)  # starts from a private copy
    link = (second / LINK_PARENT / PREFIX_DIR).resolve()
    assert caches.directory("m", "k") not in link.parents
    assert (link / "--models--m" / "abc123" / "entry_0.safetensors").is_file()  # what was saved so far
    saved(second, "entry_9.safetensors")  # the copy, not the kept cache
    assert not (caches.directory("m", "k") / PREFIX_DIR / "--models--m" / "abc123" / "entry_9.safetensors").exists()
    caches.release("w1")  # the first is gone: the second takes the kept cache over
    assert caches.holder("m", "k") == "w2"
    assert (second / LINK_PARENT / PREFIX_DIR).resolve() == caches.directory("m", "k") / PREFIX_DIR
    saved(second, "entry_5.safetensors")  # its save at shutdown lands in the kept cache
    assert (caches.directory("m", "k") / PREFIX_DIR / "--models--m" / "abc123" / "entry_5.safetensors").is_file()


def test_a_previous_runs_worker_keeps_its_lease(tmp_path):
    caches = KeptCaches(tmp_path / "kept")
    home = new_home(tmp_path, "w1")
    caches.attach("w1", "m", "k", home)
    restarted = KeptCaches(tmp_path / "kept")  # a control-plane restart
    restarted.adopt("w1", home)
    assert restarted.holder("m", "k") == "w1"
    assert restarted.clear("m") == ([], ["m"])  # held: not removed, and said
    restarted.release("w1")
    assert restarted.clear("m") == (["m/k"], [])


def test_the_per_model_budget_drops_the_ssd_tier_first(tmp_path):
    caches = KeptCaches(tmp_path / "kept", per_model=30 * KiB, total=1024 * KiB)
    home = new_home(tmp_path, "w1")
    caches.attach("w1", "m", "k", home)
    saved(home, size=20 * KiB)
    spilled(home, size=20 * KiB)
    caches.release("w1")
    kept = caches.directory("m", "k")
    assert not (kept / SSD_DIR).exists() and (kept / PREFIX_DIR).is_dir()


def test_the_total_budget_evicts_the_least_recently_used_cache_and_never_one_in_use(tmp_path):
    caches = KeptCaches(tmp_path / "kept", per_model=100 * KiB, total=50 * KiB)
    for index, model in enumerate(("a", "b")):
        home = new_home(tmp_path, f"w{model}")
        caches.attach(f"w{model}", model, "k", home)
        saved(home, size=20 * KiB)
        caches.release(f"w{model}")
        os.utime(caches.directory(model, "k"), (1000 + index, 1000 + index))  # a: used first
    busy = new_home(tmp_path, "wc")
    caches.attach("wc", "c", "k", busy)
    saved(busy, size=20 * KiB)  # 60 KiB in all, over the 50 KiB total
    assert "a: least recently used" in " ".join(caches.enforce())
    assert not caches.directory("a", "k").exists()
    assert caches.directory("b", "k").exists() and caches.directory("c", "k").exists()
    caches.set_budgets(100 * KiB, 10 * KiB)
    caches.enforce()
    assert caches.directory("c", "k").exists()  # in use: never evicted, whatever the budget


def test_the_key_follows_the_weights_and_the_kv_options_only(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 100)
    base = cache_key(str(model), {"continuous_batching": True}, model)
    assert base == cache_key(str(model), {"continuous_batching": True, "tool_call_parser": "hermes"}, model)
    assert base != cache_key(str(model), {"continuous_batching": True, "kv_cache_quantization": True}, model)
    assert base != cache_key(str(model), {"continuous_batching": True, "max_kv_size": 512}, model)
    assert base != cache_key(str(tmp_path / "other"), {"continuous_batching": True}, model)
    (model / "model.safetensors").write_bytes(b"v" * 101)  # the weights changed in place
    assert base != cache_key(str(model), {"continuous_batching": True}, model)


def test_a_warm_prompts_file_is_read_as_a_regular_file_only(tmp_path):
    """Named in models.yaml: a FIFO there must not hang the start thread, a missing file is said."""
    import os

    from opta_lmx.engine.prefix_cache import warm_prompts_problem

    fifo = tmp_path / "prompts.json"
    os.mkfifo(fifo)
    assert "not a regular file" in warm_prompts_problem(str(fifo))
    assert "No such file" in warm_prompts_problem(str(tmp_path / "missing.json"))
    good = tmp_path / "good.json"
    good.write_text('[[{"role": "system", "content": "You are terse."}]]')
    assert warm_prompts_problem(str(good)) is None

"""Kept prefix caches: a model's prefix cache belongs to the model, not to one worker (issue 23).

vllm-mlx keeps a worker's prefix cache under `~/.cache/vllm-mlx/prefix_cache/` (saved there when
it shuts down gracefully, loaded from there when it starts) and, with `--ssd-cache-dir`, spills
evicted entries to an SSD tier as it serves. Every worker has a HOME of its own; here those two
directories of a worker's HOME are links into the model's kept cache in the state directory:

    <state>/prefix-caches/<model>/<key>/prefix_cache/   vllm-mlx's saved entries
    <state>/prefix-caches/<model>/<key>/ssd_cache/      its SSD tier (index.db, data/)

The key is what makes a cache valid: the model's weights (the resolved source and the size and
modification time of its weight and config files) and the engine options that change the KV
layout (continuous batching, KV quantization, max_kv_size, trust_remote_code, extra flags). A
changed key starts a new cache and removes the model's older ones once no worker uses them.

One worker writes a kept cache at a time: the first worker of a key holds its lease (its links
point at the kept directories); a second worker of the same key alive at once (a make-before-
break swap that changed no KV option) starts from a private copy of what was last saved, and
takes the lease over when the holder is gone (its links are re-pointed, so its own save at
shutdown goes to the kept cache). A crashed worker keeps whatever its SSD tier had written.

Budgets: each model's cache at most `per_model` (its SSD tier is told half of it; over it once its
worker is gone, the SSD tier goes first, then the saved entries), all kept caches at most
`total`, evicting the least recently used whole caches first; a cache in use is never evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from opta_lmx.engine.files import UnreadableFile, read_regular_file
from opta_lmx.state.quantities import format_size

log = logging.getLogger(__name__)

PREFIX_DIR, SSD_DIR = "prefix_cache", "ssd_cache"
LINK_PARENT = Path(".cache") / "vllm-mlx"  # inside a worker's HOME: where vllm-mlx looks
KV_OPTIONS = ("continuous_batching", "kv_cache_quantization", "max_kv_size", "trust_remote_code", "extra_args")
_WEIGHT_FILES = ("*.safetensors", "config.json", "model.safetensors.index.json")


@dataclass(frozen=True)
class CacheFigures:
    """What a model's kept cache holds, for status and `lmx get models`."""

    key: str
    size_bytes: int
    entries: int  # saved prefix entries + SSD tier entries
    last_used: float  # when a worker last held it, or wrote to it
    in_use: bool

    def to_dict(self) -> dict:
        return {"key": self.key, "size_bytes": self.size_bytes, "entries": self.entries,
                "age_seconds": max(0.0, time.time() - self.last_used), "in_use": self.in_use}


def cache_key(source: str, engine: dict, directory: Path | None) -> str:
    """What makes a cache valid: the weights (source, and its files' sizes and mtimes where it is a
    local directory) and the KV-affecting engine options. Blocking: stats files (a start thread)."""
    stamp: list = []
    if directory is not None:
        for pattern in _WEIGHT_FILES:
            for path in sorted(directory.glob(pattern)):
                try:
                    info = path.stat()
                except OSError:
                    continue
                stamp.append([path.name, info.st_size, info.st_mtime_ns])
    options = {name: engine.get(name) for name in KV_OPTIONS if engine.get(name) not in (None, [], False)}
    payload = json.dumps({"source": source, "weights": stamp, "kv": options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


WARM_PROMPTS_MAX_BYTES = 16 * 1024**2


def warm_prompts_problem(path: str) -> str | None:
    """Why vllm-mlx could not warm a cache from `path` (its shape: a JSON list of conversations,
    each a non-empty list of {role, content} messages), or None. vllm-mlx itself only logs a
    warning and starts cold: the control plane says it instead, as the model's error."""
    try:  # a file named in models.yaml: never a FIFO or a device, never unbounded
        raw = read_regular_file(Path(path), WARM_PROMPTS_MAX_BYTES)
    except UnreadableFile as error:
        return f"warm_prompts {path}: {error}"
    if raw is None:
        return f"warm_prompts {path}: No such file or directory"
    try:
        data = json.loads(raw)
    except ValueError as error:
        return f"warm_prompts {path}: not JSON ({error})"
    if not isinstance(data, list) or not data:
        return f"warm_prompts {path}: expected a non-empty JSON list of conversations"
    for index, conversation in enumerate(data):
        if not isinstance(conversation, list) or not conversation or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
            return f"warm_prompts {path}: entry {index} is not a non-empty list of {{role, content}} messages"
    return None


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def entry_count(path: Path) -> int:
    """Saved prefix entries (vllm-mlx's index.json files) plus SSD tier entries (its data dirs)."""
    count = 0
    for index in (path / PREFIX_DIR).glob("*/*/index.json"):
        try:
            count += int(json.loads(index.read_text()).get("num_entries", 0))
        except (OSError, ValueError, AttributeError):
            continue
    data = path / SSD_DIR / "data"
    if data.is_dir():
        count += sum(1 for entry in data.iterdir() if entry.is_dir())
    return count


class KeptCaches:
    """The state directory's kept prefix caches, and which worker holds each one."""

    def __init__(self, root: Path, *, per_model: int = 8 * 1024**3, total: int = 32 * 1024**3):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.per_model, self.total = per_model, total
        self._lock = threading.Lock()
        self._holders: dict[Path, str] = {}  # kept directory -> the worker id holding its lease
        self._waiting: dict[str, Path] = {}  # worker id -> the kept directory it takes over when free
        self._homes: dict[str, Path] = {}  # worker id -> its HOME
        self._current: dict[str, str] = {}  # model -> the key its newest worker started with

    def set_budgets(self, per_model: int, total: int) -> None:
        self.per_model, self.total = per_model, total

    def directory(self, model: str, key: str) -> Path:
        return self.root / model / key

    # -- workers ------------------------------------------------------------------------
    def attach(self, worker_id: str, model: str, key: str, home: Path) -> bool:
        """Link a new worker's cache directories (in `home`) to the model's kept cache, or to a
        private copy of it while another worker holds the lease. True when it holds the lease."""
        kept = self.directory(model, key)
        with self._lock:
            self._current[model] = key
            self._forget_other_keys(model, key)
            for part in (PREFIX_DIR, SSD_DIR):
                (kept / part).mkdir(parents=True, exist_ok=True, mode=0o700)
            os.utime(kept)
            self._homes[worker_id] = home
            holder = self._holders.get(kept)
            if holder is None:
                self._holders[kept] = worker_id
                self._link(home, kept)
                return True
            private = home / ".cache" / "opta-lmx-private-cache"
            shutil.rmtree(private, ignore_errors=True)
            shutil.copytree(kept, private, symlinks=False, dirs_exist_ok=True)
            self._waiting[worker_id] = kept
            self._link(home, private)
            log.info("worker %s starts from a copy of %s (held by %s) and takes it over when that one is gone",
                     worker_id, kept, holder)
            return False

    def adopt(self, worker_id: str, home: Path) -> None:
        """A previous run's worker: its links say which kept cache it holds."""
        link = home / LINK_PARENT / PREFIX_DIR
        try:
            target = link.resolve().parent
        except OSError:
            return
        if link.is_symlink() and self.root in target.parents:
            with self._lock:
                self._holders.setdefault(target, worker_id)
                self._homes[worker_id] = home

    def release(self, worker_id: str) -> None:
        """A worker is gone (it saved, or crashed): its lease passes to a waiting worker of the same
        key (its links are re-pointed, so its save goes to the kept cache), and budgets are applied."""
        with self._lock:
            self._homes.pop(worker_id, None)
            self._waiting.pop(worker_id, None)
            for kept, holder in list(self._holders.items()):
                if holder != worker_id:
                    continue
                del self._holders[kept]
                if kept.exists():
                    os.utime(kept)  # its last use: the least recently used cache is evicted first
                successor = next((w for w, k in self._waiting.items() if k == kept), None)
                if successor is not None:
                    del self._waiting[successor]
                    self._holders[kept] = successor
                    # Its saved entries go to the kept cache from now on; its SSD tier keeps the
                    # private copy it opened (vllm-mlx holds that index open): lost with its HOME.
                    self._link(self._homes[successor], kept, parts=(PREFIX_DIR,))
                    log.info("worker %s now holds the kept cache %s", successor, kept)
                elif kept.parent.name in self._current and kept.name != self._current[kept.parent.name]:
                    self._forget_other_keys(kept.parent.name, self._current[kept.parent.name])
            self.enforce(locked=True)

    def holder(self, model: str, key: str) -> str | None:
        with self._lock:
            return self._holders.get(self.directory(model, key))

    @staticmethod
    def _link(home: Path, target: Path, parts: tuple[str, ...] = (PREFIX_DIR, SSD_DIR)) -> None:
        """Point `home`'s vllm-mlx cache directories at `target`'s (replaced atomically)."""
        parent = home / LINK_PARENT
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for part in parts:
            link = parent / part
            fresh = parent / f".{part}.{os.getpid()}.link"
            fresh.unlink(missing_ok=True)
            fresh.symlink_to(target / part, target_is_directory=True)
            if link.exists() and not link.is_symlink():
                shutil.rmtree(link, ignore_errors=True)
            os.replace(fresh, link)

    # -- budgets, figures, clearing ------------------------------------------------------
    def _in_use(self) -> set[Path]:
        return set(self._holders) | set(self._waiting.values())

    def _forget_other_keys(self, model: str, key: str) -> None:
        """A changed key invalidates the model's older caches (those no worker uses)."""
        in_use = self._in_use()
        for old in (self.root / model).glob("*"):
            if old.name != key and old.is_dir() and old not in in_use:
                log.info("removing the kept cache %s of %s: its weights or KV options changed", old.name, model)
                shutil.rmtree(old, ignore_errors=True)

    def enforce(self, locked: bool = False) -> list[str]:
        """Apply the budgets: a model's cache over `per_model` loses its SSD tier, then its saved
        entries; then the least recently used caches go until all fit `total`. A cache in use is
        never removed. What was removed."""
        if not locked:
            with self._lock:
                return self.enforce(locked=True)
        in_use = self._in_use()
        removed = []
        caches = []
        for path in self._all():
            if path in in_use:
                continue
            size = directory_bytes(path)
            for part in (SSD_DIR, PREFIX_DIR):  # over its own budget: the SSD tier goes first
                if size <= self.per_model:
                    break
                shutil.rmtree(path / part, ignore_errors=True)
                removed.append(f"{path.parent.name}: its {part} ({format_size(size)} in all) over its "
                               f"{format_size(self.per_model)} budget")
                size = directory_bytes(path)
            caches.append((path, size, path.stat().st_mtime))
        total = sum(s for _p, s, _t in caches) + sum(directory_bytes(p) for p in in_use if p.exists())
        for path, size, _ in sorted(caches, key=lambda c: c[2]):
            if total <= self.total:
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed.append(f"{path.parent.name}: least recently used, over the {format_size(self.total)} total")
        self._prune_empty_models()
        for what in removed:
            log.info("kept cache removed (%s)", what)
        return removed

    def _prune_empty_models(self) -> None:
        for model_dir in self.root.glob("*"):
            if model_dir.is_dir() and not any(model_dir.iterdir()):
                model_dir.rmdir()

    def _all(self) -> Iterable[Path]:
        return [k for m in self.root.glob("*") if m.is_dir() for k in m.glob("*") if k.is_dir()]

    def figures(self) -> dict[str, CacheFigures]:
        """Per model, its newest kept cache (reads the disk: off the event loop)."""
        with self._lock:
            in_use = self._in_use()
        found: dict[str, CacheFigures] = {}
        for path in self._all():
            try:
                used = path.stat().st_mtime
            except OSError:
                continue
            figure = CacheFigures(path.name, directory_bytes(path), entry_count(path), used, path in in_use)
            current = found.get(path.parent.name)
            if current is None or figure.last_used > current.last_used:
                found[path.parent.name] = figure
        return found

    def clear(self, model: str | None = None) -> tuple[list[str], list[str]]:
        """Remove kept caches (of `model`, else all) that no worker uses: (what was removed as
        `model/key`, the models whose cache a running worker holds and was kept)."""
        with self._lock:
            in_use = self._in_use()
            removed, held = [], []
            for path in self._all():
                if model is not None and path.parent.name != model:
                    continue
                if path in in_use:
                    held.append(path.parent.name)
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed.append(f"{path.parent.name}/{path.name}")
            self._prune_empty_models()
            return removed, sorted(set(held))

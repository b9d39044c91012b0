"""How much memory a model takes: estimated before loading, measured once it runs.

The planner admits models by these figures, so an estimate errs on the generous side:
weights (the safetensors bytes) + a KV-cache allowance + the worker process itself.
A `memory:` override in models.yaml replaces the whole estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from opta_lmx.engine.files import UnreadableFile, read_regular_file
from opta_lmx.engine.worker_auth import loopback_client
from opta_lmx.state.quantities import format_size
from opta_lmx.state.spec import EngineOptions

# What a worker holds of its own beyond its weights, by how it starts. Counted as the machine
# loses it (docs/reconciler.md, "Memory accounting"): anonymous memory for a fresh process (its
# imported libraries' file pages are page cache the kernel counts as available), private memory
# for one forked from the template (the pages it shares with the template are the template's
# fixed cost, counted once). Measured on Linux CPU with vllm-mlx 0.6.0 / MLX 0.32 by
# bench/memory_accounting.py and bench/memory_estimates.py: 462-469 MiB for a cold worker after
# its load, 28-37 MiB for a forked one (what a request adds is the KV allowance's business);
# rounded up to leave a little room.
WORKER_OVERHEAD_BYTES = 512 * 1024**2  # a cold worker, or one started through a spare
FORKED_OVERHEAD_BYTES = 64 * 1024**2  # a worker forked from the pre-imported template
# What the fast starts hold before they were ever measured here (then their measurement):
# the waiting template (461 MiB measured), the template while it warms up (it runs a throwaway
# worker on the warm-up model beside itself), one waiting spare (464 MiB measured).
TEMPLATE_BYTES = 512 * 1024**2
TEMPLATE_WARMING_BYTES = 1024 * 1024**2
SPARE_BYTES = 512 * 1024**2
# What the kernel holds for each process beyond its page tables (its task, memory map and
# thread stacks in unreclaimable slab): about 1 MiB for a vllm-mlx worker, measured against
# /proc/meminfo by bench/memory_accounting.py; rounded up so that the plan never counts less.
KERNEL_BYTES_PER_PROCESS = 2 * 1024**2

# The KV-cache allowance: context tokens per sequence when nothing bounds it, and how many
# sequences at full context we budget for. vllm-mlx grows its cache with use, so budgeting
# max_num_seqs full contexts would refuse almost every model; a few full contexts is what a
# busy single-user machine sees. Set `memory:` on an entry for anything else.
CONTEXT_CAP_TOKENS = 8192
KV_SEQUENCES = 4

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class MemoryEstimate:
    """A model's expected footprint, in parts, so messages can say where it comes from."""

    weights_bytes: int = 0
    kv_cache_bytes: int = 0
    overhead_bytes: int = WORKER_OVERHEAD_BYTES
    override_bytes: int | None = None
    known: bool = True  # False when the weights could not be found (a hub id not in the cache)

    def started(self, forked: bool) -> "MemoryEstimate":
        """The estimate for a worker that starts this way: a forked worker's own overhead is far
        smaller than a fresh process's (it shares the template's imports)."""
        return dataclasses.replace(self, overhead_bytes=FORKED_OVERHEAD_BYTES) if forked else self

    @property
    def total_bytes(self) -> int:
        if self.override_bytes is not None:
            return self.override_bytes
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def describe(self) -> str:
        if self.override_bytes is not None:
            return f"{format_size(self.override_bytes)} (memory: in models.yaml)"
        text = (
            f"{format_size(self.total_bytes)} (weights {format_size(self.weights_bytes)}"
            f" + KV cache {format_size(self.kv_cache_bytes)} + worker {format_size(self.overhead_bytes)})"
        )
        return text if self.known else text + ", weights unknown: not in the local cache"


class ModelDirectoryError(ValueError):
    """A model directory that cannot be read as a model (a FIFO or device for a file, a dangling
    weights link, a non-numeric config value, an unknown user in `~user/`): its model fails for
    good until its entry changes; nothing else is affected."""


# Caps on what the estimator reads: config.json of the largest hub models is a few KiB and an
# index a few MiB; a larger file is not a model's.
CONFIG_MAX_BYTES = 4 * 1024**2
INDEX_MAX_BYTES = 64 * 1024**2
# Numbers in config.json above this (layers, heads, context) are not a real model's.
_CONFIG_INT_MAX = 2**40


def model_directory(source: str) -> Path | None:
    """The local directory holding `source`: a path, or a hub id already in the hub cache."""
    try:
        path = Path(source).expanduser()
        is_dir = path.is_dir()
    except RuntimeError as error:  # `~nosuchuser/x`
        raise ModelDirectoryError(f"cannot resolve {source}: {error}") from None
    except (OSError, ValueError) as error:
        raise ModelDirectoryError(f"cannot read {source}: {error}") from None
    if is_dir:
        return path
    if source.startswith(("/", ".", "~")) or source.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or no hub library: the estimate says unknown
        return None


def read_small_file(path: Path, limit: int) -> bytes | None:
    """A regular file of the model's (None if missing), never blocking (engine/files.py)."""
    try:
        return read_regular_file(path, limit)
    except UnreadableFile as error:
        raise ModelDirectoryError(str(error)) from None


def read_json_file(path: Path, limit: int) -> object | None:
    """A small JSON file, parsed; None if it does not exist. Not JSON: ModelDirectoryError."""
    data = read_small_file(path, limit)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise ModelDirectoryError(f"{path.name} is not valid JSON: {error}") from None


def weights_bytes(directory: Path) -> int | None:
    """Bytes of weights: the safetensors files' sizes, else the index's `total_size`."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        total = 0
        for file in files:
            try:
                info = file.stat()
            except FileNotFoundError:
                raise ModelDirectoryError(f"weights file {file.name} is a dangling link "
                                          "(a pruned hub cache? download the model again)") from None
            except OSError as error:
                raise ModelDirectoryError(f"cannot read weights file {file.name}: {error.strerror}") from None
            if not stat.S_ISREG(info.st_mode):
                raise ModelDirectoryError(f"weights file {file.name} is not a regular file")
            total += info.st_size
        return total
    index = read_json_file(directory / "model.safetensors.index.json", INDEX_MAX_BYTES)
    if index is None:
        return None
    try:
        total = index["metadata"]["total_size"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) and 0 <= total < 2**63 else None


def _config_int(cfg: dict, *keys: str) -> int:
    """The first of `keys` set in config.json, as a count; a value that is not one is an error."""
    for key in keys:
        value = cfg.get(key)
        if value is None or value == 0:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= _CONFIG_INT_MAX:
            raise ModelDirectoryError(f"config.json: {key} is not a count: {str(value)[:80]!r}")
        return value
    return 0


def kv_cache_bytes(config: dict, engine: EngineOptions) -> int:
    """KV allowance: 2 (K, V) x layers x KV heads x head dim x dtype bytes x context x sequences."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else None
    cfg = {**config, **(text or {})}
    layers = _config_int(cfg, "num_hidden_layers", "n_layer")
    heads = _config_int(cfg, "num_attention_heads", "n_head")
    kv_heads = _config_int(cfg, "num_key_value_heads") or heads
    hidden = _config_int(cfg, "hidden_size", "n_embd")
    head_dim = _config_int(cfg, "head_dim") or (hidden // heads if heads else 0)
    if not (layers and kv_heads and head_dim):
        return 0
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", "")
    dtype_bytes = 1 if engine.kv_cache_quantization else _DTYPE_BYTES.get(dtype, 2)
    per_token = 2 * layers * kv_heads * head_dim * dtype_bytes
    return per_token * context_tokens(cfg, engine) * kv_sequences(engine)


def context_tokens(config: dict, engine: EngineOptions) -> int:
    """Tokens one sequence may hold: max_kv_size if set, else the model's context capped."""
    if engine.max_kv_size:
        return engine.max_kv_size
    limit = _config_int(config, "max_position_embeddings") or CONTEXT_CAP_TOKENS
    return min(limit, CONTEXT_CAP_TOKENS)


def kv_sequences(engine: EngineOptions) -> int:
    """Sequences budgeted at full context: 1 without continuous batching, else up to KV_SEQUENCES."""
    if not engine.continuous_batching:
        return 1
    return max(1, min(engine.max_num_seqs or KV_SEQUENCES, KV_SEQUENCES))


def estimate(source: str, engine: EngineOptions, override_bytes: int | None = None) -> MemoryEstimate:
    """The footprint to plan with before a model is loaded. Reads only small regular files, and
    raises ModelDirectoryError for a directory that is not a readable model (see its docstring).
    Blocking file I/O: the loop calls it in a thread (reconciler/observing.py)."""
    if override_bytes is not None:
        return MemoryEstimate(override_bytes=override_bytes)
    directory = model_directory(source)
    if directory is None:
        return MemoryEstimate(known=False)
    weights = weights_bytes(directory)
    config = read_json_file(directory / "config.json", CONFIG_MAX_BYTES)
    kv = kv_cache_bytes(config, engine) if isinstance(config, dict) else 0
    if kv >= 2**63:
        raise ModelDirectoryError(f"config.json gives a KV cache of {kv} bytes: not a real model's")
    return MemoryEstimate(weights_bytes=weights or 0, kv_cache_bytes=kv, known=weights is not None)


def estimate_from_listing(sizes: Mapping[str, int], config: dict, engine: EngineOptions) -> MemoryEstimate:
    """The footprint from a hub repo's file listing (path -> bytes), before anything is downloaded.

    Same rule as `estimate` on a local directory: weights are the top-level safetensors files.
    """
    weights = [size for path, size in sizes.items() if "/" not in path and path.endswith(".safetensors")]
    kv = kv_cache_bytes(config, engine) if config else 0
    return MemoryEstimate(weights_bytes=sum(weights), kv_cache_bytes=kv, known=bool(weights))


def _status_kib(pid: int, *fields: str) -> int | None:
    """Sum of `fields` (kB lines) in /proc/PID/status: cheap, no page-table walk (Linux)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as handle:
            text = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    total, found = 0, False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            found = True
            total += int(value.split()[0])
    return total if found else None


def process_bytes(proc: psutil.Process, *, private: bool) -> int:
    """What one process costs the machine (docs/reconciler.md, "Memory accounting").

    Linux: its anonymous memory (RssAnon + RssShmem; file pages of its libraries are page cache,
    which the kernel counts as available), or with `private` its unique pages (USS), for a
    process forked from the template whose shared pages the template's fixed cost counts; plus
    what the kernel holds for it: its page tables (VmPTE, a few MiB) and KERNEL_BYTES_PER_PROCESS.
    Elsewhere (macOS): RSS; on Metal the MLX buffers are added by the caller.
    """
    if sys.platform.startswith("linux"):
        tables = (_status_kib(proc.pid, "VmPTE") or 0) * 1024 + KERNEL_BYTES_PER_PROCESS  # the kernel's share
        if private:
            return int(proc.memory_full_info().uss) + tables  # smaps_rollup: milliseconds, never on the event loop
        kib = _status_kib(proc.pid, "RssAnon", "RssShmem")
        if kib is not None:
            return kib * 1024 + tables
    return int(proc.memory_info().rss)


def tree_bytes(pid: int, *, private: bool = False) -> int | None:
    """`process_bytes` of a process and its children (what stopping them gives back); None if gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for proc in procs:
        try:
            total += process_bytes(proc, private=private)
        except psutil.Error:
            pass
    return total


def metal_backend() -> bool:
    """Whether workers run MLX on Metal, so that their MLX buffers are worth asking for."""
    return sys.platform == "darwin"


async def mlx_memory_bytes(address: str, client: httpx.AsyncClient | None = None, key: str | None = None) -> int:
    """MLX active + cache memory a worker reports in /v1/status (0 on the CPU backend)."""
    headers = {"Authorization": f"Bearer {key}"} if key else None
    try:
        if client is None:
            async with loopback_client(2.0) as own:
                response = await own.get(f"{address}/v1/status", headers=headers)
        else:
            response = await client.get(f"{address}/v1/status", timeout=2.0, headers=headers)
        metal = response.json().get("metal") or {}
        gigabytes = sum(float(metal.get(k) or 0) for k in ("active_memory_gb", "cache_memory_gb"))
    except (httpx.HTTPError, ValueError, AttributeError, TypeError):
        return 0
    return int(gigabytes * 1024**3) if math.isfinite(gigabytes) and gigabytes > 0 else 0


@dataclass(frozen=True)
class WorkerMemory:
    """One worker measured now: its processes, and (on Metal) the MLX buffers it reports."""

    process_bytes: int
    mlx_bytes: int = 0

    @property
    def counted_bytes(self) -> int:
        """What the plan counts for it: on Metal the GPU buffers live outside the process figure,
        so both are added (any page counted twice errs on the safe side); on CPU MLX reads 0."""
        return self.process_bytes + self.mlx_bytes


def machine_memory() -> tuple[int, int]:
    """(physical bytes, available bytes) for the whole machine."""
    vm = psutil.virtual_memory()
    return vm.total, vm.available

"""Writing a generated model into place: temp directory, marker last, rename; reuse when complete."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from opta_lmx.devmodel.sizes import DTYPES, FORMAT_VERSION, MARKER_FILE, SIZES
from opta_lmx.devmodel.tokenizer import _write_tokenizer, silenced_token_ids, train_tokenizer
from opta_lmx.devmodel.weights import _model_config, _write_json, _write_weights, tensor_plan
from opta_lmx.state.atomic import fsync_path

def _read_marker(directory: pathlib.Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(directory: str | os.PathLike[str], size: str | None = None,
                seed: int | None = None, dtype: str | None = None) -> bool:
    """True if ``directory`` holds a complete generated model (with these parameters, if given).

    Complete means: the marker is present, has the current format version, and every file it
    lists exists with the recorded byte size.
    """
    directory = pathlib.Path(directory)
    marker = _read_marker(directory)
    if marker is None or marker.get("format_version") != FORMAT_VERSION:
        return False
    for key, want in (("size", size), ("seed", seed), ("dtype", dtype)):
        if want is not None and marker.get(key) != want:
            return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, nbytes in files.items():
        try:
            if (directory / name).stat().st_size != nbytes:
                return False
        except OSError:
            return False
    return True


def model_files(directory: str | os.PathLike[str]) -> dict[str, int]:
    """File name -> size in bytes, as recorded in a generated model's marker ({} if none)."""
    marker = _read_marker(pathlib.Path(directory)) or {}
    files = marker.get("files")
    return dict(files) if isinstance(files, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _remove_stale_temps(target: pathlib.Path) -> None:
    """Delete temp/old siblings left by generator runs that were killed."""
    pattern = re.compile(r"^\." + re.escape(target.name) + r"\.(?:tmp|old)-(\d+)-")
    for sibling in target.parent.iterdir():
        m = pattern.match(sibling.name)
        if m and sibling.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _install(tmp: pathlib.Path, target: pathlib.Path) -> None:
    """Move the finished ``tmp`` directory to ``target`` as atomically as the OS allows."""
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()):
            if _read_marker(target) is None:
                raise FileExistsError(
                    f"{target} is not empty and is not a model made by opta_lmx.devmodel; "
                    "refusing to replace it")
            # Our own model with other parameters (or older format): swap it out.
            old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-",
                                                dir=target.parent))
            os.rename(target, old / "model")
            try:
                os.rename(tmp, target)
            finally:
                shutil.rmtree(old, ignore_errors=True)
            return
        target.rmdir()
    os.rename(tmp, target)


def make_model(directory: str | os.PathLike[str], size: str = "tiny", seed: int = 0,
               dtype: str = "float32",
               progress: Callable[[str], None] | None = None) -> pathlib.Path:
    """Generate a llama-architecture model directory and return its path.

    Args:
        directory: where the model goes (created if missing). If it already holds a complete
            model with the same size, seed and dtype, nothing is written. If it holds a model
            generated here with other parameters, that model is replaced. Any other non-empty
            directory is refused (FileExistsError).
        size: a key of SIZES: "tiny" (~1 MB), "small" (~100 MB), "medium" (~1 GB in float32).
        seed: seeds the tokenizer corpus and the weights; same seed, identical bytes.
        dtype: "float32" (default; fastest on MLX's CPU backend) or "float16".
        progress: called with short human-readable messages as the work proceeds.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {list(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    say = progress or (lambda _msg: None)
    target = pathlib.Path(directory).expanduser().absolute()
    if is_complete(target, size, seed, dtype):
        say(f"{target} already holds {size} seed={seed} {dtype}")
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-",
                                        dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a model directory is ordinary data
        say("training tokenizer")
        tokenizer = train_tokenizer(SIZES[size]["vocab_size"], seed)
        cfg = _model_config(size, dtype, tokenizer.get_vocab_size(with_added_tokens=True))
        _write_json(tmp / "config.json", cfg)
        _write_tokenizer(tmp, tokenizer, cfg)
        weight_files = _write_weights(tmp, cfg, seed, dtype, say, silenced_token_ids(tokenizer))
        say("syncing files")
        names = ["config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json", *weight_files]
        for name in names:
            fsync_path(tmp / name)
        n_params = sum(int(np.prod(shape)) for _, shape, _ in tensor_plan(cfg))
        # The marker goes last: its presence means every file before it is complete.
        _write_json(tmp / MARKER_FILE, {
            "generator": "opta_lmx.devmodel",
            "format_version": FORMAT_VERSION,
            "size": size,
            "seed": seed,
            "dtype": dtype,
            "parameters": n_params,
            "files": {name: (tmp / name).stat().st_size for name in sorted(names)},
        })
        fsync_path(tmp / MARKER_FILE)
        fsync_path(tmp)
        if is_complete(target, size, seed, dtype):
            # Another process finished the same model while we worked: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"{target} was completed concurrently")
            return target
        try:
            _install(tmp, target)
        except OSError:
            # Lost a race with a concurrent generator of the same model: theirs is as good.
            if is_complete(target, size, seed, dtype):
                shutil.rmtree(tmp, ignore_errors=True)
                say(f"{target} was completed concurrently")
                return target
            raise
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"done: {target}")
    return target

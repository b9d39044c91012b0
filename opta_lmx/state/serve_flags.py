"""Which `vllm-mlx serve` flags an `extra_args` list may carry, checked at validation.

The flags are read from vllm-mlx's own parser (the `add_argument` calls in its `cli.py`)
without importing it: importing `vllm_mlx.cli` pulls in transformers (about 0.5 s and
60 MB), which the control plane and `lmx check` should not pay for. Flags that decide
where and for whom a worker listens belong to the control plane and are refused.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import logging
import threading
from pathlib import Path

log = logging.getLogger(__name__)

# Flags the control plane sets itself (engine/worker.py): where a worker listens, under which
# name, for whom, and what it serves. Setting them from models.yaml would bypass the gateway.
OWNED_FLAGS = {
    "--host": "the control plane binds every worker to loopback",
    "--port": "the control plane picks each worker's port",
    "--served-model-name": "the model's `name` in models.yaml is its served name",
    "--api-key": "the control plane gives each worker its own secret",
    "--models-config": "each worker serves exactly one model of models.yaml",
    "--ssd-cache-dir": "a model's kept prefix cache lives in the state directory (prefix_caches in models.yaml)",
    "--warm-prompts": "a model names its warm-up prompts in models.yaml (prefix_cache.warm_prompts)",
}
_OWNED_DESTS = {flag[2:].replace("-", "_"): flag for flag in OWNED_FLAGS}
_lock = threading.Lock()


class _Refused(ValueError):
    pass


class _StrictParser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise _Refused(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise _Refused(message or "invalid arguments")


def _cli_source() -> Path | None:
    """vllm-mlx's cli.py, located without importing the package."""
    try:
        spec = importlib.util.find_spec("vllm_mlx")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "cli.py"
    return path if path.is_file() else None


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _argument(call: ast.Call) -> tuple[list[str], dict]:
    """The flags and argparse keywords of one `serve_parser.add_argument(...)` call."""
    names = [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    options: dict = {}
    for keyword in call.keywords:
        if keyword.arg in ("action", "nargs"):
            value = _literal(keyword.value)
            if value is not None:
                options[keyword.arg] = value
        elif keyword.arg == "choices":
            choices = _literal(keyword.value)  # dynamic choices (parser registries) stay unchecked
            if isinstance(choices, (list, tuple)):
                options["choices"] = list(choices)
        elif keyword.arg == "type" and isinstance(keyword.value, ast.Name):
            if keyword.value.id in ("int", "float"):
                options["type"] = {"int": int, "float": float}[keyword.value.id]
    return names, options


def _serve_arguments(source: str) -> list[tuple[list[str], dict]]:
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "serve_parser"):
            found.append(_argument(node))
    return found


@functools.lru_cache(maxsize=1)
def serve_parser() -> argparse.ArgumentParser | None:
    """A mirror of `vllm-mlx serve`'s parser (no abbreviations, no help), or None if unreadable."""
    path = _cli_source()
    if path is None:
        log.warning("vllm-mlx is not installed here: extra_args are checked for owned flags only")
        return None
    try:
        arguments = _serve_arguments(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError, UnicodeDecodeError) as error:
        log.warning("cannot read vllm-mlx's flags from %s (%s): extra_args are checked for owned flags only",
                    path, error)
        return None
    parser = _StrictParser(prog="vllm-mlx serve", allow_abbrev=False, add_help=False,
                           argument_default=argparse.SUPPRESS)
    for names, options in arguments:
        try:
            parser.add_argument(*names, **options)
        except (ValueError, TypeError, argparse.ArgumentError) as error:
            log.warning("skipping vllm-mlx flag %s: %s", names, error)
    if not any(action.dest == "host" for action in parser._actions) or len(parser._actions) < 10:
        log.warning("vllm-mlx's serve flags not found in %s: extra_args are checked for owned flags only", path)
        return None
    return parser


def check_extra_args(extra_args: list[str]) -> None:
    """Raise ValueError if `extra_args` holds an unknown flag, a bad value or an owned flag."""
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        for owned, why in OWNED_FLAGS.items():
            # A prefix too: vllm-mlx's own parser accepts abbreviations such as --ho.
            if flag.startswith("--") and len(flag) > 3 and owned.startswith(flag):
                raise ValueError(f"{owned} cannot be set in extra_args: {why}")
    parser = serve_parser()
    if parser is None:
        return
    with _lock:
        try:
            parsed = parser.parse_args(["MODEL", *extra_args])
        except _Refused as error:
            raise ValueError(f"not accepted by `vllm-mlx serve`: {error}") from None
    for dest in vars(parsed):
        if dest in _OWNED_DESTS:
            flag = _OWNED_DESTS[dest]
            raise ValueError(f"{flag} cannot be set in extra_args: {OWNED_FLAGS[flag]}")

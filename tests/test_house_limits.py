"""The house rules of issue 9, checked: no module over 450 lines, no function over 80, no class over 25 methods."""

from __future__ import annotations

import ast
from pathlib import Path

import opta_lmx

PACKAGE = Path(opta_lmx.__file__).parent
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_CLASS_METHODS = 25


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def oversized(path: Path) -> list[str]:
    """What in one module breaks the limits, as readable lines."""
    text = path.read_text()
    problems = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        problems.append(f"{path}: {lines} lines (limit {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                problems.append(f"{path}:{node.lineno}: function {node.name} is {length} lines")
        elif isinstance(node, ast.ClassDef):
            methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            if len(methods) > MAX_CLASS_METHODS:
                problems.append(f"{path}:{node.lineno}: class {node.name} has {len(methods)} methods")
    return problems


def test_every_module_keeps_the_house_limits():
    assert _modules(), "no modules found"
    problems = [p for path in _modules() for p in oversized(path)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_a_breach(tmp_path):
    big = tmp_path / "big.py"
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    methods = "\n".join(f"    def m{i}(self):\n        pass" for i in range(MAX_CLASS_METHODS + 1))
    big.write_text(f"def f():\n{body}\n\nclass C:\n{methods}\n" + "\n" * MAX_MODULE_LINES)
    found = oversized(big)
    assert any("function f" in p for p in found)
    assert any("class C has" in p for p in found)
    assert any("lines (limit" in p for p in found)


def test_no_timeout_can_swallow_a_cancel():
    """asyncio.wait_for on Python 3.11 returns the result when the awaited thing finishes as the
    task is cancelled, swallowing the cancel: the control loop then ignored `task.cancel()` about
    one time in two (tests/reconciler/test_supervision.py). `asyncio.timeout` has no such race."""
    calls = [f"{path}:{node.lineno}" for path in _modules() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr == "wait_for"
             and isinstance(node.value, ast.Name) and node.value.id == "asyncio"]
    assert not calls, "use `async with asyncio.timeout(...)` instead of asyncio.wait_for: " + ", ".join(calls)

"""The import layering holds (import-linter contracts), and no module of opta_lmx is outside it."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "opta_lmx"


def test_import_contracts_are_kept():
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def package_modules() -> list[str]:
    """Every module of opta_lmx, from the files (so a new file is seen without importing it)."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    return modules


def contract_roots() -> set[str]:
    """The modules the contracts in pyproject.toml name (a layer or a contract's source)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    roots: set[str] = set()
    for contract in config["tool"]["importlinter"]["contracts"]:
        for layer in contract.get("layers", []):
            roots.update(part.strip() for part in layer.replace(":", "|").split("|") if part.strip())
        roots.update(contract.get("source_modules", []))
    return roots


def covered(module: str, roots: set[str]) -> bool:
    return any(module == root or module.startswith(root + ".") for root in roots)


def test_every_module_is_inside_a_contract():
    roots = contract_roots()
    modules = package_modules()
    assert "opta_lmx.cli.client" in modules and "opta_lmx.settings" in modules  # the walk sees them
    outside = [m for m in modules if m != "opta_lmx" and not covered(m, roots)]
    assert outside == [], f"modules outside every import-linter contract: {outside}"


def test_a_module_outside_the_layers_would_be_caught():
    roots = contract_roots()
    assert not covered("opta_lmx.stray", roots)
    assert not covered("opta_lmx.apiary", roots)  # a prefix of a name is not inside it
    assert covered("opta_lmx.api.admin.router", roots)

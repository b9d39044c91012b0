"""What an install needs, checked without building it (the build itself: tests/e2e/test_installed_wheel.py)."""

from __future__ import annotations

import ast
import fnmatch
import re
import shlex
import sys
import tomllib

import pytest

from opta_lmx.cli import build_parser, main
from opta_lmx.cli.serve import DEFAULT_MODELS_YAML
from tests.lmx_harness import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_data_file_of_the_package_is_package_data():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]
    data = [p for p in (REPO / "opta_lmx").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert data, "the package has data files (dashboard, service templates)"
    for path in data:
        package = max((p for p in globs if path.is_relative_to(REPO / p.replace(".", "/"))), key=len, default=None)
        assert package is not None, f"{path} is in no package with package data"
        inside = str(path.relative_to(REPO / package.replace(".", "/")))
        assert any(fnmatch.fnmatch(inside, g) for g in globs[package]), f"{path} is not package data"


def test_the_examples_extra_brings_what_the_example_scripts_import():
    extra = {re.split(r"[<>=!\[; ]", req)[0].lower() for req in PYPROJECT["project"]["optional-dependencies"]["examples"]}
    for script in (REPO / "examples").glob("*.py"):
        tree = ast.parse(script.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
        third_party = {name for name in imported if name not in sys.stdlib_module_names}
        assert third_party <= extra, f"{script.name} imports {third_party - extra}, missing from the examples extra"
    assert "'.[examples]'" in (REPO / "README.md").read_text()


def test_the_default_models_yaml_refers_to_commands_that_exist():
    reference = next(line for line in DEFAULT_MODELS_YAML.splitlines() if "Reference" in line)
    assert "http" not in reference
    commands = re.findall(r"`lmx ([^`]+)`", reference)
    assert "schema" in commands
    for command in commands:
        build_parser().parse_args(shlex.split(command))  # exits (SystemExit) on an unknown command or option


def test_check_takes_dash_f_and_keeps_the_old_forms(tmp_path, capsys):
    config = tmp_path / "models.yaml"
    config.write_text("models: []\n")
    for argv in (["check", "-f", str(config)], ["check", "--file", str(config)], ["check", str(config)],
                 ["check", "--config", str(config)]):
        assert main(argv) == 0, argv
        assert "ok: 0 model(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["check", "-f", str(config), str(config)])  # the file given twice
    assert main(["check", "-f", str(tmp_path / "missing.yaml")]) == 1


def test_dash_f_is_the_file_for_every_command_that_takes_one(tmp_path):
    parser = build_parser()
    for argv in (["serve"], ["plan"], ["check"], ["doctor"], ["service", "install"], ["apply"]):
        args = parser.parse_args([*argv, "-f", "m.yaml"])
        assert (getattr(args, "config", None) or getattr(args, "file", None)) == "m.yaml", argv
    for argv in (["serve"], ["plan"], ["doctor"], ["service", "install"]):
        assert parser.parse_args([*argv, "--config", "old.yaml"]).config == "old.yaml"  # scripts keep working
        assert "--config" not in parser._subparsers._group_actions[0].choices[argv[0]].format_help()

"""Reading models.yaml: parse round-trip, validate, and point at the broken spot.

Errors name the file, line, column and field path, so a person can find what to fix;
a file that fails here changes nothing live.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from opta_lmx.state.spec import DesiredState


def new_yaml() -> YAML:
    """The one round-trip YAML configuration every reader and writer uses."""
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


@dataclass(frozen=True)
class FieldProblem:
    path: str
    message: str
    line: int | None
    column: int | None

    def __str__(self) -> str:
        where = f"line {self.line}, column {self.column}: " if self.line else ""
        field = f"{self.path}: " if self.path else ""
        return f"{where}{field}{self.message}"


class ConfigError(Exception):
    """models.yaml (or an edit of it) is not a valid desired state."""

    def __init__(self, source: str, problems: list[FieldProblem]):
        self.source = source
        self.problems = problems
        super().__init__(self.describe())

    def describe(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} problem(s)"]
        for problem in self.problems:
            where = f"{self.source}:{problem.line}:{problem.column}" if problem.line else self.source
            field = f" {problem.path}:" if problem.path else ""
            lines.append(f"  {where}:{field} {problem.message}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "message": self.describe(),
            "problems": [
                {"path": p.path, "message": p.message, "line": p.line, "column": p.column}
                for p in self.problems
            ],
        }


@dataclass(frozen=True)
class Document:
    """A parsed and validated models.yaml: the round-trip tree and what it means."""

    text: str
    tree: Any
    state: DesiredState
    etag: str


def content_etag(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def _format_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _position(tree: Any, loc: tuple[Any, ...]) -> tuple[int | None, int | None]:
    """1-based line and column of the deepest node of `loc` found in the tree."""
    node = tree
    best: tuple[int | None, int | None] = (None, None)
    for part in loc:
        if isinstance(node, CommentedMap) and isinstance(part, str) and part in node:
            line, col = node.lc.key(part)
            best = (line + 1, col + 1)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.item(part)
            best = (line + 1, col + 1)
            node = node[part]
        else:
            break
    if best == (None, None) and hasattr(tree, "lc"):
        best = (tree.lc.line + 1, tree.lc.col + 1)
    return best


def validate_tree(tree: Any, source: str) -> DesiredState:
    """The desired state a round-trip tree describes, or a ConfigError pointing into it."""
    if tree is None:
        tree = CommentedMap()
    if not isinstance(tree, dict):
        raise ConfigError(source, [FieldProblem("", "the top level must be a mapping", 1, 1)])
    try:
        return DesiredState.model_validate(plain(tree))
    except ValidationError as error:
        problems = []
        for item in error.errors():
            loc = tuple(item["loc"])
            line, column = _position(tree, loc)
            message = item["msg"].removeprefix("Value error, ")
            problems.append(FieldProblem(_format_path(loc), message, line, column))
        raise ConfigError(source, problems) from None


def plain(node: Any) -> Any:
    """A round-trip tree as plain dicts and lists (what validation and comparisons see)."""
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return node


def parse_document(text: str, source: str = "models.yaml") -> Document:
    try:
        tree = new_yaml().load(text)
    except MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        message = " ".join(filter(None, [error.context, error.problem])) or str(error)
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise ConfigError(source, [FieldProblem("", f"YAML syntax: {message}", line, column)]) from None
    except YAMLError as error:
        raise ConfigError(source, [FieldProblem("", f"YAML: {error}", None, None)]) from None
    state = validate_tree(tree, source)
    return Document(text=text, tree=tree, state=state, etag=content_etag(text))


def read_document(path: str | os.PathLike[str]) -> Document:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), [FieldProblem("", "file not found", None, None)]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(str(path), [FieldProblem("", f"cannot read: {error}", None, None)]) from None
    return parse_document(text, str(path))

"""Reading models.yaml: parse round-trip, validate, and point at the broken spot.

Errors name the file, line, column and field path, so a person can find what to fix;
a file that fails here changes nothing live. Reading is bounded (size, nesting depth,
aliases and what they expand to), so a hostile file is refused in milliseconds, and
every function here is a plain, thread-safe function that callers may run off the loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.constructor import DuplicateKeyError, RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

from opta_lmx.state.serve_flags import OWNED_FLAGS
from opta_lmx.state.fleet_checks import fleet_problems
from opta_lmx.state.spec import DesiredState

# ruamel's round-trip parser is pure Python (about 40 us per value here), so the limits keep
# the worst file it may be given well under a second; a models.yaml of 200 commented models
# is about 1,400 lines.
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_SYNTAX_MARKS = 3_000  # lines plus flow punctuation: a cheap bound on the parser's work
MAX_DEPTH = 32  # the schema itself is 5 levels deep
MAX_ALIASES = 1000  # alias uses (*name) in one document
MAX_NODES = 50_000  # values after expanding aliases: refuses "billion laughs"
MAX_PROBLEMS = 20  # problems listed in one error


class _BoundedComposer(Composer):
    """ruamel's composer with a nesting-depth and an alias-count limit, each with a position."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.parser.check_event(AliasEvent):
            self._lmx_aliases = getattr(self, "_lmx_aliases", 0) + 1
            if self._lmx_aliases > MAX_ALIASES:
                raise _limit_error(f"more than {MAX_ALIASES} aliases", self.parser.peek_event().start_mark)
            return super().compose_node(parent, index)
        self._lmx_depth = getattr(self, "_lmx_depth", 0) + 1
        try:
            if self._lmx_depth > MAX_DEPTH:
                raise _limit_error(f"nested deeper than {MAX_DEPTH} levels", self.parser.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._lmx_depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _check_nodes(node)
        return node


# Tags a models.yaml may resolve to; others (!!set, !!omap, !!binary, !custom...) are refused.
_PLAIN_TAGS = frozenset(f"tag:yaml.org,2002:{name}" for name in
                        ("str", "int", "float", "bool", "null", "seq", "map", "timestamp", "merge"))


def _check_nodes(root: Any) -> None:
    """Refuse complex keys and unusual tags: hashing or printing an aliased key is exponential."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        tag = getattr(node.tag, "value", node.tag) if hasattr(node, "tag") else None
        if tag is not None and tag not in _PLAIN_TAGS:
            raise _limit_error(f"the tag {str(tag)[:60]!r} is not used in models.yaml", node.start_mark)
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if not isinstance(key, ScalarNode):
                    raise _limit_error("a mapping key must be a plain value", key.start_mark)
                stack.append(value)
        elif isinstance(node, SequenceNode):
            stack.extend(node.value)


class _QuietConstructor(RoundTripConstructor):
    """ruamel's round-trip constructor, minus the values in its duplicate-key message (one may be a bomb)."""

    def check_mapping_key(self, node: Any, key_node: Any, mapping: Any, key: Any, value: Any) -> bool:
        if key in mapping:
            raise DuplicateKeyError("while constructing a mapping", node.start_mark,
                                    f"found duplicate key {str(key)[:100]!r}", key_node.start_mark)
        return True


def _limit_error(message: str, mark: Any) -> MarkedYAMLError:
    return MarkedYAMLError(problem=f"refused: {message}", problem_mark=mark)


def new_yaml() -> YAML:
    """The one round-trip YAML configuration every reader and writer uses."""
    yaml = YAML(typ="rt")
    yaml.Composer = _BoundedComposer
    yaml.Constructor = _QuietConstructor
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
    """models.yaml (or an edit of it) is not a valid desired state.

    `kind` says what to do about it: "invalid" (report it, keep the last good state),
    "missing" (no file) or "incomplete" (empty or whitespace only: an editor is writing it;
    keep the last good state without an error event).
    """

    kind = "invalid"

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
            "kind": self.kind,
            "message": self.describe(),
            "problems": [
                {"path": p.path, "message": p.message, "line": p.line, "column": p.column}
                for p in self.problems
            ],
        }


class DocumentMissing(ConfigError):
    """There is no models.yaml: not the same as a file that asks for no models."""

    kind = "missing"


class DocumentIncomplete(ConfigError):
    """models.yaml is empty or whitespace only, as it is for a moment while an editor writes it."""

    kind = "incomplete"


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
        try:  # merged (`<<:`) keys and aliased nodes may have no position of their own
            if isinstance(node, CommentedMap) and isinstance(part, str) and part in node:
                line, col = node.lc.key(part)
                node = node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                line, col = node.lc.item(part)
                node = node[part]
            else:
                break
        except (KeyError, IndexError, TypeError, AttributeError):
            break
        if line is None or col is None:
            break
        best = (line + 1, col + 1)
    if best == (None, None) and getattr(tree, "lc", None) is not None and tree.lc.line is not None:
        best = (tree.lc.line + 1, tree.lc.col + 1)
    return best


def validate_tree(tree: Any, source: str) -> DesiredState:
    """The desired state a round-trip tree describes, or a ConfigError pointing into it."""
    if tree is None:
        raise DocumentIncomplete(source, [FieldProblem(
            "", "the file is empty (still being written?); write `models: []` to run no models", 1, 1)])
    if not isinstance(tree, dict):
        raise ConfigError(source, [FieldProblem("", "the top level must be a mapping", *_top(tree))])
    try:
        data = plain(tree)
    except MarkedYAMLError as error:
        raise _syntax_error(error, source) from None
    try:
        state = DesiredState.model_validate(data)
    except ValidationError as error:
        items = error.errors()
        problems = [_field_problem(tree, item) for item in items[:MAX_PROBLEMS]]
        if len(items) > MAX_PROBLEMS:
            problems.append(FieldProblem("", f"... and {len(items) - MAX_PROBLEMS} more problems", *_top(tree)))
        raise ConfigError(source, problems) from None
    except Exception as error:  # a validator bug must not escape as a crash: it is still a bad file
        raise ConfigError(source, [FieldProblem("", f"invalid ({type(error).__name__}: {error})", *_top(tree))]) from None
    if "models" not in tree:
        raise ConfigError(source, [FieldProblem(
            "models", "`models:` is missing; write `models: []` to run no models", *_top(tree))])
    fleet = fleet_problems(state)
    if fleet:
        raise ConfigError(source, [_located(tree, loc, message) for loc, message in fleet[:MAX_PROBLEMS]])
    return state


def _located(tree: Any, loc: tuple[Any, ...], message: str) -> FieldProblem:
    line, column = _position(tree, loc)
    if line is None:
        line, column = _top(tree)
    return FieldProblem(_format_path(loc), message, line, column)


def _top(tree: Any) -> tuple[int, int]:
    lc = getattr(tree, "lc", None)
    return (lc.line + 1, lc.col + 1) if lc is not None and lc.line is not None else (1, 1)


def _field_problem(tree: Any, item: Any) -> FieldProblem:
    loc = tuple(item["loc"])
    line, column = _position(tree, loc)
    message = item["msg"].removeprefix("Value error, ")
    flag = "--" + str(loc[-1]).replace("_", "-") if loc else ""
    if item.get("type") == "extra_forbidden" and "engine" in loc and flag in OWNED_FLAGS:
        message = f"{loc[-1]} cannot be set in models.yaml: {OWNED_FLAGS[flag]}"
    if line is None:
        line, column = _top(tree)
    return FieldProblem(_format_path(loc), message, line, column)


class ExpansionLimit(MarkedYAMLError):
    """The document is too deep or expands (through aliases) to too many values."""


def plain(node: Any) -> Any:
    """A round-trip tree as plain dicts and lists (what validation and comparisons see).

    Aliases are expanded here, so this is where a "billion laughs" document would blow up:
    it counts values and depth and raises ExpansionLimit (a YAML error with a position).
    """
    budget = [MAX_NODES]
    return _plain(node, budget, 0, None)


def _plain(node: Any, budget: list[int], depth: int, mark: Any) -> Any:
    budget[0] -= 1
    lc = getattr(node, "lc", None)
    if lc is not None and lc.line is not None:
        mark = lc
    if budget[0] < 0 or depth > MAX_DEPTH:
        why = f"expands to more than {MAX_NODES} values (YAML aliases?)" if budget[0] < 0 \
            else f"nested deeper than {MAX_DEPTH} levels"
        error = ExpansionLimit(problem=f"refused: the document {why}")
        error.problem_mark = _Mark(mark.line, mark.col) if mark is not None else _Mark(0, 0)
        raise error
    if isinstance(node, dict):
        return {str(k): _plain(v, budget, depth + 1, mark) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v, budget, depth + 1, mark) for v in node]
    return node


@dataclass(frozen=True)
class _Mark:
    """Just enough of a ruamel mark (0-based line and column) for a positioned error."""

    line: int
    column: int

    def __str__(self) -> str:
        return f"  in line {self.line + 1}, column {self.column + 1}"


def _syntax_error(error: MarkedYAMLError, source: str) -> ConfigError:
    mark = error.problem_mark or error.context_mark
    message = " ".join(filter(None, [error.context, error.problem])) or str(error)
    line = mark.line + 1 if mark else 1
    column = mark.column + 1 if mark else 1
    return ConfigError(source, [FieldProblem("", f"YAML syntax: {message}", line, column)])


def parse_document(text: str, source: str = "models.yaml") -> Document:
    """Parse and validate models.yaml's text; any failure is a ConfigError with a position."""
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ConfigError(source, [FieldProblem(
            "", f"refused: larger than {MAX_DOCUMENT_BYTES // 1024} KiB", 1, 1)])
    if not text.strip():
        raise DocumentIncomplete(source, [FieldProblem(
            "", "the file is empty (still being written?); write `models: []` to run no models", 1, 1)])
    marks = sum(text.count(c) for c in "\n,[{")
    if marks > MAX_SYNTAX_MARKS:
        raise ConfigError(source, [FieldProblem(
            "", f"refused: more than {MAX_SYNTAX_MARKS} lines and flow items", 1, 1)])
    _check_flow_depth(text, source)
    try:
        tree = new_yaml().load(text)
    except MarkedYAMLError as error:
        raise _syntax_error(error, source) from None
    except (YAMLError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            RecursionError, UnicodeError, OverflowError, AssertionError) as error:
        # ruamel raises a few plain exceptions on odd input; they are still a bad file.
        raise ConfigError(source, [FieldProblem("", f"YAML: {type(error).__name__}: {error}", 1, 1)]) from None
    state = validate_tree(tree, source)
    return Document(text=text, tree=tree, state=state, etag=content_etag(text))


# Quoted scalars and comments (skipped), or a flow bracket (counted).
_FLOW_TOKEN = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|(?:^|(?<=\s))#[^\n]*|[\[\]{}]""", re.MULTILINE)


def _check_flow_depth(text: str, source: str) -> None:
    """Refuse deeply nested flow collections before ruamel sees them.

    ruamel's scanner keeps a possible simple key per open flow level and rechecks them all at
    every token, so a few thousand unclosed `[` cost it seconds before the composer's depth limit
    is ever reached.
    """
    if "[" not in text and "{" not in text:
        return
    depth = 0
    for match in _FLOW_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, match.start()) + 1
                column = match.start() - (text.rfind("\n", 0, match.start()) + 1) + 1
                raise ConfigError(source, [FieldProblem(
                    "", f"refused: flow collections nested deeper than {MAX_DEPTH} levels", line, column)])
        elif token in ("]", "}"):
            depth = max(0, depth - 1)


def read_document(path: str | os.PathLike[str]) -> Document:
    """Read and validate the file: a regular file (or a link to one) of bounded size.

    It never blocks on a FIFO or a device, never reads more than MAX_DOCUMENT_BYTES + 1,
    and is safe to call from any thread.
    """
    path = Path(path)
    try:
        data = _read_bounded(path)
    except FileNotFoundError:
        raise DocumentMissing(str(path), [FieldProblem("", "file not found", None, None)]) from None
    except OSError as error:
        raise ConfigError(str(path), [FieldProblem("", f"cannot read: {error}", None, None)]) from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(str(path), [FieldProblem("", f"refused: larger than {MAX_DOCUMENT_BYTES // 1024} KiB", 1, 1)])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError(str(path), [FieldProblem("", f"not UTF-8 text: {error.reason}", line, column)]) from None
    return parse_document(text, str(path))


def _read_bounded(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise OSError(f"{path} is {kind}")
        chunks, size = [], 0
        while size <= MAX_DOCUMENT_BYTES:
            chunk = os.read(fd, MAX_DOCUMENT_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)

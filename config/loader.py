"""Read, interpolate and validate the YAML configuration file, reporting every problem with its place.

Reading
    The file is parsed with ruamel.yaml down to its node tree only; this module builds the Python values
    itself, so it knows the line and column of every key and value and keeps the original text of every
    scalar. Only the standard tags (``!!str``, ``!!int``, ``!!float``, ``!!bool``, ``!!null``, ``!!map``,
    ``!!seq``) are accepted; any other tag (``!!python/object``, ``!custom``) is a problem, so nothing in
    the file can build an arbitrary object. Timestamps stay text. Mapping keys are always text, taken as
    written (``5.5:`` is the key ``"5.5"``), and unquoted floats become :class:`~decimal.Decimal` from
    their written text, so no rate or amount ever goes through binary floating point. Duplicate keys are
    problems (the first one is kept).

Anchors and aliases
    Aliases (``*name``) and merge keys (``<<: *name``) are allowed, because sharing an item or tax map
    between pipelines is a real need; top-level keys starting with ``x-`` are ignored, to hold anchors.
    Every node that an alias copies counts against a budget of :data:`MAX_ALIAS_NODES`; past it the
    file is rejected, which defeats "billion laughs" files. An alias to a node that contains it is
    rejected too, and so is nesting deeper than :data:`MAX_DEPTH`.

Environment variables
    In every string value (not in keys), ``${NAME}`` is replaced by the variable's value and
    ``${NAME:-default}`` by the value or, when the variable is unset or empty, by ``default``. ``$${``
    stands for a literal ``${``; any other ``$`` is kept as it is. A variable that is missing and has no
    default is a problem at that value, naming the variable. Inside flow style (``{a: b}``, ``[a]``)
    quote such values, since ``{`` and ``}`` are YAML syntax there.

Secrets in files
    A field typed ``SecretStr`` (the connector credentials, ``state.secret_key``) can be given instead
    as ``<field>_file: PATH``: the file's content, without its trailing newline, is the value. A
    relative ``PATH`` is relative to the directory of the configuration file. Giving both forms, or a
    file that cannot be read, is a problem.

Problems
    Everything wrong is collected and raised at once as :class:`ConfigValidationError`, one
    :class:`Problem` a line, rendered ``FILE:LINE:COL: key.path: message`` (1-based). An unknown key is
    reported at the key, a wrong value at the value, a missing key at the key of the mapping that lacks
    it. Messages are built from pydantic's error type and message, never from the input: they name keys,
    variables and secret-file paths but contain no value from the file or the environment, and any
    secret value a connector's own validator might quote is replaced by ``[REDACTED]``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Union, cast, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.json_schema import models_json_schema
from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from config.schema import AppConfig, ConnectorSettings
from connectors import registry
from connectors.errors import ConfigError
from connectors.interfaces import CrmSource, Ledger

__all__ = [
    "EXTENSION_PREFIX",
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "ConfigValidationError",
    "LoadedConfig",
    "PipelineConnectors",
    "Problem",
    "config_json_schema",
    "load_config",
    "loads",
]

MAX_ALIAS_NODES = 10_000
"""How many nodes aliases may copy in one file, in total."""

MAX_DEPTH = 64
"""How deeply mappings and sequences may nest."""

EXTENSION_PREFIX = "x-"
"""Top-level keys starting with this are ignored: a place to define anchors (``x-defaults: &defaults``)."""

Path_ = tuple[str | int, ...]  # a place in the data: mapping keys and sequence indexes

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_MAP, _SEQ, _MERGE, _TIMESTAMP = (_TAG + t for t in ("map", "seq", "merge", "timestamp"))
_SCALAR_TAGS = {_STR, _INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP}


# --------------------------------------------------------------------------------------------------
# Problems


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the configuration, at a 1-based line and column (0 when unknown)."""

    file: str
    line: int
    col: int
    key_path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        return f"{where}: {self.key_path}: {self.message}" if self.key_path else f"{where}: {self.message}"


class ConfigValidationError(ConfigError):
    """The configuration has problems; ``str()`` lists them one a line, ready for stderr."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _dotted(path: Path_) -> str:
    out = ""
    for seg in path:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", seg):
            out += f".{seg}" if out else seg
        else:
            out += '["' + seg.replace("\\", "\\\\").replace('"', '\\"') + '"]'
    return out


@dataclass(frozen=True)
class _Spot:
    """Where one value sits in the file: its key (None at the root and in sequences) and itself."""

    key: tuple[int, int] | None
    value: tuple[int, int]
    block: bool = False  # a block-style mapping or list: its problems are shown at its key
    bare_number: bool = False  # an unquoted int or float: a hint when text was expected

    @property
    def at_key(self) -> tuple[int, int]:
        return self.key or self.value


@dataclass
class _Context:
    """What one load accumulates: the places of values, the problems, and what must stay hidden."""

    file: str
    base_dir: Path
    env: Mapping[str, str]
    spots: dict[Path_, _Spot] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    poisoned: set[Path_] = field(default_factory=set)  # values already reported: no second problem
    reported: set[tuple[Path_, str]] = field(default_factory=set)  # reported at a better place already
    secrets: set[str] = field(default_factory=set)
    secret_fields: set[Path_] = field(default_factory=set)  # places of SecretStr fields, for hints

    def add(self, at: tuple[int, int], path: Path_, message: str) -> None:
        self.problems.append(Problem(self.file, at[0], at[1], _dotted(path), message))

    def is_poisoned(self, path: Path_) -> bool:
        return any(path[: len(p)] == p for p in self.poisoned)

    def scrub(self, message: str, value: object = None) -> str:
        """Remove from a message any secret met in this file, and the offending value itself."""
        hidden = set(self.secrets)
        if isinstance(value, str | int | Decimal) and not isinstance(value, bool) and len(str(value)) >= 4:
            hidden.add(str(value))
        for text in sorted(hidden, key=len, reverse=True):
            if len(text) >= 4:
                message = message.replace(text, "[REDACTED]")
        return message


def _mark(node: Node | _AliasUse) -> tuple[int, int]:
    mark = node.mark if isinstance(node, _AliasUse) else node.start_mark
    return mark.line + 1, mark.column + 1


class _AliasUse:
    """One use of an alias (``*name``): the anchored node plus where the alias itself is written."""

    __slots__ = ("mark", "node")

    def __init__(self, node: Node, mark: Any) -> None:
        self.node = node
        self.mark = mark


def _target(node: Node | _AliasUse) -> Node:
    return node.node if isinstance(node, _AliasUse) else node


class _Composer(Composer):
    """ruamel's composer, but keeping the place of each alias use (it returns only the anchored node)."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.warn_double_anchors = False  # re-defining an anchor is valid YAML

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.parser.check_event(AliasEvent):
            mark = self.parser.peek_event().start_mark
            return _AliasUse(super().compose_node(parent, index), mark)
        return super().compose_node(parent, index)


# --------------------------------------------------------------------------------------------------
# YAML nodes -> Python values


class _Abort(Exception):
    """Stop reading the tree: the problem is already recorded."""


class _Reader:
    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.seen: set[int] = set()  # ids of nodes built at least once
        self.active: set[int] = set()  # ids of nodes being built (an alias to one is a cycle)
        self.copied = 0  # nodes built again through aliases
        self.copy_origin: tuple[tuple[int, int], Path_] | None = None  # the alias being expanded
        self.interpolator = _Interpolator(ctx)

    def build(self, item: Node | _AliasUse, path: Path_, spot: _Spot, copying: bool = False) -> Any:
        node = _target(item)
        if len(path) > MAX_DEPTH:
            self.ctx.add(spot.at_key, path, f"nesting is deeper than {MAX_DEPTH} levels")
            raise _Abort
        if id(node) in self.active:
            self.ctx.add(spot.at_key, path, "an alias refers to a node that contains it")
            raise _Abort
        started = not copying and id(node) in self.seen  # an alias use: its whole subtree is a copy
        if started:
            copying, self.copy_origin = True, (spot.at_key, path)
        if copying:
            self.copied += 1
            if self.copied > MAX_ALIAS_NODES:
                at, where = self.copy_origin or (spot.at_key, path)
                self.ctx.add(at, where, f"aliases copy more than {MAX_ALIAS_NODES} nodes in all")
                raise _Abort
        self.seen.add(id(node))
        self.ctx.spots[path] = spot
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path, copying)
            if isinstance(node, SequenceNode):
                return self._sequence(node, path, copying)
            return self._scalar(cast(ScalarNode, node), path, spot)
        finally:
            self.active.discard(id(node))
            if started:
                self.copy_origin = None

    def _tag_ok(self, node: Node, expected: str, path: Path_, at: tuple[int, int]) -> bool:
        tag = str(node.tag)
        if tag == expected:
            return True
        self.ctx.add(at, path, f"the YAML tag {_short_tag(tag)} is not allowed here")
        self.ctx.poisoned.add(path)
        return False

    def _mapping(self, node: MappingNode, path: Path_, copying: bool) -> dict[str, Any] | None:
        if not self._tag_ok(node, _MAP, path, _mark(node)):
            return None
        out: dict[str, Any] = {}
        first_at: dict[str, tuple[int, int]] = {}
        merges: list[Node | _AliasUse] = []
        for key_item, value_node in node.value:
            key_at, key_node = _mark(key_item), _target(key_item)
            if isinstance(key_node, ScalarNode) and str(key_node.tag) == _MERGE:
                merges.append(value_node)
                continue
            key = self._key(key_node, path, key_at)
            if key is None:
                continue
            if key in first_at:
                line, col = first_at[key]
                self.ctx.add(key_at, (*path, key), f"duplicate key (first given at line {line}, column {col})")
                continue
            first_at[key] = key_at
            spot = _spot(key_at, value_node)
            out[key] = self.build(value_node, (*path, key), spot, copying)
        for merge in merges:
            self._merge(merge, out, path, copying)
        return out

    def _merge(self, source: Node | _AliasUse, out: dict[str, Any], path: Path_, copying: bool) -> None:
        """Add the keys of a ``<<`` source that the mapping does not set itself."""
        node = _target(source)
        sources = node.value if isinstance(node, SequenceNode) else [source]
        for item in sources:
            src = _target(item)
            if not isinstance(src, MappingNode) or str(src.tag) != _MAP:
                self.ctx.add(_mark(item), path, "a merge key (<<) takes a mapping or a list of mappings")
                continue
            if id(src) in self.active:
                self.ctx.add(_mark(item), path, "an alias refers to a node that contains it")
                raise _Abort
            self.active.add(id(src))
            try:
                merged_keys: list[Node | _AliasUse] = []
                for key_item, value_node in src.value:
                    key_node = _target(key_item)
                    if isinstance(key_node, ScalarNode) and str(key_node.tag) == _MERGE:
                        merged_keys.append(value_node)
                        continue
                    key = self._key(key_node, path, _mark(key_item))
                    if key is None or key in out:
                        continue
                    out[key] = self.build(value_node, (*path, key), _spot(_mark(key_item), value_node), True)
                for nested in merged_keys:
                    self._merge(nested, out, path, True)
            finally:
                self.active.discard(id(src))

    def _key(self, node: Node, path: Path_, at: tuple[int, int]) -> str | None:
        if not isinstance(node, ScalarNode):
            self.ctx.add(at, path, "a key must be a plain scalar, not a mapping or a list")
            return None
        tag = str(node.tag)
        if tag not in _SCALAR_TAGS:
            self.ctx.add(at, path, f"the YAML tag {_short_tag(tag)} is not allowed here")
            return None
        return cast(str, node.value)

    def _sequence(self, node: SequenceNode, path: Path_, copying: bool) -> list[Any] | None:
        if not self._tag_ok(node, _SEQ, path, _mark(node)):
            return None
        return [self.build(item, (*path, i), _spot(None, item), copying) for i, item in enumerate(node.value)]

    def _scalar(self, node: ScalarNode, path: Path_, spot: _Spot) -> Any:
        tag, text = str(node.tag), cast(str, node.value)
        if tag not in _SCALAR_TAGS:
            self.ctx.add(spot.value, path, f"the YAML tag {_short_tag(tag)} is not allowed here")
            self.ctx.poisoned.add(path)
            return None
        if tag in (_STR, _TIMESTAMP):
            return self.interpolator.expand(text, path, spot.value)
        if tag == _NULL:
            return None
        if tag == _BOOL:  # YAML 1.2 knows true/false; a file that asks for YAML 1.1 also gets yes/no/on/off
            if text.lower() in ("true", "yes", "on", "y", "false", "no", "off", "n"):
                return text.lower() in ("true", "yes", "on", "y")
            return self._unreadable(path, spot, "a boolean (true or false)")
        if tag == _INT:
            try:
                return _int(text)
            except ValueError:
                return self._unreadable(path, spot, "an integer")
        try:
            return _float(text)
        except (ValueError, InvalidOperation):
            return self._unreadable(path, spot, "a number")

    def _unreadable(self, path: Path_, spot: _Spot, what: str) -> None:
        self.ctx.add(spot.value, path, f"cannot be read as {what}")
        self.ctx.poisoned.add(path)


def _spot(key_at: tuple[int, int] | None, item: Node | _AliasUse) -> _Spot:
    node = _target(item)
    bare = isinstance(node, ScalarNode) and node.style is None and str(node.tag) in (_INT, _FLOAT)
    block = isinstance(node, MappingNode | SequenceNode) and not node.flow_style
    return _Spot(key_at, _mark(item), block=block and not isinstance(item, _AliasUse), bare_number=bare)


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _int(text: str) -> int:
    t = text.replace("_", "")
    sign = -1 if t.startswith("-") else 1
    t = t.lstrip("+-")
    for prefix, base in (("0x", 16), ("0o", 8), ("0b", 2)):
        if t.lower().startswith(prefix):
            return sign * int(t[2:], base)
    return sign * int(t, 10)


def _float(text: str) -> Decimal | float:
    """A YAML float from its text: exact Decimal for numbers, float only for infinities and NaN."""
    t = text.replace("_", "").lower()
    if t in (".inf", "+.inf", "-.inf", ".nan"):
        return float(t.replace(".", ""))
    return Decimal(t)


_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VARIABLE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)


class _Interpolator:
    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx

    def expand(self, text: str, path: Path_, at: tuple[int, int]) -> str:
        if "$" not in text:
            return text
        failed = False

        def replace(m: re.Match[str]) -> str:
            nonlocal failed
            whole = m.group(0)
            if whole == "$${":
                return "${"
            if whole == "${":
                self.ctx.add(at, path, "a ${ has no closing }")
                failed = True
                return ""
            ref = _VARIABLE.fullmatch(m.group(1))
            if ref is None:
                self.ctx.add(at, path, "malformed variable reference: use ${NAME} or ${NAME:-default}")
                failed = True
                return ""
            name, default = ref.group(1), ref.group(2)
            value = self.ctx.env.get(name)
            if value:
                return value
            if default is not None:
                return default
            if value is not None:  # set but empty, and no default: an empty value is what was asked
                return value
            self.ctx.add(at, path, f"environment variable {name} is not set (give a default: ${{{name}:-...}})")
            failed = True
            return ""

        result = _REFERENCE.sub(replace, text)
        if failed:
            self.ctx.poisoned.add(path)
        return result


def _read_tree(text: str, ctx: _Context) -> dict[str, Any] | None:
    """Parse ``text`` and build its values; None when nothing usable came out (problems recorded)."""
    yaml = YAML(typ="rt")
    yaml.max_depth = MAX_DEPTH
    yaml.Composer = _Composer
    try:
        root = yaml.compose(io.StringIO(text))
    except MarkedYAMLError as exc:
        ctx.problems.append(_syntax_problem(ctx.file, exc))
        return None
    except RecursionError:
        ctx.add((1, 1), (), f"nesting is deeper than {MAX_DEPTH} levels")
        return None
    if root is None:
        ctx.add((1, 1), (), "the file is empty; it must be a mapping with at least a 'pipelines' key")
        return None
    if not isinstance(_target(root), MappingNode):
        ctx.add(_mark(root), (), "the file must be a mapping (key: value lines) with a 'pipelines' key")
        return None
    try:
        data = _Reader(ctx).build(root, (), _Spot(None, _mark(root), block=True))
    except _Abort:
        return None
    return cast("dict[str, Any] | None", data)


# Friendlier words for the parser's most common complaints: (start of its message, ours, cite its context)
_SYNTAX_HINTS = (
    ("expected <block end>", "bad indentation: this line does not line up with the block above it", True),
    (
        "mapping values are not allowed here",
        "unexpected ':' (bad indentation, or text containing ': ' that needs quotes)",
        False,
    ),
    ("found character '\\t' that cannot start any token", "a tab character: indent with spaces", False),
    ("maximum depth of data structure exceeded", f"nesting is deeper than {MAX_DEPTH} levels", False),
)


def _syntax_problem(file: str, exc: MarkedYAMLError) -> Problem:
    """A YAML syntax error as a problem. Only the parser's own words are used, never a file snippet."""
    mark = exc.problem_mark or exc.context_mark
    problem = str(exc.problem or exc.context or "invalid YAML")
    context = exc.context if exc.problem else None
    hint = next(((text, cite) for start, text, cite in _SYNTAX_HINTS if problem.startswith(start)), None)
    if hint is None:
        message, cite = f"invalid YAML: {problem}", True
    else:
        message, cite = hint
    cm = exc.context_mark
    if cite and context and cm is not None and cm is not mark:
        message += f" ({context} at line {cm.line + 1}, column {cm.column + 1})"
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return Problem(file, line, col, "", message)


# --------------------------------------------------------------------------------------------------
# Secrets given as files


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    if get_origin(annotation) in (Union, UnionType):
        args = set(get_args(annotation))
        return SecretStr in args and args <= {SecretStr, NoneType}
    return False


def _nested_models(annotation: Any) -> tuple[str, type[BaseModel]] | None:
    """('model' | 'dict' | 'list', model) when the field holds pydantic models to walk into."""
    if get_origin(annotation) in (Union, UnionType):
        members = [a for a in get_args(annotation) if a is not NoneType]
        if len(members) != 1:
            return None
        annotation = members[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (dict, Mapping) and len(args) == 2:
        inner, how = args[1], "dict"
    elif origin in (list, Sequence, tuple) and args:
        inner, how = args[0], "list"
    else:
        return None
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return how, inner
    return None


def _resolve_secret_files(model: type[BaseModel], data: dict[str, Any], path: Path_, ctx: _Context) -> None:
    """Replace ``<field>_file`` keys of SecretStr fields by the files' content; collect secret values."""
    fields = {(info.alias or name): info for name, info in model.model_fields.items()}
    for name, info in fields.items():
        if _is_secret(info.annotation):
            ctx.secret_fields.add((*path, name))
            file_key = f"{name}_file"
            if file_key in data and file_key not in fields:
                _read_secret_file(data, name, file_key, path, ctx)
            value = data.get(name)
            if isinstance(value, str):
                ctx.secrets.add(value)
            continue
        nested = _nested_models(info.annotation)
        value = data.get(name)
        if nested is None or value is None:
            continue
        how, inner = nested
        if how == "model" and isinstance(value, dict):
            _resolve_secret_files(inner, value, (*path, name), ctx)
        elif how == "dict" and isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dict):
                    _resolve_secret_files(inner, item, (*path, name, key), ctx)
        elif how == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    _resolve_secret_files(inner, item, (*path, name, i), ctx)


def _read_secret_file(data: dict[str, Any], name: str, file_key: str, path: Path_, ctx: _Context) -> None:
    spot = ctx.spots[(*path, file_key)]
    raw = data.pop(file_key)
    target = (*path, name)
    ctx.spots[target] = spot
    if name in data:
        ctx.add(spot.at_key, (*path, file_key), f"give either {name} or {file_key}, not both")
        ctx.poisoned.add(target)
        return
    data[name] = ""  # a placeholder, so that no 'missing' problem follows the one reported here
    if ctx.is_poisoned((*path, file_key)):
        ctx.poisoned.add(target)
        return
    if not isinstance(raw, str) or not raw:
        ctx.add(spot.value, (*path, file_key), "expected the path of a file holding the secret")
        ctx.poisoned.add(target)
        return
    file = Path(raw).expanduser()
    if not file.is_absolute():
        file = ctx.base_dir / file
    try:
        content = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        ctx.add(spot.value, (*path, file_key), f"the secret file {file} is not UTF-8 text")
        ctx.poisoned.add(target)
        return
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        ctx.add(spot.value, (*path, file_key), f"cannot read the secret file {file}: {reason}")
        ctx.poisoned.add(target)
        return
    value = content.rstrip("\r\n")
    data[name] = value
    ctx.secrets.add(value)


# --------------------------------------------------------------------------------------------------
# pydantic errors -> problems


def _add_validation_problems(exc: ValidationError, prefix: Path_, ctx: _Context) -> None:
    for err in exc.errors(include_url=False):
        kind = err["type"]
        node: Path_ = prefix
        unmatched: list[str | int] = []
        on_key = False
        for seg in err["loc"]:
            if seg == "[key]":
                on_key = True
            elif (*node, seg) in ctx.spots:
                node = (*node, seg)
                unmatched.clear()
            else:
                unmatched.append(seg)  # a union member's tag, or the missing key itself
        if ctx.is_poisoned(node):
            continue
        spot = ctx.spots.get(node) or ctx.spots[()]
        shown = node
        if kind == "missing":
            if unmatched:
                shown = (*node, unmatched[-1])
                if ctx.is_poisoned(shown):
                    continue
            at, message = spot.at_key, "required key is missing"
            if shown in ctx.secret_fields:
                message += f" (or give {shown[-1]}_file: the path of a file holding it)"
        elif kind == "extra_forbidden":
            at, message = spot.at_key, "unknown key"
        elif on_key:
            at, message = spot.at_key, "invalid key: " + err["msg"]
        else:
            at = spot.at_key if spot.block else spot.value
            message = err["msg"]
            for noise in ("Value error, ", "Assertion failed, "):
                message = message.removeprefix(noise)
            if kind == "string_type" and spot.bare_number:
                message += " (this is a number: put it in quotes to make it text)"
        if (shown, message) not in ctx.reported:
            ctx.add(at, shown, ctx.scrub(message, err.get("input")))


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class PipelineConnectors:
    """The connector classes of one pipeline and their validated settings (secrets resolved)."""

    crm_class: type[CrmSource]
    crm: ConnectorSettings
    ledger_class: type[Ledger]
    ledger: ConnectorSettings


@dataclass(frozen=True)
class LoadedConfig:
    """A validated configuration: the :class:`AppConfig` plus each pipeline's typed connector settings.

    ``crm(name)`` and ``ledger(name)`` return the settings as validated by the connector's own
    ``Settings`` model; pass ``settings.model_dump()`` (which keeps ``SecretStr`` values wrapped) to the
    connector class's ``from_config``.
    """

    app: AppConfig
    path: Path | None
    connectors: Mapping[str, PipelineConnectors]

    def _pipeline(self, name: str) -> PipelineConnectors:
        try:
            return self.connectors[name]
        except KeyError:
            names = ", ".join(sorted(self.connectors)) or "none"
            raise ConfigError(f"no pipeline named {name!r}; pipelines: {names}") from None

    def crm(self, pipeline: str) -> ConnectorSettings:
        return self._pipeline(pipeline).crm

    def ledger(self, pipeline: str) -> ConnectorSettings:
        return self._pipeline(pipeline).ledger

    def crm_class(self, pipeline: str) -> type[CrmSource]:
        return self._pipeline(pipeline).crm_class

    def ledger_class(self, pipeline: str) -> type[Ledger]:
        return self._pipeline(pipeline).ledger_class


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Read and validate the configuration file at ``path``; ``env`` defaults to ``os.environ``.

    Returns the :class:`AppConfig` (``.app``) with each pipeline's connector classes and validated
    settings. Raises :class:`ConfigValidationError` listing every problem.
    """
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigValidationError([Problem(str(path), 0, 0, "", "the file is not UTF-8 text")]) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigValidationError([Problem(str(path), 0, 0, "", f"cannot read the file: {reason}")]) from None
    loaded = loads(text, source=str(path), base_dir=file.resolve().parent, env=env)
    return LoadedConfig(app=loaded.app, path=file, connectors=loaded.connectors)


def loads(
    text: str,
    *,
    source: str = "<config>",
    base_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Validate configuration text. ``source`` names it in problems; ``base_dir`` anchors ``*_file`` paths."""
    ctx = _Context(
        file=source,
        base_dir=Path(base_dir) if base_dir is not None else Path.cwd(),
        env=os.environ if env is None else env,
    )
    data = _read_tree(text, ctx)
    result = None if data is None else _validate(data, ctx)
    if result is None and not ctx.problems:
        ctx.add((1, 1), (), "the configuration is not valid")  # not expected: every failure records why
    if ctx.problems or result is None:
        problems = sorted(set(ctx.problems), key=lambda p: (p.line, p.col, p.key_path, p.message))
        raise ConfigValidationError(problems) from None
    return result


def _validate(data: dict[str, Any], ctx: _Context) -> LoadedConfig | None:
    for key in [k for k in data if k.startswith(EXTENSION_PREFIX)]:
        del data[key]  # a place for anchors shared by pipelines
    _resolve_secret_files(AppConfig, data, (), ctx)
    resolved: dict[tuple[str, str], tuple[registry.ConnectorClass, ConnectorSettings]] = {}
    pipelines = data.get("pipelines")
    if isinstance(pipelines, dict):
        for name, pipeline in pipelines.items():
            if not isinstance(pipeline, dict):
                continue
            for kind in ("crm", "ledger"):
                got = _validate_connector(kind, ("pipelines", name, kind), pipeline, ctx)
                if got is not None:
                    resolved[(name, kind)] = got
        _check_pipeline_names(pipelines, ctx)
        _check_rate_keys(pipelines, ctx)
    app: AppConfig | None = None
    try:
        app = AppConfig.model_validate(data)
    except ValidationError as exc:
        _add_validation_problems(exc, (), ctx)
    if app is None or ctx.problems:
        return None
    connectors: dict[str, PipelineConnectors] = {}
    for name in app.pipelines:
        crm_class, crm = resolved[(name, "crm")]
        ledger_class, ledger = resolved[(name, "ledger")]
        connectors[name] = PipelineConnectors(
            crm_class=cast(type[CrmSource], crm_class),
            crm=crm,
            ledger_class=cast(type[Ledger], ledger_class),
            ledger=ledger,
        )
    return LoadedConfig(app=app, path=None, connectors=connectors)


def _check_pipeline_names(pipelines: dict[str, Any], ctx: _Context) -> None:
    """Report a bad pipeline name at its key, even when other problems keep AppConfig from checking names.

    Each name is tried alone in an otherwise minimal configuration, so the rule stays AppConfig's own.
    """
    for name in pipelines:
        probe = {"pipelines": {name: {"crm": {"type": "probe"}, "ledger": {"type": "probe"}}}}
        try:
            AppConfig.model_validate(probe)
        except ValidationError as exc:
            for err in exc.errors(include_url=False, include_input=False):
                if err["loc"] == ("pipelines",):
                    message = err["msg"].removeprefix("Value error, ")
                    ctx.add(ctx.spots[("pipelines", name)].at_key, ("pipelines", name), message)
                    ctx.reported.add((("pipelines",), message))


def _check_rate_keys(pipelines: dict[str, Any], ctx: _Context) -> None:
    """Two keys of a tax map that are the same rate (``20`` and ``20.0``) would silently collapse into one."""
    for name, pipeline in pipelines.items():
        taxes = pipeline.get("taxes") if isinstance(pipeline, dict) else None
        rates = taxes.get("map") if isinstance(taxes, dict) else None
        if not isinstance(rates, dict):
            continue
        first: dict[Decimal, str] = {}
        for key in rates:
            try:
                rate = Decimal(key)
            except InvalidOperation:
                continue  # AppConfig reports it
            if not rate.is_finite():
                continue
            if rate in first:
                line, col = ctx.spots[("pipelines", name, "taxes", "map", first[rate])].at_key
                path = ("pipelines", name, "taxes", "map", key)
                ctx.add(ctx.spots[path].at_key, path, f"the same rate as the key at line {line}, column {col}")
            else:
                first[rate] = key


def _validate_connector(
    kind: registry.Kind, path: Path_, pipeline: dict[str, Any], ctx: _Context
) -> tuple[registry.ConnectorClass, ConnectorSettings] | None:
    block = pipeline.get(kind)
    if not isinstance(block, dict):
        return None
    type_name = block.get("type")
    if not isinstance(type_name, str) or ctx.is_poisoned((*path, "type")):
        return None  # AppConfig reports a missing or mistyped 'type'
    try:
        cls = registry.connector_class(kind, type_name)
    except registry.UnknownConnectorError as exc:
        names = ", ".join(exc.available) or "none"
        if exc.load_error is None:
            message = f"unknown {kind} connector type; available: {names}"
        else:
            message = f"the {kind} connector could not be loaded ({exc.load_error}); available: {names}"
        ctx.add(ctx.spots[(*path, "type")].value, (*path, "type"), message)
        return None
    model = registry.settings_model(cls)
    _resolve_secret_files(model, block, path, ctx)
    settings: ConnectorSettings | None = None
    try:
        settings = model.model_validate(block)
    except ValidationError as exc:
        _add_validation_problems(exc, path, ctx)
    if settings is None:
        return None
    # AppConfig keeps the validated block, so its secrets are SecretStr there too, never clear text.
    pipeline[kind] = settings.model_dump()
    return cls, settings


# --------------------------------------------------------------------------------------------------
# JSON Schema


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of the configuration file, for editor completion and checks.

    Each ``crm:`` and ``ledger:`` block is a ``oneOf`` over the settings of the connectors available now,
    told apart by their ``type``. Every secret field also accepts its ``<field>_file`` form.
    """
    kinds: dict[registry.Kind, list[tuple[str, type[ConnectorSettings]]]] = {
        kind: [(name, _settings_of(kind, name)) for name in registry.available(kind)] for kind in ("crm", "ledger")
    }
    models: list[type[BaseModel]] = [AppConfig]
    for entries in kinds.values():
        models.extend(m for _, m in entries if m not in models)
    refs, top = models_json_schema([(m, "validation") for m in models])
    defs: dict[str, Any] = top.get("$defs", {})
    root_name = refs[(AppConfig, "validation")]["$ref"].rsplit("/", 1)[-1]
    root: dict[str, Any] = defs.pop(root_name)
    pipeline_name = root["properties"]["pipelines"]["additionalProperties"]["$ref"].rsplit("/", 1)[-1]
    pipeline = defs[pipeline_name]
    for kind, entries in kinds.items():
        if not entries:
            continue  # keep the generic block: 'type' plus any keys
        pipeline["properties"][kind] = {
            "oneOf": [
                {
                    "$ref": refs[(model, "validation")]["$ref"],
                    "properties": {"type": {"const": name}},
                    "required": ["type"],
                    "title": f"{kind} connector {name}",
                }
                for name, model in entries
            ],
            "description": f"The {kind} connector, chosen by 'type'",
        }
    used = _reachable(root, defs)
    for name in list(defs):
        if name not in used:
            defs.pop(name)  # the generic ConnectorBlock once every kind has connectors
    for schema in [root, *defs.values()]:
        _allow_secret_files(schema)
    root.setdefault("patternProperties", {})["^" + re.escape(EXTENSION_PREFIX)] = {
        "description": "Ignored: a place for anchors that pipelines refer to"
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "LedgerBridge configuration",
        **root,
        "$defs": defs,
    }


def _settings_of(kind: registry.Kind, name: str) -> type[ConnectorSettings]:
    return registry.settings_model(registry.connector_class(kind, name))


def _reachable(root: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    """Names of the definitions that ``root`` refers to, directly or through other definitions."""
    found: set[str] = set()
    todo: list[Any] = [root]
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                name = ref.removeprefix("#/$defs/")
                if name not in found and name in defs:
                    found.add(name)
                    todo.append(defs[name])
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return found


def _allow_secret_files(schema: dict[str, Any]) -> None:
    """Add ``<field>_file`` to an object schema for each secret field, either form satisfying 'required'."""
    props: dict[str, Any] = schema.get("properties", {})
    for name, prop in list(props.items()):
        options = prop.get("anyOf", [prop])
        if not any(isinstance(o, dict) and o.get("format") == "password" for o in options):
            continue
        file_key = f"{name}_file"
        if file_key in props:
            continue
        props[file_key] = {
            "type": "string",
            "title": f"{prop.get('title', name)} file",
            "description": f"Path of a file holding {name} (relative to the configuration file)",
        }
        required: list[str] = schema.get("required", [])
        one_of = [{"required": [name]}, {"required": [file_key]}]
        if name in required:
            required.remove(name)
            if not required:
                schema.pop("required")
            schema.setdefault("allOf", []).append({"oneOf": one_of})
        else:
            schema.setdefault("allOf", []).append({"not": {"required": [name, file_key]}})

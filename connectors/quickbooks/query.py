"""The QuickBooks Online query language (the SQL subset of ``/query``), parsed and evaluated for the sandbox.

Grammar (keywords in any case)::

    SELECT * | COUNT(*) | *, Field | Field, Field ... FROM Entity
        [WHERE cond AND cond ...]
        [ORDERBY Field [ASC|DESC], ...]          -- "ORDER BY" is accepted too
        [STARTPOSITION n] [MAXRESULTS n]
    cond := Field (= | != | < | > | <= | >=) value | Field IN (value, ...) | Field LIKE 'pat%'
    value := 'text' (\\' escapes a quote) | number | true | false

There is no OR, no JOIN, no GROUP BY, as in QuickBooks. Fields are dotted paths (``MetaData.LastUpdatedTime``);
a reference field (``CustomerRef``) compares by its ``value``. Text compares without regard to case.
Timestamps compare as instants, dates as dates, numbers as decimals.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["Condition", "QueryError", "Select", "lookup", "parse", "sort_key"]


class QueryError(Exception):
    """A statement QuickBooks would refuse. ``code`` is the Fault code (4000 parse error, 4001 invalid)."""

    def __init__(self, message: str, code: str = "4000") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Condition:
    field: str
    op: str  # = != < > <= >= IN LIKE
    values: tuple[Any, ...]


@dataclass
class Select:
    entity: str
    count: bool = False
    fields: tuple[str, ...] = ()  # empty: every field
    where: list[Condition] = field(default_factory=list)
    order: list[tuple[str, bool]] = field(default_factory=list)  # (field, descending)
    start: int = 1
    max_results: int | None = None

    def matches(self, record: Mapping[str, Any]) -> bool:
        return all(_test(record, cond) for cond in self.where)


_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:\\.|[^'\\])*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op><=|>=|!=|<>|=|<|>)"
    r"|(?P<punct>[(),*])|(?P<word>[A-Za-z_][A-Za-z0-9_.]*))"
)
_KEYWORDS = {"select", "from", "where", "and", "orderby", "order", "by", "asc", "desc", "startposition",
             "maxresults", "in", "like", "count", "or", "join", "group"}


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    text = text.strip().rstrip(";")
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise QueryError(f"QueryParserError: Encountered \"{text[pos:pos + 10].strip()}\" at position {pos + 1}")
        pos = m.end()
        kind = m.lastgroup
        raw = m.group(kind or "")
        if kind == "str":
            out.append(("value", re.sub(r"\\(.)", r"\1", raw[1:-1])))
        elif kind == "num":
            out.append(("value", Decimal(raw)))
        elif kind == "op":
            out.append(("op", "!=" if raw == "<>" else raw))
        elif kind == "punct":
            out.append(("punct", raw))
        elif raw.lower() in _KEYWORDS:
            out.append(("kw", raw.lower()))
        elif raw.lower() in ("true", "false"):
            out.append(("value", raw.lower() == "true"))
        else:
            out.append(("name", raw))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str, value: Any = None) -> Any:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            got = "end of statement" if tok is None else str(tok[1])
            want = value if value is not None else kind
            raise QueryError(f"QueryParserError: Encountered \"{got}\", expected {want}")
        self.i += 1
        return tok[1]

    def accept(self, kind: str, value: Any = None) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == kind and (value is None or tok[1] == value):
            self.i += 1
            return True
        return False

    def parse(self) -> Select:
        self.take("kw", "select")
        count = False
        fields: list[str] = []
        star = False
        if self.accept("kw", "count"):
            self.take("punct", "(")
            self.take("punct", "*")
            self.take("punct", ")")
            count = True
        else:
            while True:
                if self.accept("punct", "*"):
                    star = True
                else:
                    fields.append(self.take("name"))
                if not self.accept("punct", ","):
                    break
        self.take("kw", "from")
        sel = Select(entity=self.take("name"), count=count, fields=() if star or count else tuple(fields))
        if self.accept("kw", "where"):
            sel.where.append(self.condition())
            while True:
                if self.accept("kw", "and"):
                    sel.where.append(self.condition())
                    continue
                tok = self.peek()
                if tok is not None and tok == ("kw", "or"):
                    raise QueryError("QueryParserError: OR is not supported")
                break
        if self.accept("kw", "orderby") or (self.accept("kw", "order") and self.take("kw", "by")):
            while True:
                name = self.take("name")
                desc = False
                if self.accept("kw", "desc"):
                    desc = True
                else:
                    self.accept("kw", "asc")
                sel.order.append((name, desc))
                if not self.accept("punct", ","):
                    break
        for _ in range(2):
            if self.accept("kw", "startposition"):
                sel.start = self.integer("STARTPOSITION")
                if sel.start < 1:
                    raise QueryError(f"QueryValidationError: value {sel.start} is too small. Min allowed value is 1",
                                     "4001")
            elif self.accept("kw", "maxresults"):
                sel.max_results = self.integer("MAXRESULTS")
                if sel.max_results < 1:
                    raise QueryError(f"QueryValidationError: value {sel.max_results} is too small. "
                                     "Min allowed value is 1", "4001")
                if sel.max_results > 1000:
                    raise QueryError(f"QueryValidationError: value {sel.max_results} is too large. "
                                     "Max allowed value is 1000", "4001")
        tok = self.peek()
        if tok is not None:
            raise QueryError(f"QueryParserError: Encountered \"{tok[1]}\" after the end of the statement")
        return sel

    def integer(self, what: str) -> int:
        value = self.take("value")
        if not isinstance(value, Decimal) or value != value.to_integral_value():
            raise QueryError(f"QueryParserError: {what} takes an integer")
        return int(value)

    def condition(self) -> Condition:
        name = self.take("name")
        if self.accept("kw", "in"):
            self.take("punct", "(")
            values = [self.take("value")]
            while self.accept("punct", ","):
                values.append(self.take("value"))
            self.take("punct", ")")
            return Condition(name, "IN", tuple(values))
        if self.accept("kw", "like"):
            pattern = self.take("value")
            if not isinstance(pattern, str):
                raise QueryError("QueryParserError: LIKE takes a text pattern")
            return Condition(name, "LIKE", (pattern,))
        op = self.take("op")
        return Condition(name, op, (self.take("value"),))


def parse(statement: str) -> Select:
    """Parse one statement; raises :class:`QueryError` with QuickBooks' wording."""
    if not statement or not statement.strip():
        raise QueryError("QueryParserError: the query is empty")
    return _Parser(statement).parse()


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` (case-insensitive keys); a reference gives its ``value``."""
    current: Any = record
    for part in path.split("."):
        if not isinstance(current, Mapping):
            return None
        if part in current:
            current = current[part]
        else:
            lowered = part.lower()
            current = next((v for k, v in current.items() if k.lower() == lowered), None)
    if isinstance(current, Mapping):
        if "value" in current:
            return current["value"]
        if "Address" in current:  # PrimaryEmailAddr
            return current["Address"]
    return current


_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _coerce(left: Any, right: Any) -> tuple[Any, Any]:
    """Bring a stored value and a literal to comparable types."""
    if isinstance(left, bool) or isinstance(right, bool):
        return (str(left).lower() == "true" if not isinstance(left, bool) else left,
                str(right).lower() == "true" if not isinstance(right, bool) else right)
    if isinstance(left, str) and isinstance(right, str):
        if _DATETIME.match(left) or _DATETIME.match(right):
            lt, rt = _instant(left), _instant(right)
            if lt is not None and rt is not None:
                return lt, rt
        if _DATE.match(left) and _DATE.match(right):
            return left, right
        return left.casefold(), right.casefold()
    if isinstance(left, int | Decimal) or isinstance(right, Decimal):
        try:
            return Decimal(str(left)), Decimal(str(right))
        except InvalidOperation:
            return str(left), str(right)
    return left, right


def _instant(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            day = dt.date.fromisoformat(text[:10])
        except ValueError:
            return None
        return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _like(value: str, pattern: str) -> bool:
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("%")) + "$"
    return re.match(regex, value, re.IGNORECASE | re.DOTALL) is not None


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: bool(a == b),
    "!=": lambda a, b: bool(a != b),
    "<": lambda a, b: bool(a < b),
    ">": lambda a, b: bool(a > b),
    "<=": lambda a, b: bool(a <= b),
    ">=": lambda a, b: bool(a >= b),
}


def _test(record: Mapping[str, Any], cond: Condition) -> bool:
    value = lookup(record, cond.field)
    if value is None:
        return False
    if cond.op == "LIKE":
        return _like(str(value), str(cond.values[0]))
    if cond.op == "IN":
        return any(_compare(value, "=", v) for v in cond.values)
    return _compare(value, cond.op, cond.values[0])


def _compare(value: Any, op: str, literal: Any) -> bool:
    left, right = _coerce(value, literal)
    try:
        return _OPS[op](left, right)
    except TypeError:
        return False


def sort_key(record: Mapping[str, Any], name: str) -> tuple[int, Any]:
    """A key that orders one field's values: numbers (ids too) numerically, timestamps as instants."""
    value = lookup(record, name)
    if value is None:
        return (0, "")
    if isinstance(value, bool):
        return (1, int(value))
    if isinstance(value, int | Decimal):
        return (2, Decimal(value))
    text = str(value)
    if re.fullmatch(r"-?\d+", text):
        return (2, Decimal(text))
    if _DATETIME.match(text):
        instant = _instant(text)
        if instant is not None:
            return (3, instant.timestamp())
    return (4, text.casefold())

"""The ``where`` and ``order`` query parameters of the Xero API, as the sandbox understands them.

``where`` is a small expression language (Xero documents it by example)::

    Status=="AUTHORISED" AND Type=="ACCREC"
    Reference=="LB-1" OR Reference=="LB-2"
    Contact.ContactID==Guid("00000000-0000-0000-0000-000000000000")
    Date >= DateTime(2024, 01, 31) && AmountDue > 0
    Name.ToLower().Contains("acme")

Supported: ``==``/``=``/``!=``/``<``/``<=``/``>``/``>=``; ``AND``/``&&``, ``OR``/``||``, ``NOT``/``!``;
parentheses; string literals in double quotes (a quote inside is doubled, ``""``, or escaped, ``\\"``);
numbers, ``true``/``false``/``null``, ``Guid("...")``, ``DateTime(y, m, d[, h, mi, s])``; dotted field
paths (field names match case-insensitively); the methods ``ToLower``, ``ToUpper``, ``Contains``,
``StartsWith`` and ``EndsWith``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = ["Guid", "QueryError", "compile_where", "parse_order", "sort_records"]

Record = Mapping[str, Any]
Predicate = Callable[[Record], bool]


class QueryError(ValueError):
    """The ``where`` or ``order`` expression cannot be parsed."""


class Guid(str):
    """A GUID literal: compares case-insensitively with strings."""

    __slots__ = ()


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.|"")*")
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<op>==|!=|>=|<=|&&|\|\||[=<>!(),.])
      | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise QueryError(f"unexpected character at position {pos}: {text[pos:pos + 10]!r}")
        kind = m.lastgroup or ""
        toks.append(_Tok(kind, m.group(kind)))
        pos = m.end()
    return toks


def _unquote(literal: str) -> str:
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        elif ch == '"' and i + 1 < len(body) and body[i + 1] == '"':
            out.append('"')
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _lookup(record: Any, path: Sequence[str]) -> Any:
    value = record
    for part in path:
        if not isinstance(value, Mapping):
            return None
        if part in value:
            value = value[part]
            continue
        lower = part.lower()
        for key, v in value.items():
            if isinstance(key, str) and key.lower() == lower:
                value = v
                break
        else:
            return None
    return value


def _as_comparable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return Decimal(str(value))
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Guid) or isinstance(b, Guid):
        return str(a).lower() == str(b).lower() if a is not None and b is not None else a is b
    a, b = _as_comparable(a), _as_comparable(b)
    if isinstance(a, Decimal) and isinstance(b, str):
        try:
            return a == Decimal(b)
        except InvalidOperation:
            return False
    return bool(a == b)


def _order(op: str, a: Any, b: Any) -> bool:
    a, b = _as_comparable(a), _as_comparable(b)
    if a is None or b is None:
        return False
    try:
        if op == "<":
            return bool(a < b)
        if op == "<=":
            return bool(a <= b)
        if op == ">":
            return bool(a > b)
        return bool(a >= b)
    except TypeError:
        return False


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokenize(text)
        self.i = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise QueryError("unexpected end of expression")
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            raise QueryError(f"expected {text!r}, found {tok.text!r}")

    def at_word(self, *words: str) -> bool:
        tok = self.peek()
        return tok is not None and (
            (tok.kind == "ident" and tok.text.upper() in words) or (tok.kind == "op" and tok.text in words)
        )

    def parse(self) -> Predicate:
        pred = self.parse_or()
        if self.peek() is not None:
            raise QueryError(f"unexpected {self.peek().text!r}")  # type: ignore[union-attr]
        return pred

    def parse_or(self) -> Predicate:
        parts = [self.parse_and()]
        while self.at_word("OR", "||"):
            self.take()
            parts.append(self.parse_and())
        if len(parts) == 1:
            return parts[0]
        return lambda r: any(p(r) for p in parts)

    def parse_and(self) -> Predicate:
        parts = [self.parse_not()]
        while self.at_word("AND", "&&"):
            self.take()
            parts.append(self.parse_not())
        if len(parts) == 1:
            return parts[0]
        return lambda r: all(p(r) for p in parts)

    def parse_not(self) -> Predicate:
        if self.at_word("NOT", "!"):
            self.take()
            inner = self.parse_not()
            return lambda r: not inner(r)
        return self.parse_comparison()

    def parse_comparison(self) -> Predicate:
        tok = self.peek()
        if tok is not None and tok.text == "(":
            # A parenthesised sub-expression (operands never start with a parenthesis).
            self.take()
            inner = self.parse_or()
            self.expect(")")
            return inner
        left = self.parse_operand()
        tok = self.peek()
        if tok is not None and tok.kind == "op" and tok.text in {"==", "=", "!=", "<", "<=", ">", ">="}:
            op = self.take().text
            right = self.parse_operand()
            if op in {"==", "="}:
                return lambda r: _equal(left(r), right(r))
            if op == "!=":
                return lambda r: not _equal(left(r), right(r))
            return lambda r: _order(op, left(r), right(r))
        return lambda r: left(r) is True

    def parse_operand(self) -> Callable[[Record], Any]:
        tok = self.take()
        if tok.kind == "string":
            text = _unquote(tok.text)
            return lambda _r: text
        if tok.kind == "number":
            number = Decimal(tok.text)
            return lambda _r: number
        if tok.kind != "ident":
            raise QueryError(f"unexpected {tok.text!r}")
        word = tok.text.lower()
        if word in {"true", "false"}:
            flag = word == "true"
            return lambda _r: flag
        if word == "null":
            return lambda _r: None
        nxt = self.peek()
        if word == "guid" and nxt is not None and nxt.text == "(":
            self.take()
            lit = self.take()
            if lit.kind != "string":
                raise QueryError("Guid() takes a quoted string")
            self.expect(")")
            guid = Guid(_unquote(lit.text))
            return lambda _r: guid
        if word == "datetime" and nxt is not None and nxt.text == "(":
            self.take()
            nums: list[int] = []
            while True:
                num = self.take()
                if num.kind != "number":
                    raise QueryError("DateTime() takes numbers")
                nums.append(int(Decimal(num.text)))
                sep = self.take()
                if sep.text == ")":
                    break
                if sep.text != ",":
                    raise QueryError("DateTime(year, month, day[, hour, minute, second])")
            if not 3 <= len(nums) <= 6:
                raise QueryError("DateTime(year, month, day[, hour, minute, second])")
            nums += [0] * (6 - len(nums))
            try:
                when = dt.datetime(nums[0], nums[1], nums[2], nums[3], nums[4], nums[5], tzinfo=dt.UTC)
            except ValueError as exc:
                raise QueryError(f"bad DateTime: {exc}") from None
            return lambda _r: when
        path = [tok.text]
        methods: list[tuple[str, list[str]]] = []
        while (dot := self.peek()) is not None and dot.text == ".":
            self.take()
            name = self.take()
            if name.kind != "ident":
                raise QueryError(f"expected a field or method after '.', found {name.text!r}")
            after = self.peek()
            if after is not None and after.text == "(":
                methods.append((name.text.lower(), self._args(name.text)))
            elif methods:
                raise QueryError(f"field access after a method call: {name.text!r}")
            else:
                path.append(name.text)
        for method, args in methods:
            if method not in _METHODS or len(args) != _METHODS[method]:
                raise QueryError(f"unsupported method {method}() with {len(args)} argument(s)")
        return lambda r: _apply(_lookup(r, path), methods)

    def _args(self, name: str) -> list[str]:
        self.expect("(")
        args: list[str] = []
        while True:
            tok = self.take()
            if tok.text == ")":
                return args
            if tok.kind == "string":
                args.append(_unquote(tok.text))
            elif tok.text != ",":
                raise QueryError(f"method {name}() takes string arguments")


_METHODS = {"tolower": 0, "toupper": 0, "contains": 1, "startswith": 1, "endswith": 1}


def _apply(value: Any, methods: Sequence[tuple[str, Sequence[str]]]) -> Any:
    for name, args in methods:
        if value is None:
            return None if name in {"tolower", "toupper"} else False
        text = str(value)
        if name == "tolower":
            value = text.lower()
        elif name == "toupper":
            value = text.upper()
        elif name == "contains":
            value = args[0] in text
        elif name == "startswith":
            value = text.startswith(args[0])
        else:
            value = text.endswith(args[0])
    return value


def compile_where(text: str | None) -> Predicate:
    """A predicate over records (mappings of Xero field names) for a ``where`` expression."""
    if text is None or not text.strip():
        return lambda _r: True
    return _Parser(text).parse()


def parse_order(text: str | None) -> list[tuple[list[str], bool]]:
    """``"Name ASC, UpdatedDateUTC DESC"`` -> ``[(["Name"], False), (["UpdatedDateUTC"], True)]``."""
    out: list[tuple[list[str], bool]] = []
    if not text:
        return out
    for part in text.split(","):
        words = part.split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and words[1].upper() not in {"ASC", "DESC"}):
            raise QueryError(f"bad order clause {part.strip()!r}")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", words[0]):
            raise QueryError(f"bad order field {words[0]!r}")
        out.append((words[0].split("."), len(words) == 2 and words[1].upper() == "DESC"))
    return out


def sort_records(records: list[Any], order: list[tuple[list[str], bool]]) -> list[Any]:
    """Stable sort of ``records`` by the ``order`` clauses (None sorts first ascending)."""
    result = list(records)
    for path, desc in reversed(order):
        def key(r: Any, path: list[str] = path) -> tuple[int, Any]:
            value = _as_comparable(_lookup(r, path))
            if value is None:
                return (0, "")
            if isinstance(value, str):
                return (1, value.lower())
            return (1, value)

        try:
            result.sort(key=key, reverse=desc)
        except TypeError:
            raise QueryError(f"cannot order by {'.'.join(path)}") from None
    return result

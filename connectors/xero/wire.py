"""Xero wire formats shared by the client and the sandbox: JSON with exact decimals, MS-JSON dates.

Xero answers dates as ``/Date(1552262400000+0000)/`` (milliseconds since the epoch, with an optional
offset) and accepts ``YYYY-MM-DD`` on input. Amounts travel as JSON numbers; they are read into
:class:`~decimal.Decimal` (``parse_float=Decimal``) and written from ``Decimal`` without passing
through ``float``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from decimal import Decimal
from typing import Any

__all__ = [
    "dumps",
    "loads",
    "ms_date",
    "ms_datetime",
    "ms_timestamp",
    "parse_date",
    "parse_datetime",
]

_MS_DATE = re.compile(r"^/Date\((?P<ms>-?\d+)(?P<tz>[+-]\d{4})?\)/$")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return json.loads(data, parse_float=Decimal)


def _number(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError("amounts must be finite")
    text = format(value, "f")
    return text if text not in ("-0", "-0.0") else text.lstrip("-")


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, Decimal):
        out.append(_number(obj))
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, float | str):
        out.append(json.dumps(obj))
    elif isinstance(obj, dict):
        out.append("{")
        first = True
        for key, value in obj.items():
            if not first:
                out.append(",")
            first = False
            out.append(json.dumps(str(key)))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    elif isinstance(obj, dt.datetime | dt.date):
        out.append(json.dumps(obj.isoformat()))
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def dumps(obj: Any) -> str:
    """Serialise ``obj`` to JSON; Decimals are written exactly as numbers."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out)


def ms_timestamp(when: float | dt.datetime) -> int:
    """Milliseconds since the epoch of an epoch-seconds float or an aware datetime."""
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        return int((when - _EPOCH) / dt.timedelta(milliseconds=1))
    return round(when * 1000)


def ms_datetime(when: float | dt.datetime, *, offset: bool = True) -> str:
    """``/Date(ms+0000)/`` (``offset=False``: ``/Date(ms)/``, the form of the envelope's DateTimeUTC)."""
    ms = ms_timestamp(when)
    return f"/Date({ms}+0000)/" if offset else f"/Date({ms})/"


def ms_date(day: dt.date) -> str:
    """A calendar date as Xero writes it: midnight UTC in MS-JSON form."""
    return ms_datetime(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC))


def parse_datetime(value: Any) -> dt.datetime | None:
    """An aware UTC datetime from MS-JSON, ISO-8601 (naive = UTC) or ``YYYY-MM-DD``; None if unparseable."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    text = str(value).strip()
    m = _MS_DATE.match(text)
    if m:
        # The offset tells the local time of the instant; the milliseconds are UTC already.
        return _EPOCH + dt.timedelta(milliseconds=int(m.group("ms")))
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def parse_date(value: Any) -> dt.date | None:
    """A calendar date from MS-JSON, ISO-8601 or ``YYYY-MM-DD``; None if unparseable."""
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        m = _MS_DATE.match(value.strip())
        if m is None:
            try:
                return dt.date.fromisoformat(value.strip()[:10])
            except ValueError:
                return None
        # A date written at local midnight with its offset (``+1200``) belongs to the local day.
        instant = _EPOCH + dt.timedelta(milliseconds=int(m.group("ms")))
        tz = m.group("tz")
        if tz:
            sign = -1 if tz[0] == "-" else 1
            instant += sign * dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[3:5]))
        return instant.date()
    parsed = parse_datetime(value)
    return parsed.date() if parsed else None

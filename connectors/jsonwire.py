"""JSON with exact decimals: what every connector sends and reads, so no amount ever passes through float.

:func:`loads` reads every non-integer number as a :class:`~decimal.Decimal`; :func:`dumps` writes Decimals
as plain JSON numbers (``1250.50``, never ``1.2505E+3``), a negative zero as ``0``, and dates and datetimes
as text, the datetime in whatever form the vendor takes (``datetime_text``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

__all__ = ["decimal_text", "dumps", "loads"]


def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return json.loads(data, parse_float=Decimal)


def decimal_text(value: Decimal, *, zero: str | None = None) -> str:
    """``value`` in plain notation; a zero of any sign and scale is ``zero`` when given, else unsigned."""
    if not value.is_finite():
        raise ValueError("numbers must be finite")
    text = format(value, "f")
    if value == 0:
        return zero if zero is not None else text.lstrip("-")
    return text


def dumps(obj: Any, *, datetime_text: Callable[[dt.datetime], str] = dt.datetime.isoformat,
          zero: str | None = None, allow_float: bool = True) -> str:
    """Serialise ``obj``; Decimals exactly (``zero`` replaces the text of a zero when given)."""
    out: list[str] = []

    def encode(value: Any) -> None:
        if value is None:
            out.append("null")
        elif value is True:
            out.append("true")
        elif value is False:
            out.append("false")
        elif isinstance(value, Decimal):
            out.append(decimal_text(value, zero=zero))
        elif isinstance(value, int):
            out.append(str(value))
        elif isinstance(value, str) or (allow_float and isinstance(value, float)):
            out.append(json.dumps(value, ensure_ascii=False))
        elif isinstance(value, Mapping):
            out.append("{")
            for i, (key, item) in enumerate(value.items()):
                if i:
                    out.append(",")
                out.append(json.dumps(str(key), ensure_ascii=False))
                out.append(":")
                encode(item)
            out.append("}")
        elif isinstance(value, list | tuple):
            out.append("[")
            for i, item in enumerate(value):
                if i:
                    out.append(",")
                encode(item)
            out.append("]")
        elif isinstance(value, dt.datetime):
            out.append(json.dumps(datetime_text(value)))
        elif isinstance(value, dt.date):
            out.append(json.dumps(value.isoformat()))
        else:
            raise TypeError(f"cannot encode {type(value).__name__} as JSON")

    encode(obj)
    return "".join(out)

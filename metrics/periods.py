"""Calendar months, the period every monthly metric is bucketed by.

A month is keyed by its ``"YYYY-MM"`` string, which sorts in time order and is what the metrics results
(and their JSON) use as keys.
"""

from __future__ import annotations

import calendar
import datetime as dt
from collections.abc import Iterator

__all__ = ["add_months", "month_end", "month_key", "month_range", "month_start", "months_between", "parse_month"]


def month_key(day: dt.date) -> str:
    """The ``"YYYY-MM"`` key of the calendar month holding ``day``."""
    return f"{day.year:04d}-{day.month:02d}"


def parse_month(key: str) -> dt.date:
    """The first day of the month ``key`` (``"YYYY-MM"``)."""
    year, month = key.split("-")
    return dt.date(int(year), int(month), 1)


def month_start(day: dt.date) -> dt.date:
    """The first day of ``day``'s month."""
    return day.replace(day=1)


def month_end(day: dt.date) -> dt.date:
    """The last day of ``day``'s month."""
    return day.replace(day=calendar.monthrange(day.year, day.month)[1])


def add_months(day: dt.date, months: int) -> dt.date:
    """``day`` moved by ``months`` calendar months, clamped to the end of a shorter month (Mar 31 - 1 = Feb 28)."""
    index = day.year * 12 + day.month - 1 + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(day.day, last))


def months_between(earlier: str, later: str) -> int:
    """Whole calendar months from month key ``earlier`` to month key ``later`` (0 for the same month)."""
    a, b = parse_month(earlier), parse_month(later)
    return (b.year - a.year) * 12 + b.month - a.month


def month_range(first: str, last: str) -> Iterator[str]:
    """Month keys from ``first`` to ``last`` inclusive, in order (nothing when ``first`` is after ``last``)."""
    day = parse_month(first)
    end = parse_month(last)
    while day <= end:
        yield month_key(day)
        day = add_months(day, 1)

"""The exact-decimal JSON every connector speaks: amounts never pass through float."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from connectors import jsonwire


def test_decimals_round_trip_exactly() -> None:
    """A Decimal is written in plain notation and read back as the same Decimal."""
    body = {"amount": Decimal("1250.50"), "rate": Decimal("5.5"), "big": Decimal("1.2505E+3"), "n": 3}
    text = jsonwire.dumps(body)
    assert text == '{"amount":1250.50,"rate":5.5,"big":1250.5,"n":3}'
    assert jsonwire.loads(text) == {"amount": Decimal("1250.50"), "rate": Decimal("5.5"),
                                    "big": Decimal("1250.5"), "n": 3}
    assert jsonwire.loads("0.1") + jsonwire.loads("0.2") == Decimal("0.3")


def test_zeros_dates_and_refusals() -> None:
    """Negative zero is unsigned, a custom zero text applies, dates are text, NaN and floats can be refused."""
    assert jsonwire.dumps(Decimal("-0.00")) == "0.00"
    assert jsonwire.dumps(Decimal("-0.00"), zero="0") == "0"
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert jsonwire.dumps([when, when.date()]) == '["2026-01-02T03:04:05+00:00", "2026-01-02"]'.replace(", ", ",")
    assert jsonwire.dumps(when, datetime_text=lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")) == '"2026-01-02T03:04:05Z"'
    with pytest.raises(ValueError, match="finite"):
        jsonwire.dumps(Decimal("NaN"))
    with pytest.raises(TypeError):
        jsonwire.dumps(0.1, allow_float=False)
    with pytest.raises(TypeError):
        jsonwire.dumps(object())

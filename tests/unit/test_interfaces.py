"""The shared connector types behave as the engine and the connectors rely on."""

from __future__ import annotations

import datetime as dt

from connectors.interfaces import Cursor

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_cursors_order_numeric_ids_numerically_within_a_timestamp() -> None:
    """Deal 9 comes before deal 18 at one timestamp, as the CRMs hand them out; time orders first."""
    assert Cursor(T0, "9") < Cursor(T0, "18")
    assert sorted([Cursor(T0, "18"), Cursor(T0, "9"), Cursor(T0, "100")]) == [
        Cursor(T0, "9"), Cursor(T0, "18"), Cursor(T0, "100")]
    assert Cursor(T0, "999") < Cursor(T0 + dt.timedelta(microseconds=1), "1")
    assert Cursor(T0, "") < Cursor(T0, "1")


def test_fixed_length_ids_order_as_text() -> None:
    """Salesforce's 18-character ids keep their text order."""
    a, b = "006000000000001AAA", "006000000000002AAA"
    assert Cursor(T0, a) < Cursor(T0, b)
    assert max(Cursor(T0, b), Cursor(T0, a)) == Cursor(T0, b)

"""Acquisition spend from a CSV: converted to the home currency; a bad row named by file and line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from connectors.errors import ConfigError
from metrics.load import Rates, read_spend_csv
from tests.harness import run_cli

RATES = Rates("EUR", {"USD": Decimal("0.92")})


def _csv(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "spend.csv"
    path.write_text("date,channel,campaign,amount,currency\n" + body, encoding="utf-8")
    return path


def test_rows_become_spend_in_the_home_currency(tmp_path: Path) -> None:
    path = _csv(tmp_path, "2026-01-31,paid_search,Brand,1000.00,EUR\n2026-01-31,paid_social,,500,USD\n"
                          "2026-02-28,overhead,Salaries,9000,EUR\n")
    spend = read_spend_csv(path, RATES, ["overhead"])
    assert [(s.channel, s.amount, s.kind, s.campaign) for s in spend] == [
        ("paid_search", Decimal("1000.00"), "paid", "Brand"),
        ("paid_social", Decimal("460.00"), "paid", None),
        ("overhead", Decimal("9000.00"), "overhead", "Salaries"),
    ]


@pytest.mark.parametrize(("body", "message"), [
    ("2026-13-01,paid_search,x,10,EUR\n", ":2: date '2026-13-01' is not YYYY-MM-DD"),
    ("2026-01-01,paid_search,x,ten,EUR\n", ":2: amount 'ten' is not a number"),
    ("2026-01-01,paid_search,x,10,EUR\n2026-01-02,,x,10,EUR\n", ":3: channel is empty"),
    ("2026-01-01,paid_search,x,10,EURO\n", ":2: currency 'EURO' is not an ISO-4217 code"),
    ("2026-01-01,paid_search,x,10,GBP\n", "no exchange rate from GBP to EUR for"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path: Path, body: str, message: str) -> None:
    path = _csv(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        read_spend_csv(path, RATES, ["overhead"])
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_columns_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "spend.csv"
    path.write_text("date,channel,amount\n2026-01-01,x,1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"spend.csv:1: the spend CSV lacks the column\(s\) campaign, currency"):
        read_spend_csv(path, RATES, [])
    with pytest.raises(ConfigError, match="cannot read the spend CSV"):
        read_spend_csv(tmp_path / "nope.csv", RATES, [])


def test_metrics_command_rejects_a_bad_date(tmp_path: Path) -> None:
    res = run_cli("metrics", "-c", "config/examples/demo.yaml", "--as-of", "2026-02-30")
    assert res.returncode == 2
    assert "--as-of: '2026-02-30' is not a date" in res.stderr

"""Write-back to a CRM: only changed values, renamed fields, cleared values, rejected records retried."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hubspot import HubSpot

from config.schema import MetricsFields
from connectors.hubspot.adapter import HubSpotSource
from connectors.sandboxkit import serve
from connectors.xero.testing import MemoryTokenStore
from metrics import writeback
from metrics.writeback import CUSTOMER_FIELDS, canonical, write_back
from sync.factstore import FactStore
from sync.sandboxes import build_sandbox, crm_sandbox_settings
from sync.state import StateStore


@pytest.fixture
def hubspot(tmp_path: Path) -> Iterator[tuple[HubSpotSource, HubSpot, FactStore, list[str]]]:
    sandbox = build_sandbox("hubspot", seed=2, deals=12, companies=6, time_scale=20)
    server = serve(sandbox)
    crm = HubSpotSource.from_config(crm_sandbox_settings("hubspot", server.url, time_scale=20), MemoryTokenStore())
    assert isinstance(crm, HubSpotSource)
    client = HubSpot(access_token="demo-hubspot-token", host=server.url)
    ids = sorted(c.id for c in client.crm.companies.basic_api.get_page(limit=10).results)[:3]
    store = StateStore.open(f"sqlite:///{tmp_path / 's.db'}")
    try:
        yield crm, client, FactStore(store), ids
    finally:
        crm.close()
        store.close()
        server.stop()


def _props(client: HubSpot, company_id: str, *names: str) -> dict[str, Any]:
    got: dict[str, Any] = client.crm.companies.basic_api.get_by_id(company_id, properties=list(names)).properties
    return got


def test_values_are_written_once_renamed_fields_honoured_and_undefined_values_cleared(
        hubspot: tuple[HubSpotSource, HubSpot, FactStore, list[str]]) -> None:
    crm, client, facts, ids = hubspot
    fields = MetricsFields(customer={"balance_due": "finance_open_balance"})
    records = {cid: {"balance_due": Decimal("1200.5"), "p_alive": 0.81234, "risk_signals": ("overdue invoices: 1",),
                     "last_invoice_date": dt.date(2026, 10, 1)} for cid in ids}
    first = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=fields)
    assert first.records_changed == 3
    assert first.values_written == 12
    assert first.write_calls == 1  # three records fit one batch
    props = _props(client, ids[0], "finance_open_balance", "ledgerbridge_balance_due", "ledgerbridge_p_alive",
                   "ledgerbridge_risk_signals", "ledgerbridge_last_invoice_date")
    assert props["finance_open_balance"] == "1200.50"
    assert props.get("ledgerbridge_balance_due") in (None, "")
    assert props["ledgerbridge_p_alive"] == "0.812"
    assert props["ledgerbridge_risk_signals"] == "overdue invoices: 1"

    again = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=fields)
    assert (again.values_changed, again.write_calls) == (0, 0)

    # One value changes, one becomes undefined: exactly those two are sent, the undefined one cleared.
    records[ids[1]] = {**records[ids[1]], "balance_due": Decimal("0"), "risk_signals": ()}
    third = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=fields)
    assert (third.records_changed, third.values_changed) == (1, 2)
    props = _props(client, ids[1], "finance_open_balance", "ledgerbridge_risk_signals")
    assert props["finance_open_balance"] == "0.00"
    assert props["ledgerbridge_risk_signals"] in (None, "")


def test_a_record_the_crm_rejects_is_reported_and_retried_next_run(
        hubspot: tuple[HubSpotSource, HubSpot, FactStore, list[str]]) -> None:
    crm, _, facts, ids = hubspot
    records = {cid: {"balance_due": Decimal("10")} for cid in ids}
    records["999999999"] = {"balance_due": Decimal("10")}  # no such company
    res = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=MetricsFields())
    assert res.records_failed == 1
    assert "999999999" in res.errors[0]
    assert res.values_written == 3
    dry = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=MetricsFields(),
                     dry_run=True)
    assert (dry.records_changed, dry.values_written, dry.write_calls) == (1, 0, 0)


def test_a_stop_request_ends_the_write_back_between_chunks_and_the_next_run_writes_the_rest(
        hubspot: tuple[HubSpotSource, HubSpot, FactStore, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chunk's accepted values are recorded before the next chunk; a stop between chunks leaves the rest
    for the next run, which writes exactly those."""
    crm, client, facts, ids = hubspot
    monkeypatch.setattr(writeback, "WRITE_CHUNK", 2)
    records = {cid: {"balance_due": Decimal(n + 1)} for n, cid in enumerate(ids)}
    stopped = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR",
                         fields=MetricsFields(), stop=lambda: True)
    assert stopped.stopped
    assert (stopped.records_changed, stopped.values_written, stopped.write_calls) == (3, 2, 1)
    assert set(facts.written_values("p", "customer")) == {(cid, "ledgerbridge_balance_due") for cid in ids[:2]}
    assert _props(client, ids[2], "ledgerbridge_balance_due").get("ledgerbridge_balance_due") in (None, "")

    rest = write_back(crm, facts, "p", "customer", CUSTOMER_FIELDS, records, currency="EUR", fields=MetricsFields(),
                      stop=lambda: False)
    assert not rest.stopped
    assert (rest.records_changed, rest.values_written, rest.write_calls) == (1, 1, 1)
    assert _props(client, ids[2], "ledgerbridge_balance_due")["ledgerbridge_balance_due"] == "3.00"


@pytest.mark.parametrize(("value", "kind", "expected"), [
    (Decimal("12.345"), "money", "12.35"),
    (Decimal("12.345"), "days", "12.3"),
    (0.123456, "ratio", "0.123"),
    (7, "count", "7"),
    (Decimal("1E+3"), "money", "1000.00"),
    (float("nan"), "ratio", None),
    (None, "money", None),
    ((), "text", None),
    (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC), "datetime", "2026-01-02T03:04:05.000Z"),
])
def test_canonical_text(value: Any, kind: Any, expected: str | None) -> None:
    assert canonical(value, kind, "EUR") == expected


def test_canonical_rounds_money_to_the_currency() -> None:
    assert canonical(Decimal("1234.5"), "money", "JPY") == "1235"
    assert canonical(Decimal("1.2345"), "money", "KWD") == "1.235"

"""The ledger pull: every sales document into the state store, incrementally, never past what is stored."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.domain import Payment
from connectors.errors import VendorError
from connectors.sandboxkit import serve
from connectors.xero.adapter import XeroLedger
from connectors.xero.testing import MemoryTokenStore
from sync.factstore import FactStore
from sync.ledgerpull import LedgerPull
from sync.sandboxes import build_sandbox, ledger_sandbox_settings
from sync.state import StateStore

TODAY = dt.datetime.now(dt.UTC).date()


@pytest.fixture
def xero() -> Iterator[tuple[Any, str]]:
    sandbox = build_sandbox("xero", seed=5, deals=60, companies=30, history_years=2, today=TODAY)
    server = serve(sandbox)
    try:
        yield sandbox, server.url
    finally:
        server.stop()


def _sales(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sandbox's sales invoices and the payments against them (supplier bills are not sales)."""
    invoices = [i for i in httpx.get(url + "/_sandbox/invoices", timeout=30).json() if i["Type"] == "ACCREC"]
    ids = {i["InvoiceID"] for i in invoices}
    payments = [p for p in httpx.get(url + "/_sandbox/payments", timeout=30).json() if p["InvoiceID"] in ids]
    return invoices, payments


def _ledger(url: str) -> XeroLedger:
    settings = ledger_sandbox_settings("xero", url)
    ledger = XeroLedger.from_config(settings, MemoryTokenStore())
    assert isinstance(ledger, XeroLedger)
    return ledger


def test_pull_stores_every_document_then_only_what_changed(xero: tuple[Any, str], tmp_path: Path) -> None:
    _, url = xero
    store = StateStore.open(f"sqlite:///{tmp_path / 's.db'}")
    ledger = _ledger(url)
    try:
        first = LedgerPull("p", ledger, store, overlap=dt.timedelta(0)).run()
        assert first.status == "ok", first.error
        invoices, payments = _sales(url)
        assert first.counts["invoices"] == len(invoices) > 50
        assert first.counts["payments"] == len(payments) > 0
        assert first.counts["credit_notes"] > 0
        facts = FactStore(store)
        stored = {r.ledger_id: r for r in facts.ledger_invoices("p")}
        assert set(stored) == {i["InvoiceID"] for i in invoices}
        some = invoices[0]
        row = stored[some["InvoiceID"]]
        assert row.total == Decimal(str(some["Total"]))
        assert row.amount_due == Decimal(str(some["AmountDue"]))
        assert row.due_date == dt.date.fromisoformat(some["DueDate"][:10])
        assert row.url is not None
        assert some["InvoiceID"] in row.url
        assert {p.ledger_id for p in facts.ledger_payments("p")} == {p["PaymentID"] for p in payments}
        cursor = store.get_cursor("p", "ledger_invoices")
        assert cursor is not None

        # Payments later: a pull reads what changed since the last one, not the whole ledger. Xero's
        # If-Modified-Since has whole seconds and includes its second, so each pull re-reads the second its
        # cursor is in (the history was loaded within one): the third pull shows the steady state.
        open_inv = next(i for i in invoices if i["Status"] == "AUTHORISED" and Decimal(str(i["AmountDue"])) > 2)
        pulls = []
        for _ in range(2):
            time.sleep(1.1)
            r = httpx.post(url + "/_sandbox/payments", timeout=10, json={
                "invoice_id": open_inv["InvoiceID"], "amount": "1.00", "date": TODAY.isoformat()})
            assert r.status_code < 300, r.text
            pulls.append(LedgerPull("p", ledger, store, overlap=dt.timedelta(0)).run())
        assert all(p.status == "ok" for p in pulls)
        assert pulls[1].counts["invoices"] == 1
        assert pulls[1].counts["payments"] in (1, 2)  # the new one, and the last pull's if in the same second
        assert pulls[1].counts["credit_notes"] <= first.counts["credit_notes"]
        assert sum(pulls[1].counts.values()) < 10 < first.counts["invoices"]
        after = {r.ledger_id: r for r in facts.ledger_invoices("p")}[open_inv["InvoiceID"]]
        assert after.amount_due == Decimal(str(open_inv["AmountDue"])) - 2
        assert len(facts.ledger_payments("p")) == len(payments) + 2
        assert pulls[1].api_calls["xero"] < first.api_calls["xero"]
    finally:
        ledger.close()
        store.close()


def test_a_pull_that_fails_mid_stream_keeps_what_it_stored_and_its_cursor(xero: tuple[Any, str],
                                                                          tmp_path: Path) -> None:
    _, url = xero
    store = StateStore.open(f"sqlite:///{tmp_path / 's.db'}")
    ledger = _ledger(url)
    real = ledger.list_payments

    def failing(modified_since: dt.datetime | None = None) -> Iterator[Payment]:
        for n, p in enumerate(real(modified_since)):
            if n == 210:
                raise VendorError("xero: connection reset", vendor="xero")
            yield p

    try:
        ledger.list_payments = failing  # type: ignore[method-assign]
        res = LedgerPull("p", ledger, store).run()
        assert res.status == "failed"
        assert "connection reset" in (res.error or "")
        assert store.get_cursor("p", "ledger_invoices") is not None  # earlier streams completed
        assert store.get_cursor("p", "ledger_payments") is None  # not moved past what is missing
        assert len(FactStore(store).ledger_payments("p")) == 200  # the full chunk stored before the failure
        ledger.list_payments = real  # type: ignore[method-assign]
        again = LedgerPull("p", ledger, store).run()
        assert again.status == "ok"
        assert store.get_cursor("p", "ledger_payments") is not None
        assert len(FactStore(store).ledger_payments("p")) == len(_sales(url)[1])
    finally:
        ledger.close()
        store.close()


def test_a_stop_request_ends_the_pull_after_the_chunk_in_flight(xero: tuple[Any, str], tmp_path: Path) -> None:
    """Asked to stop after its first chunk, the pull keeps that chunk, leaves the stream's cursor unset and
    reads no further stream; the next pull completes every stream."""
    _, url = xero
    store = StateStore.open(f"sqlite:///{tmp_path / 's.db'}")
    ledger = _ledger(url)
    asked: list[str] = []

    def stop() -> bool:
        asked.append("asked")
        return len(asked) > 1  # the check before the first stream says go on, the one after its first chunk stops

    try:
        res = LedgerPull("p", ledger, store, stop=stop).run()
        assert res.status == "partial"
        assert "stopped for shutdown during ledger_invoices" in (res.error or "")
        assert len(asked) == 2
        facts = FactStore(store)
        assert len(facts.ledger_invoices("p")) == 200  # the chunk read before the stop, stored
        assert store.get_cursor("p", "ledger_invoices") is None  # the stream is not complete
        assert facts.ledger_payments("p") == []  # later streams never started
        again = LedgerPull("p", ledger, store).run()
        assert again.status == "ok"
        invoices, payments = _sales(url)
        assert len(facts.ledger_invoices("p")) == len(invoices) > 200
        assert len(facts.ledger_payments("p")) == len(payments)
    finally:
        ledger.close()
        store.close()

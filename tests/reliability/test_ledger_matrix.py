"""Every CRM times every ledger: the same book gives invoices that agree across Xero, QuickBooks and Pennylane.

One pipeline config per run; between runs only the ``crm:`` or the ``ledger:`` block changes (each ledger
block carries its own tax types). Each ledger applies its own rounding (per line, then summed); any
difference between ledgers would be reported with the deal and the amounts.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.schema import Pipeline
from connectors.registry import connector_class
from connectors.sandboxkit import serve
from connectors.seedbook import PRODUCTS, generate_book
from sync.engine import PipelineRunner
from sync.runtime import effective_pipeline
from sync.sandboxes import (
    CRM_SANDBOXES,
    LEDGER_SANDBOXES,
    build_sandbox,
    crm_sandbox_settings,
    ledger_sandbox_settings,
)
from sync.state import StateStore

SEED = 17
TAX_TYPES: dict[str, dict[str, str]] = {
    "xero": {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"},
    "quickbooks": {"20": "2", "10": "3", "5.5": "4", "2.1": "5"},
    "pennylane": {"20": "FR_200", "10": "FR_100", "5.5": "FR_55", "2.1": "FR_21"},
}
PIPELINE = Pipeline.model_validate({
    "crm": {"type": "any"}, "ledger": {"type": "any"},
    "items": {"on_unmapped": "fail", "map": {p.sku: {"item_code": p.sku, "account_code": "706"} for p in PRODUCTS}},
    "taxes": {"on_unmapped": "fail"},
    "page_size": 25,
})


def _sync(crm: str, ledger: str, tmp: Path) -> dict[str, tuple[str, Decimal, Decimal, Decimal, str]]:
    """Sync the book from ``crm`` into a fresh ``ledger``; per book deal id: currency, subtotal, tax, total
    and the ledger's customer id."""
    book = generate_book(SEED, companies=20, deals=50)
    crm_sb: Any = build_sandbox(crm, seed=SEED, deals=0)
    crm_sb.load_book(book)
    ledger_sb: Any = build_sandbox(ledger, seed=SEED, deals=0)
    crm_server, ledger_server = serve(crm_sb), serve(ledger_sb)
    store = StateStore.open(f"sqlite:///{tmp / f'{crm}-{ledger}.db'}")
    try:
        tokens = store.token_store()
        refresh = httpx.post(ledger_server.url + "/_sandbox/authorize", timeout=30).json().get("refresh_token")
        ledger_block = {**ledger_sandbox_settings(ledger, ledger_server.url, refresh_token=refresh),
                        "tax_types": TAX_TYPES[ledger]}
        ledger_cls = connector_class("ledger", ledger)
        settings = ledger_cls.Settings.model_validate(ledger_block)
        source = connector_class("crm", crm).from_config(crm_sandbox_settings(crm, crm_server.url), tokens)
        sink = ledger_cls.from_config(ledger_block, tokens)
        try:
            result = PipelineRunner("main", effective_pipeline(PIPELINE, settings), source, sink, store).run()
        finally:
            source.close()
            sink.close()
        assert result.status == "ok", (crm, ledger, result.error)
        book_id_of = {str(v): k for k, v in crm_sb.deal_ids_by_book_id().items()}
        invoices = httpx.get(ledger_server.url + "/_sandbox/invoices", timeout=30).json()
        out: dict[str, tuple[str, Decimal, Decimal, Decimal, str]] = {}
        for inv in invoices:
            assert inv["Status"] not in ("DELETED", "VOIDED")
            book_id = book_id_of[inv["Reference"].removeprefix("LB-main:")]
            assert book_id not in out, f"two invoices for {book_id} in {ledger}"
            out[book_id] = (inv["CurrencyCode"], Decimal(str(inv["SubTotal"])), Decimal(str(inv["TotalTax"])),
                            Decimal(str(inv["Total"])), str(inv["ContactID"]))
        won = {d.id: d for d in book.deals if d.is_won}
        assert set(out) == set(won), (crm, ledger)
        for book_id, (_cur, subtotal, _tax, _total, _customer) in out.items():
            assert subtotal == won[book_id].amount, (crm, ledger, book_id)
        return out
    finally:
        store.close()
        crm_server.stop()
        ledger_server.stop()


@pytest.mark.parametrize("crm", CRM_SANDBOXES)
def test_every_ledger_agrees_on_every_invoice(crm: str, tmp_path: Path) -> None:
    """From one CRM, the three ledgers agree deal by deal on currency, subtotal, tax and total, and group
    the deals into the same customers."""
    results = {ledger: _sync(crm, ledger, tmp_path) for ledger in LEDGER_SANDBOXES}
    reference = results["xero"]
    differences = []

    def customers(invoices: dict[str, tuple[str, Decimal, Decimal, Decimal, str]]) -> set[frozenset[str]]:
        groups: dict[str, set[str]] = {}
        for book_id, row in invoices.items():
            groups.setdefault(row[4], set()).add(book_id)
        return {frozenset(g) for g in groups.values()}

    for ledger, invoices in results.items():
        assert customers(invoices) == customers(reference), ledger
        for book_id, (currency, subtotal, tax, total, _customer) in invoices.items():
            ref_currency, ref_subtotal, ref_tax, ref_total, _ref_customer = reference[book_id]
            assert (currency, subtotal) == (ref_currency, ref_subtotal), (ledger, book_id)
            if (tax, total) != (ref_tax, ref_total):
                differences.append((ledger, book_id, tax - ref_tax, total - ref_total))
    # Every ledger rounds tax per line then sums, so no rounding difference is expected; any would be listed.
    assert differences == []

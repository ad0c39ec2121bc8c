"""The same book in HubSpot, Salesforce or Pipedrive gives the same invoices in Xero.

One pipeline config; only its ``crm:`` block changes. For each CRM, a fresh Xero organisation receives
the sync, and the invoices are compared deal by deal (through the book's own deal ids): customer, lines,
tax types, accounts, totals, dates, status, and the reference scheme.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from config.schema import Pipeline
from connectors.hubspot.adapter import HubSpotSource
from connectors.pipedrive.adapter import PipedriveSource
from connectors.salesforce.adapter import SalesforceSource
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import PRODUCTS, generate_book
from connectors.xero.adapter import XeroLedger
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_TENANT_ID, XeroSandbox
from sync.engine import PipelineRunner
from sync.sandboxes import CRM_SANDBOXES, build_sandbox, crm_sandbox_settings
from sync.state import StateStore

SEED = 42
SOURCES: dict[str, Any] = {"hubspot": HubSpotSource, "salesforce": SalesforceSource, "pipedrive": PipedriveSource}
PIPELINE = Pipeline.model_validate({
    "crm": {"type": "any"}, "ledger": {"type": "xero"},
    "items": {"on_unmapped": "fail", "map": {p.sku: {"item_code": p.sku, "account_code": "706"} for p in PRODUCTS}},
    "taxes": {"on_unmapped": "fail", "map": {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}},
    "page_size": 25,
})


def _sync(crm: str, tmp: Path) -> tuple[dict[str, dict[str, Any]], Any]:
    """Run the pipeline from ``crm`` into a fresh Xero; return Xero's invoices keyed by book deal id."""
    book = generate_book(SEED, companies=40, deals=120)
    crm_sandbox: Any = build_sandbox(crm, seed=SEED, deals=0)
    crm_sandbox.load_book(book)
    xero = XeroSandbox(seed=SEED)
    servers: list[SandboxServer] = [serve(crm_sandbox), serve(xero)]
    store = StateStore.open(f"sqlite:///{tmp / f'{crm}.db'}")
    try:
        tokens = store.token_store()
        source = SOURCES[crm].from_config(crm_sandbox_settings(crm, servers[0].url), tokens)
        ledger = XeroLedger.from_config(
            {"type": "xero", "base_url": servers[1].url, "token_url": servers[1].url + "/connect/token",
             "tenant_id": DEMO_TENANT_ID, "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET,
             "refresh_token": xero.issue_tokens()["refresh_token"], "calls_per_minute": 10_000}, tokens)
        try:
            result = PipelineRunner("main", PIPELINE, source, ledger, store).run()
        finally:
            source.close()
            ledger.close()
        assert result.status == "ok", result.error
        book_id_of = {str(v): k for k, v in crm_sandbox.deal_ids_by_book_id().items()}
        contacts = {c["ContactID"]: c for c in xero.contacts()}
        out: dict[str, dict[str, Any]] = {}
        for inv in xero.invoices():
            ref = inv["Reference"]
            assert ref.startswith("LB-main:")
            crm_id = ref.removeprefix("LB-main:")
            contact = contacts[inv["ContactID"]]
            out[book_id_of[crm_id]] = {
                "customer": (contact["Name"], contact.get("TaxNumber") or None),
                "currency": inv["CurrencyCode"], "status": inv["Status"],
                "date": inv["Date"], "due": inv["DueDate"],
                "lines": [(ln.get("Description"), Decimal(str(ln["Quantity"])), Decimal(str(ln["UnitAmount"])),
                           Decimal(str(ln.get("DiscountRate") or 0)), ln.get("ItemCode"), ln.get("AccountCode"),
                           ln.get("TaxType"), Decimal(str(ln["LineAmount"])), Decimal(str(ln["TaxAmount"])))
                          for ln in inv["LineItems"]],
                "totals": (Decimal(str(inv["SubTotal"])), Decimal(str(inv["TotalTax"])), Decimal(str(inv["Total"]))),
            }
        return out, book
    finally:
        store.close()
        for s in servers:
            s.stop()


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, dict[str, Any]], Any]]:
    tmp = tmp_path_factory.mktemp("equivalence")
    return {crm: _sync(crm, tmp) for crm in CRM_SANDBOXES}


def test_every_crm_invoices_every_won_deal_of_the_book(synced: dict[str, Any]) -> None:
    """Each CRM's sync invoices exactly the book's won deals, each for its amount."""
    for crm, (invoices, book) in synced.items():
        won = {d.id: d for d in book.deals if d.is_won}
        assert set(invoices) == set(won), crm
        for book_id, inv in invoices.items():
            assert inv["totals"][0] == won[book_id].amount, (crm, book_id)


@pytest.mark.parametrize("crm", [c for c in CRM_SANDBOXES if c != "hubspot"])
def test_same_invoices_as_from_hubspot(synced: dict[str, Any], crm: str) -> None:
    """Customers, lines, taxes, accounts, totals, dates and status agree with the HubSpot-fed sync."""
    reference, _ = synced["hubspot"]
    other, _ = synced[crm]
    assert set(other) == set(reference)
    for book_id in sorted(reference):
        assert other[book_id] == reference[book_id], (crm, book_id)

"""The sync engine against HubSpot and Xero sandboxes on sockets, with its state in a SQLite store."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.schema import Pipeline
from connectors.domain import Customer, round_money
from connectors.hubspot.adapter import HubSpotSource
from connectors.hubspot.sandbox import _BOOK_STAGE, HubSpotSandbox
from connectors.sandboxkit import FaultPlan, SandboxServer, serve
from connectors.seedbook import PRODUCTS, Book, BookDeal, effective_lines, generate_book
from connectors.xero.adapter import XeroLedger
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_TENANT_ID, XeroSandbox
from connectors.xero.settings import XeroSettings
from connectors.xero.testing import MemoryTokenStore
from sync.engine import STREAM, PipelineRunner, RunResult, prefetch
from sync.reconcile import intent_key
from sync.state import StateStore

SEED = 5
PIPELINE = "main"
HS_TOKEN = "demo-hubspot-token"
TAXES = {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}
GOODS = ("HW-", "CAT-LUNCH", "BOOK-", "PRESS-")


def account_for(sku: str) -> str:
    """Revenue account of a SKU: 707 for goods, 706 for services."""
    return "707" if sku.startswith(GOODS) else "706"


ITEMS: dict[str, dict[str, str]] = {p.sku: {"item_code": p.sku, "account_code": account_for(p.sku)} for p in PRODUCTS}


def make_pipeline(
    *,
    items: dict[str, dict[str, str]] | None = None,
    taxes: dict[str, str] | None = None,
    customers: dict[str, Any] | None = None,
    invoice: dict[str, Any] | None = None,
) -> Pipeline:
    return Pipeline.model_validate({
        "crm": {"type": "hubspot"},
        "ledger": {"type": "xero"},
        "items": {"on_unmapped": "fail", "map": ITEMS if items is None else items},
        "taxes": {"on_unmapped": "fail", "map": TAXES if taxes is None else taxes},
        "customers": customers or {},
        "invoice": invoice or {},
    })


@dataclass
class Sync:
    """Both sandboxes, their servers, the generated book and a state store; builds runners on demand."""

    hs: HubSpotSandbox
    xero: XeroSandbox
    hs_server: SandboxServer
    xero_server: SandboxServer
    book: Book
    tmp: Path
    store: StateStore
    closers: list[Callable[[], None]] = field(default_factory=list)

    # -- building ---------------------------------------------------------------------------------
    def ledger_settings(self, refresh_token: str | None = None) -> dict[str, Any]:
        url = self.xero_server.url
        return {"type": "xero", "base_url": url, "token_url": f"{url}/connect/token", "tenant_id": DEMO_TENANT_ID,
                "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET, "calls_per_minute": 10_000,
                "refresh_token": refresh_token or self.xero.issue_tokens()["refresh_token"]}

    def runner(self, pipeline: Pipeline | None = None, *, store: StateStore | None = None,
               ledger: XeroLedger | None = None, refresh_token: str | None = None) -> PipelineRunner:
        store = store or self.store
        tokens = store.token_store()
        crm = HubSpotSource.from_config({"type": "hubspot", "base_url": self.hs_server.url, "access_token": HS_TOKEN,
                                         "requests_per_10s": 10_000, "searches_per_s": 1_000}, tokens)
        if ledger is None:
            ledger = XeroLedger.from_config(self.ledger_settings(refresh_token), tokens)
        self.closers += [crm.close, ledger.close]
        return PipelineRunner(PIPELINE, pipeline or make_pipeline(), crm, ledger, store)

    def run(self, pipeline: Pipeline | None = None, **kw: Any) -> RunResult:
        return self.runner(pipeline, **kw).run()

    # -- looking things up ------------------------------------------------------------------------
    def hs_id(self, deal: BookDeal) -> str:
        return self.hs.deal_ids_by_book_id()[deal.id]

    def reference(self, deal: BookDeal) -> str:
        return f"LB-{PIPELINE}:{self.hs_id(deal)}"

    def invoice_of(self, deal: BookDeal) -> dict[str, Any] | None:
        return self.xero.invoice_by_reference(self.reference(deal))

    @property
    def won(self) -> list[BookDeal]:
        return [d for d in self.book.deals if d.is_won]

    def live_invoices(self) -> list[dict[str, Any]]:
        return [i for i in self.xero.invoices() if i["Status"] not in ("DELETED", "VOIDED")]

    def assert_exactly_once(self, deals: list[BookDeal] | None = None) -> None:
        """The ledger holds one live invoice per given won deal (all of them by default), and nothing else."""
        deals = self.won if deals is None else deals
        refs = [i["Reference"] for i in self.live_invoices()]
        assert sorted(refs) == sorted(self.reference(d) for d in deals)

    def company_hs_id(self, deal: BookDeal) -> str:
        return self.hs.company_ids_by_book_id()[deal.company_id]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[SandboxServer, SandboxServer]]:
    """One HubSpot and one Xero socket for the module; each test puts its own fresh sandboxes behind them."""
    hs_server, xero_server = serve(HubSpotSandbox()), serve(XeroSandbox())
    try:
        yield hs_server, xero_server
    finally:
        hs_server.stop()
        xero_server.stop()


@pytest.fixture
def sync(tmp_path: Path, servers: tuple[SandboxServer, SandboxServer]) -> Iterator[Sync]:
    book = generate_book(SEED, companies=15, deals=30)
    hs = HubSpotSandbox(seed=SEED, requests_per_10s=10_000, searches_per_s=1_000)
    hs.load_book(book)
    xero = XeroSandbox(seed=SEED, calls_per_minute=10_000)
    hs_server, xero_server = servers
    hs_server.app, xero_server.app = hs, xero
    store = StateStore.open(f"sqlite:///{tmp_path}/s.db")
    env = Sync(hs, xero, hs_server, xero_server, book, tmp_path, store)
    try:
        yield env
    finally:
        for close in env.closers:
            close()
        env.store.close()


def _won_with(sync: Sync, pred: Callable[[BookDeal], bool]) -> BookDeal:
    found = [d for d in sync.won if pred(d)]
    assert found, "the seeded book has no such deal"
    return found[0]


def _sku_users(sync: Sync) -> dict[str, set[str]]:
    """SKU -> book ids of the won deals invoicing it."""
    skus: dict[str, set[str]] = {}
    for d in sync.won:
        for ln in effective_lines(d):
            skus.setdefault(ln.sku, set()).add(d.id)
    return skus


def _plain_deal(sync: Sync) -> BookDeal:
    """A won EUR deal invoiced from its own lines, whose company has no other won deal."""
    per_company: dict[str, int] = {}
    for d in sync.won:
        per_company[d.company_id] = per_company.get(d.company_id, 0) + 1
    return _won_with(sync, lambda d: d.currency == "EUR" and per_company[d.company_id] == 1
                     and (d.quote is None or d.quote.status != "accepted"))


# ------------------------------------------------------------------------------------------------
# creating invoices
# ------------------------------------------------------------------------------------------------
def test_run_creates_one_invoice_per_won_deal_with_mapped_lines(sync: Sync) -> None:
    """Each won deal gets one invoice: lines, items, accounts, tax types, currency, reference, per-line tax."""
    res = sync.run()
    assert (res.status, res.exit_code, res.error) == ("ok", 0, None)
    assert res.counts["created"] == len(sync.won) == res.counts["won"]
    assert res.counts["pulled"] == len(sync.book.deals)
    sync.assert_exactly_once()
    for deal in sync.won:
        inv = sync.invoice_of(deal)
        assert inv is not None
        assert inv["Type"] == "ACCREC"
        assert inv["Status"] == "AUTHORISED"
        assert inv["CurrencyCode"] == deal.currency
        assert inv["SubTotal"] == deal.amount
        assert inv["Date"] == deal.close_date
        lines = effective_lines(deal)
        assert len(inv["LineItems"]) == len(lines)
        for got, want in zip(inv["LineItems"], lines, strict=True):
            assert got["ItemCode"] == want.sku
            assert got["AccountCode"] == account_for(want.sku)
            assert got["TaxType"] == TAXES[str(want.tax_rate)]
            assert got["Quantity"] == want.quantity
            assert got["UnitAmount"] == want.unit_price
            assert Decimal(got.get("DiscountRate") or 0) == want.discount_percent
            net = round_money(want.quantity * want.unit_price * (100 - want.discount_percent) / 100, deal.currency)
            assert got["LineAmount"] == net
            assert got["TaxAmount"] == round_money(net * want.tax_rate / 100, deal.currency)
        assert inv["TotalTax"] == sum(ln["TaxAmount"] for ln in inv["LineItems"])
        assert inv["Total"] == inv["SubTotal"] + inv["TotalTax"]
    # The state store links every won deal to its invoice, by the same reference.
    links = sync.store.links(PIPELINE, "deal")
    assert {k: v.reference for k, v in links.items()} == {sync.hs_id(d): sync.reference(d) for d in sync.won}
    assert {v.ledger_id for v in links.values()} == {i["InvoiceID"] for i in sync.live_invoices()}
    assert sync.store.open_intents(PIPELINE, "invoice") == []
    assert sync.store.open_flags(PIPELINE) == {}
    cursor = sync.store.get_cursor(PIPELINE, STREAM)
    assert cursor is not None


def test_second_run_creates_nothing_and_reads_nothing_past_the_cursor(sync: Sync) -> None:
    """A second run pulls no deal (the cursor covers them all), creates nothing, leaves the cursor alone."""
    first = sync.run()
    assert first.status == "ok"
    cursor = sync.store.get_cursor(PIPELINE, STREAM)
    contacts = len(sync.xero.contacts())
    runner = sync.runner()
    again = runner.run()
    assert (again.status, again.exit_code) == ("ok", 0)
    assert again.counts["created"] == 0
    assert again.counts["pulled"] == 0
    assert again.counts["customers_created"] == 0
    # One search that finds nothing after the cursor, and one look at the deals archived since it.
    assert again.api_calls["hubspot"] <= 2
    sync.assert_exactly_once()
    assert len(sync.xero.contacts()) == contacts
    assert sync.store.get_cursor(PIPELINE, STREAM) == cursor
    # The same runner run again reports that run's calls only.
    third = runner.run()
    assert third.counts["pulled"] == 0
    assert third.api_calls["hubspot"] <= 2


def test_a_stop_request_ends_the_run_after_the_page_in_flight_and_the_next_run_goes_on(sync: Sync) -> None:
    """Asked to stop (a shutdown), the run records the page it is on, moves the cursor past it and ends partial;
    the next run reads only the rest and every won deal ends with one invoice."""
    pipeline = make_pipeline().model_copy(update={"page_size": 10})
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True

    runner = sync.runner(pipeline)
    runner.stop = stop
    first = runner.run()
    assert first.status == "partial"
    assert "stopped for shutdown after 1 page" in (first.error or "")
    assert len(asked) == 1
    assert 0 < first.counts["pulled"] <= 10 < len(sync.book.deals)  # one page of ten deals at most
    cursor = sync.store.get_cursor(PIPELINE, STREAM)
    assert cursor is not None  # the first page is durably done
    done = {sync.hs.deal_ids_by_book_id()[d.id] for d in sync.won} & set(sync.store.links(PIPELINE, "deal"))
    assert first.counts["created"] > 0
    assert len(done) == first.counts["created"]
    assert len(sync.live_invoices()) == first.counts["created"]

    rest = sync.run(pipeline)
    assert (rest.status, rest.error) == ("ok", None)
    assert first.counts["pulled"] + rest.counts["pulled"] == len(sync.book.deals)  # nothing read twice
    assert first.counts["created"] + rest.counts["created"] == len(sync.won)
    sync.assert_exactly_once()


def test_lines_come_from_the_accepted_quote(sync: Sync) -> None:
    """A deal whose customer accepted a quote is invoiced with the quote's lines, not the deal's own."""
    deal = _won_with(sync, lambda d: d.quote is not None and d.quote.status == "accepted" and d.quote.lines != d.lines)
    assert deal.quote is not None
    quote_id = sync.hs.quote_ids_by_book_id()[deal.quote.id]
    assert quote_id in sync.hs.associated_ids("deals", sync.hs_id(deal), "quotes")
    assert sync.hs.properties_of("quotes", quote_id)["hs_status"] in ("ACCEPTED", "APPROVAL_NOT_NEEDED")
    assert sync.run().status == "ok"
    inv = sync.invoice_of(deal)
    assert inv is not None
    got = [(ln["Description"], ln["Quantity"], ln["UnitAmount"]) for ln in inv["LineItems"]]
    assert got == [(ln.description, ln.quantity, ln.unit_price) for ln in deal.quote.lines]
    assert got != [(ln.description, ln.quantity, ln.unit_price) for ln in deal.lines]
    assert inv["SubTotal"] == deal.amount


# ------------------------------------------------------------------------------------------------
# flags that a fixed mapping or a fixed deal clears
# ------------------------------------------------------------------------------------------------
@dataclass
class FlagCase:
    reason: str
    broken: Pipeline
    fixed: Pipeline
    affected: list[BookDeal]
    words: list[str]  # besides the deal id, the flag detail names these
    repair: Callable[[], None] = lambda: None


def _case_unmapped_item(sync: Sync) -> FlagCase:
    skus = _sku_users(sync)
    sku = next(s for s, ids in sorted(skus.items()) if len(ids) == 1)
    affected = [d for d in sync.won if d.id in skus[sku]]
    items = {k: v for k, v in ITEMS.items() if k != sku}
    return FlagCase("unmapped_item", make_pipeline(items=items), make_pipeline(), affected, [sku])


def _case_unmapped_tax(sync: Sync) -> FlagCase:
    users = {r: [d for d in sync.won if any(str(ln.tax_rate) == r for ln in effective_lines(d))] for r in TAXES}
    rate = min((r for r in users if users[r]), key=lambda r: len(users[r]))
    taxes = {k: v for k, v in TAXES.items() if k != rate}
    return FlagCase("unmapped_tax", make_pipeline(taxes=taxes), make_pipeline(), users[rate], [f"{rate} %"])


def _case_currency(sync: Sync) -> FlagCase:
    affected = [d for d in sync.won if d.currency == "USD"]
    assert affected
    return FlagCase("currency_not_allowed", make_pipeline(invoice={"currencies": ["EUR"]}),
                    make_pipeline(invoice={"currencies": ["EUR", "USD"]}), affected, ["USD"])


def _case_no_customer(sync: Sync) -> FlagCase:
    deal = _plain_deal(sync)
    sync.hs.archive_object("companies", sync.company_hs_id(deal))
    other = next(c for c in sync.book.companies if c.id != deal.company_id)
    other_id = sync.hs.company_ids_by_book_id()[other.id]

    def repair() -> None:
        # Someone associates the deal with a live company (through the API, which stamps the deal).
        resp = httpx.put(f"{sync.hs_server.url}/crm/v4/objects/deals/{sync.hs_id(deal)}/associations/default/"
                         f"companies/{other_id}", headers={"Authorization": f"Bearer {HS_TOKEN}"}, timeout=10)
        assert resp.status_code == 200, resp.text

    return FlagCase("no_customer", make_pipeline(), make_pipeline(), [deal], ["company"], repair)


def _case_amount_mismatch(sync: Sync) -> FlagCase:
    deal = _plain_deal(sync)
    sync.hs.modify_deal(sync.hs_id(deal), amount=str(deal.amount + 10))

    def repair() -> None:
        sync.hs.modify_deal(sync.hs_id(deal), amount=str(deal.amount))

    return FlagCase("amount_mismatch", make_pipeline(), make_pipeline(), [deal], [str(deal.amount + 10)], repair)


@pytest.mark.parametrize("make_case", [_case_unmapped_item, _case_unmapped_tax, _case_currency, _case_no_customer,
                                       _case_amount_mismatch],
                         ids=["unmapped_item", "unmapped_tax", "currency", "no_customer", "amount_mismatch"])
def test_flagged_deal_is_not_invoiced_then_invoiced_once_fixed(sync: Sync,
                                                               make_case: Callable[[Sync], FlagCase]) -> None:
    """A deal that cannot be invoiced is flagged with its reason; once fixed, the next run invoices it."""
    case = make_case(sync)
    affected_ids = {sync.hs_id(d) for d in case.affected}
    first = sync.run(case.broken)
    assert (first.status, first.exit_code) == ("partial", 1)
    assert first.counts["flagged"] == len(case.affected)
    flags = sync.store.open_flags(PIPELINE)
    assert set(flags) == affected_ids
    for deal_id, flag in flags.items():
        assert flag.reason == case.reason
        assert deal_id in flag.detail
        for word in case.words:
            assert word in flag.detail
    others = [d for d in sync.won if sync.hs_id(d) not in affected_ids]
    sync.assert_exactly_once(others)
    assert not sync.store.links(PIPELINE, "deal", affected_ids)
    # The cursor moved past the flagged deals: they are durably recorded as flags.
    assert sync.store.get_cursor(PIPELINE, STREAM) is not None

    case.repair()
    second = sync.run(case.fixed)
    assert (second.status, second.exit_code, second.error) == ("ok", 0, None)
    assert second.counts["created"] == len(case.affected)
    assert second.counts["flagged"] == 0
    # A repaired deal comes both as a re-check and as a changed deal: it is handled once.
    assert second.counts["already_invoiced"] == 0
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()
    third = sync.run(case.fixed)
    assert (third.status, third.counts["created"], third.counts["pulled"]) == ("ok", 0, 0)


def test_unmapped_sku_with_skip_policy_invoices_the_line_without_item(sync: Sync) -> None:
    """items.on_unmapped=skip puts an unmapped SKU's line on a draft invoice with no item instead of flagging."""
    sku, ids = next((s, ids) for s, ids in sorted(_sku_users(sync).items()) if len(ids) == 1)
    deal = next(d for d in sync.won if d.id in ids)
    pipeline = Pipeline.model_validate({
        **make_pipeline(invoice={"status": "draft"}).model_dump(),
        "items": {"on_unmapped": "skip", "map": {k: v for k, v in ITEMS.items() if k != sku}},
    })
    res = sync.run(pipeline)
    assert (res.status, res.counts["created"]) == ("ok", len(sync.won))
    inv = sync.invoice_of(deal)
    assert inv is not None
    assert inv["Status"] == "DRAFT"
    description = next(x.description for x in effective_lines(deal) if x.sku == sku)
    line = next(ln for ln in inv["LineItems"] if ln["Description"] == description)
    assert not line.get("ItemCode")
    assert not line.get("AccountCode")
    assert inv["SubTotal"] == deal.amount


# ------------------------------------------------------------------------------------------------
# changes after invoicing
# ------------------------------------------------------------------------------------------------
def _change_a_line(sync: Sync, deal: BookDeal) -> None:
    """A salesperson renames a line of an invoiced deal (the deal is stamped as modified)."""
    line_id = sync.hs.associated_ids("deals", sync.hs_id(deal), "line_items")[0]
    sync.hs.modify("line_items", line_id, name="Prestation renommée après facturation")
    sync.hs.touch("deals", [sync.hs_id(deal)])


def test_line_changed_after_invoicing_is_flagged_not_invoiced_again(sync: Sync) -> None:
    """A changed line on an invoiced deal raises changed_after_invoice and creates no second invoice."""
    assert sync.run().status == "ok"
    deal = _plain_deal(sync)
    _change_a_line(sync, deal)
    res = sync.run()
    assert (res.status, res.exit_code) == ("partial", 1)
    assert res.counts["created"] == 0
    flags = sync.store.open_flags(PIPELINE)
    assert set(flags) == {sync.hs_id(deal)}
    assert flags[sync.hs_id(deal)].reason == "changed_after_invoice"
    sync.assert_exactly_once()


def test_amount_changed_after_invoicing_is_flagged(sync: Sync) -> None:
    """A new amount on an invoiced deal (lines untouched) raises changed_after_invoice, no second invoice."""
    assert sync.run().status == "ok"
    deal = _plain_deal(sync)
    sync.hs.modify_deal(sync.hs_id(deal), amount=str(deal.amount * 2))
    res = sync.run()
    assert (res.status, res.exit_code) == ("partial", 1)
    assert res.counts["created"] == 0
    flags = sync.store.open_flags(PIPELINE)
    assert set(flags) == {sync.hs_id(deal)}
    assert flags[sync.hs_id(deal)].reason == "changed_after_invoice"
    assert str(deal.amount * 2) in flags[sync.hs_id(deal)].detail
    sync.assert_exactly_once()


def test_changes_after_invoicing_are_ignored_when_the_policy_says_so(sync: Sync) -> None:
    """With on_change_after_invoice=ignore, a changed line, amount or stage raises no flag and no invoice."""
    ignore = make_pipeline(invoice={"on_change_after_invoice": "ignore"})
    assert sync.run(ignore).status == "ok"
    deal = _plain_deal(sync)
    _change_a_line(sync, deal)
    sync.hs.modify_deal(sync.hs_id(deal), amount=str(deal.amount * 2))
    res = sync.run(ignore)
    assert (res.status, res.counts["created"], res.counts["already_invoiced"]) == ("ok", 0, 1)
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()


def test_deal_no_longer_won_after_invoicing_is_flagged(sync: Sync) -> None:
    """An invoiced deal moved to lost is flagged, not invoiced again; won again, the flag clears."""
    assert sync.run().status == "ok"
    deal = _plain_deal(sync)
    hs_id = sync.hs_id(deal)
    pipeline_id = sync.hs.properties_of("deals", hs_id)["pipeline"]
    sync.hs.modify_deal(hs_id, dealstage=_BOOK_STAGE[pipeline_id]["lost"])
    res = sync.run()
    assert (res.status, res.counts["created"]) == ("partial", 0)
    flag = sync.store.open_flags(PIPELINE)[hs_id]
    assert flag.reason == "changed_after_invoice"
    assert "no longer won" in flag.detail
    sync.assert_exactly_once()
    sync.hs.modify_deal(hs_id, dealstage=_BOOK_STAGE[pipeline_id]["won"])
    res = sync.run()
    assert (res.status, res.counts["created"]) == ("ok", 0)
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()


# ------------------------------------------------------------------------------------------------
# ledger rejections and unanswered writes
# ------------------------------------------------------------------------------------------------
def test_ledger_rejection_is_flagged_and_retried_with_a_new_key_after_the_fix(sync: Sync) -> None:
    """One invoice of a batch rejected by Xero is flagged with its message; after the fix a new key creates it."""
    sku, ids = next((s, ids) for s, ids in sorted(_sku_users(sync).items()) if len(ids) == 1)
    deal = next(d for d in sync.won if d.id in ids)
    hs_id = sync.hs_id(deal)
    bad = make_pipeline(items={**ITEMS, sku: {"item_code": sku, "account_code": "999"}})
    first = sync.run(bad)
    assert (first.status, first.exit_code) == ("partial", 1)
    assert (first.counts["failed"], first.counts["created"]) == (1, len(sync.won) - 1)
    others = [d for d in sync.won if d.id != deal.id]
    sync.assert_exactly_once(others)
    flags = sync.store.open_flags(PIPELINE)
    assert set(flags) == {hs_id}
    assert flags[hs_id].reason == "ledger_rejected"
    assert "999" in flags[hs_id].detail  # Xero's own message names the account code
    rejected = sync.store.intents_for(PIPELINE, "invoice", [hs_id])[hs_id]
    assert (rejected.state, rejected.revision) == ("failed", 1)

    # The same mapping again: rejected again, and still flagged (never silently dropped).
    again = sync.run(bad)
    assert (again.status, again.counts["failed"], again.counts["created"]) == ("partial", 1, 0)
    assert set(sync.store.open_flags(PIPELINE)) == {hs_id}

    fixed = sync.run()
    assert (fixed.status, fixed.counts["created"], fixed.counts["failed"]) == ("ok", 1, 0)
    done = sync.store.intents_for(PIPELINE, "invoice", [hs_id])[hs_id]
    assert done.state == "confirmed"
    assert done.revision > rejected.revision
    assert done.idempotency_key == intent_key(PIPELINE, "invoice", hs_id, done.revision)
    assert done.idempotency_key != rejected.idempotency_key
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()


def _fast_retry_ledger(sync: Sync) -> XeroLedger:
    """A Xero ledger whose retry back-off sleeps are cut short (the attempts themselves are all made)."""
    settings = XeroSettings.model_validate(sync.ledger_settings())
    return XeroLedger(settings, sync.store.token_store(), sleep=lambda s: time.sleep(min(s, 0.002)))


def test_unanswered_write_fails_the_run_then_is_adopted_by_reference(sync: Sync) -> None:
    """Invoices committed by Xero but unanswered fail the run; the next run adopts them, creating none twice."""
    assert sync.run().status == "ok"
    cursor = sync.store.get_cursor(PIPELINE, STREAM)
    linked = set(sync.store.links(PIPELINE, "customer"))
    company_ids = sync.hs.company_ids_by_book_id()
    newly_won = [d for d in sync.book.deals if not d.is_closed and company_ids[d.company_id] in linked][:3]
    assert newly_won
    for d in newly_won:
        pipeline_id = sync.hs.properties_of("deals", sync.hs_id(d))["pipeline"]
        sync.hs.modify_deal(sync.hs_id(d), dealstage=_BOOK_STAGE[pipeline_id]["won"])

    sync.xero.faults = FaultPlan("drop_after_commit=1.0", seed=1)
    failed = sync.run(ledger=_fast_retry_ledger(sync))
    sync.xero.faults = FaultPlan(None)
    assert (failed.status, failed.exit_code) == ("failed", 1)
    assert failed.error is not None
    assert "unanswered" in failed.error
    assert failed.counts["created"] == 0
    assert sync.store.get_cursor(PIPELINE, STREAM) == cursor
    # Xero did commit them, once each; the state store holds them as sent, not linked.
    sync.assert_exactly_once([*sync.won, *newly_won])
    pending = {i.crm_id: i.state for i in sync.store.open_intents(PIPELINE, "invoice")}
    assert pending == {sync.hs_id(d): "sent" for d in newly_won}

    after = sync.run()
    assert (after.status, after.exit_code) == ("ok", 0)
    assert after.counts["adopted"] == len(newly_won)
    assert after.counts["created"] == 0
    assert sync.store.open_intents(PIPELINE, "invoice") == []
    assert set(sync.store.links(PIPELINE, "deal")) == {sync.hs_id(d) for d in [*sync.won, *newly_won]}
    assert sync.store.get_cursor(PIPELINE, STREAM) != cursor
    sync.assert_exactly_once([*sync.won, *newly_won])


def test_unanswered_first_write_is_resolved_on_the_next_run(sync: Sync) -> None:
    """With every write unanswered from the start, the run fails with no cursor; the next one ends exactly once."""
    sync.xero.faults = FaultPlan("drop_after_commit=1.0", seed=1)
    failed = sync.run(ledger=_fast_retry_ledger(sync))
    sync.xero.faults = FaultPlan(None)
    assert (failed.status, failed.exit_code) == ("failed", 1)
    assert sync.store.get_cursor(PIPELINE, STREAM) is None
    contacts = len(sync.xero.contacts())
    after = sync.run()
    assert (after.status, after.exit_code) == ("ok", 0)
    assert after.counts["customers_adopted"] == contacts
    assert len(sync.xero.contacts()) == contacts
    sync.assert_exactly_once()


# ------------------------------------------------------------------------------------------------
# customers
# ------------------------------------------------------------------------------------------------
def _admin_ledger(sync: Sync) -> XeroLedger:
    """Someone working in Xero directly (its own app connection)."""
    ledger = XeroLedger.from_config(sync.ledger_settings(), MemoryTokenStore())
    sync.closers.append(ledger.close)
    return ledger


def _company(sync: Sync, deal: BookDeal) -> Any:
    return next(c for c in sync.book.companies if c.id == deal.company_id)


def test_existing_contact_with_the_same_vat_number_is_used(sync: Sync) -> None:
    """A Xero contact with the company's VAT number (another name) gets the invoice; no duplicate contact."""
    deal = _won_with(sync, lambda d: _company(sync, d).vat_number is not None)
    company = _company(sync, deal)
    existing = _admin_ledger(sync).create_customers(
        [("ACCT-0042", Customer(crm_id="x", name="Compte historique", vat_number=company.vat_number))], "seed-vat")
    contact = existing["ACCT-0042"]
    res = sync.run()
    assert res.status == "ok"
    assert res.counts["customers_matched"] == 1
    inv = sync.invoice_of(deal)
    assert inv is not None
    assert inv["ContactID"] == contact.ledger_id
    with_vat = [c for c in sync.xero.contacts() if c.get("TaxNumber") == company.vat_number]
    assert [c["ContactID"] for c in with_vat] == [contact.ledger_id]
    link = sync.store.links(PIPELINE, "customer")[sync.company_hs_id(deal)]
    assert (link.ledger_id, link.fingerprint) == (contact.ledger_id, "vat_number")


def test_existing_contact_is_matched_by_name_when_nothing_else_matches(sync: Sync) -> None:
    """A Xero contact with only the company's name (no VAT, domain, e-mail) is matched by name."""
    deal = _plain_deal(sync)
    company = _company(sync, deal)
    contact = _admin_ledger(sync).create_customers(
        [("ACCT-7", Customer(crm_id="x", name=f"  {company.name.upper()} "))], "seed-name")["ACCT-7"]
    res = sync.run()
    assert res.status == "ok"
    inv = sync.invoice_of(deal)
    assert inv is not None
    assert inv["ContactID"] == contact.ledger_id
    assert sync.store.links(PIPELINE, "customer")[sync.company_hs_id(deal)].fingerprint == "name"
    assert sum(1 for c in sync.xero.contacts() if c["Name"].strip().casefold() == company.name.casefold()) == 1


def test_unmatched_customer_is_flagged_when_creating_customers_is_off(sync: Sync) -> None:
    """With create_missing false and no matching contact, every won deal is flagged customer_unmatched."""
    strict = make_pipeline(customers={"create_missing": False})
    plan = sync.runner(strict).plan()
    assert (plan.status, plan.counts["create"], plan.counts["flag"]) == ("partial", 0, len(sync.won))
    assert {p.reason for p in plan.plans if p.action == "flag"} == {"customer_unmatched"}
    res = sync.run(strict)
    assert (res.status, res.exit_code, res.counts["created"]) == ("partial", 1, 0)
    flags = sync.store.open_flags(PIPELINE)
    assert set(flags) == {sync.hs_id(d) for d in sync.won}
    assert {f.reason for f in flags.values()} == {"customer_unmatched"}
    assert sync.xero.contacts() == []
    assert sync.live_invoices() == []
    # With creation back on, the flagged deals are re-checked and invoiced.
    res = sync.run()
    assert (res.status, res.counts["created"]) == ("ok", len(sync.won))
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()


def test_customer_rejected_by_the_ledger_is_created_once_the_company_is_fixed(sync: Sync) -> None:
    """A contact Xero refuses flags the deal customer_unmatched; fixed in the CRM, a new key creates it."""
    deal = _plain_deal(sync)
    hs_id, company_id = sync.hs_id(deal), sync.company_hs_id(deal)
    stages = _BOOK_STAGE[sync.hs.properties_of("deals", hs_id)["pipeline"]]
    sync.hs.modify_deal(hs_id, dealstage=stages["negotiation"])
    assert sync.run().status == "ok"
    # The deal is won for a company whose currency the Xero organisation has not enabled.
    sync.hs.modify("companies", company_id, billing_currency="GBP")
    sync.hs.modify_deal(hs_id, dealstage=stages["won"])
    first = sync.run()
    assert (first.status, first.exit_code) == ("partial", 1)
    flag = sync.store.open_flags(PIPELINE)[hs_id]
    assert flag.reason == "customer_unmatched"
    assert company_id in flag.detail
    sync.assert_exactly_once([d for d in sync.won if d.id != deal.id])
    rejected = sync.store.intents_for(PIPELINE, "customer", [company_id])[company_id]
    assert rejected.state == "failed"

    sync.hs.modify("companies", company_id, billing_currency="EUR")
    second = sync.run()
    assert (second.status, second.counts["created"], second.counts["customers_created"]) == ("ok", 1, 1)
    done = sync.store.intents_for(PIPELINE, "customer", [company_id])[company_id]
    assert done.state == "confirmed"
    assert done.idempotency_key != rejected.idempotency_key
    assert sync.store.open_flags(PIPELINE) == {}
    sync.assert_exactly_once()


# ------------------------------------------------------------------------------------------------
# a lost state database
# ------------------------------------------------------------------------------------------------
def test_lost_state_database_adopts_every_invoice_and_creates_none(sync: Sync) -> None:
    """After the state DB is deleted, a run with a new DB and a new consent adopts all invoices by reference."""
    assert sync.run().status == "ok"
    contacts = len(sync.xero.contacts())
    sync.store.close()
    for f in sync.tmp.iterdir():
        if f.name.startswith("s.db"):
            f.unlink()
    sync.store = StateStore.open(f"sqlite:///{sync.tmp}/s.db")
    # The rotated refresh token lived in the lost database: someone authorises the app again.
    runner = sync.runner(refresh_token=sync.xero.issue_tokens()["refresh_token"])
    # The plan agrees with the run: nothing to create, every invoice found by its reference.
    plan = runner.plan()
    assert (plan.status, plan.counts["create"], plan.counts["already_invoiced"]) == ("ok", 0, len(sync.won))
    assert all("found in the ledger by reference" in p.detail for p in plan.plans if p.action == "already_invoiced")
    assert sync.store.links(PIPELINE, "deal") == {}
    res = runner.run()
    assert (res.status, res.exit_code) == ("ok", 0)
    assert res.counts["adopted"] == len(sync.won)
    assert res.counts["created"] == 0
    assert res.counts["already_invoiced"] == len(sync.won)
    assert len(sync.xero.contacts()) == contacts
    sync.assert_exactly_once()
    assert set(sync.store.links(PIPELINE, "deal")) == {sync.hs_id(d) for d in sync.won}


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------
def test_plan_writes_nothing_and_explains_its_decisions(sync: Sync) -> None:
    """plan() lists creates and flags with reasons, and writes no intent, link, cursor, run or invoice."""
    usd = [sync.hs_id(d) for d in sync.won if d.currency == "USD"]
    assert usd
    pipeline = make_pipeline(invoice={"currencies": ["EUR"]})
    res = sync.runner(pipeline).plan()
    assert (res.status, res.exit_code, res.run_id) == ("partial", 1, None)
    by_deal = {p.deal_id: p for p in res.plans}
    assert len(by_deal) == len(res.plans) == len(sync.book.deals)
    creates = {d for d, p in by_deal.items() if p.action == "create"}
    assert creates == {sync.hs_id(d) for d in sync.won} - set(usd)
    assert all(by_deal[d].detail == "customer will be created" for d in creates)
    assert all(by_deal[d].invoice is not None for d in creates)
    flagged = {d: p for d, p in by_deal.items() if p.action == "flag"}
    assert set(flagged) == set(usd)
    assert {p.reason for p in flagged.values()} == {"currency_not_allowed"}
    assert res.counts["create"] == len(creates)
    assert res.counts["flag"] == len(usd)
    assert {p.reason for p in by_deal.values() if p.action == "skip"} == {"not_won"}
    # Nothing was written anywhere.
    assert sync.store.get_cursor(PIPELINE, STREAM) is None
    assert sync.store.links(PIPELINE, "deal") == {}
    assert sync.store.links(PIPELINE, "customer") == {}
    assert sync.store.intents_for(PIPELINE, "invoice", [p.deal_id for p in res.plans]) == {}
    assert sync.store.open_flags(PIPELINE) == {}
    assert sync.store.recent_runs(10, PIPELINE) == []
    assert sync.xero.invoices() == []
    assert sync.xero.contacts() == []


def test_plan_after_a_run_shows_what_changed_and_writes_nothing(sync: Sync) -> None:
    """After a run, plan() shows a newly won deal as a create on a matched customer and a flag still open."""
    pipeline = make_pipeline(invoice={"currencies": ["EUR"]})
    assert sync.run(pipeline).status == "partial"
    cursor = sync.store.get_cursor(PIPELINE, STREAM)
    invoices = len(sync.xero.invoices())
    linked = set(sync.store.links(PIPELINE, "customer"))
    company_ids = sync.hs.company_ids_by_book_id()
    deal = next(d for d in sync.book.deals if not d.is_closed and company_ids[d.company_id] in linked
                and d.currency == "EUR")
    pipeline_id = sync.hs.properties_of("deals", sync.hs_id(deal))["pipeline"]
    sync.hs.modify_deal(sync.hs_id(deal), dealstage=_BOOK_STAGE[pipeline_id]["won"])
    res = sync.runner(pipeline).plan()
    creates = [p for p in res.plans if p.action == "create"]
    assert [p.deal_id for p in creates] == [sync.hs_id(deal)]
    assert creates[0].detail == "customer matched by link"
    flags = {p.deal_id: p.reason for p in res.plans if p.action == "flag"}
    assert flags == {sync.hs_id(d): "currency_not_allowed" for d in sync.won if d.currency == "USD"}
    assert sync.store.get_cursor(PIPELINE, STREAM) == cursor
    assert len(sync.xero.invoices()) == invoices
    assert sync.store.intents_for(PIPELINE, "invoice", [sync.hs_id(deal)]) == {}


def test_plan_lists_a_rechecked_deal_once(sync: Sync) -> None:
    """A flagged deal that was since repaired (re-checked and changed) is planned once, as a create."""
    deal = _plain_deal(sync)
    hs_id = sync.hs_id(deal)
    sync.hs.modify_deal(hs_id, amount=str(deal.amount + 1))
    assert sync.run().status == "partial"
    sync.hs.modify_deal(hs_id, amount=str(deal.amount))
    res = sync.runner().plan()
    assert [(p.deal_id, p.action) for p in res.plans] == [(hs_id, "create")]
    assert dict(res.counts) == {"create": 1}
    assert (res.status, res.exit_code) == ("ok", 0)


def test_an_invoiced_deal_deleted_in_hubspot_is_flagged_not_forgotten(sync: Sync) -> None:
    """Deleting (archiving) an invoiced deal in the CRM flags it on the next run; nothing is invoiced again."""
    first = sync.runner().run()
    assert first.status == "ok"
    won = [d for d in sync.hs.deals_snapshot() if d.get("hs_is_closed_won") == "true"]
    victim = won[0]["id"]
    before = len(sync.xero.invoices())
    sync.hs.archive_object("deals", victim)
    again = sync.runner().run()
    assert again.status == "partial"
    flags = sync.store.open_flags(PIPELINE)
    assert flags[victim].reason == "changed_after_invoice"
    assert "deleted in the CRM" in flags[victim].detail
    assert len(sync.xero.invoices()) == before


# ------------------------------------------------------------------------------------------------
# prefetching pages
# ------------------------------------------------------------------------------------------------
def test_prefetch_yields_in_order_and_reraises_the_producer_error() -> None:
    def source() -> Iterator[int]:
        yield from range(5)
        raise ValueError("page 6 failed")

    got: list[int] = []
    with pytest.raises(ValueError, match="page 6 failed"):
        got.extend(prefetch(source(), depth=2))
    assert got == [0, 1, 2, 3, 4]


def test_a_consumer_that_stops_early_is_not_held_by_a_producer_with_a_full_queue() -> None:
    """The producer has read everything and waits to hand over its end marker to a full queue: closing the
    consumer must release it at once, not after the join timeout."""
    gen = prefetch(iter([1, 2]), depth=1)
    assert next(gen) == 1
    time.sleep(0.3)  # the producer queues 2, then waits to queue the end marker
    started = time.monotonic()
    gen.close()
    assert time.monotonic() - started < 2

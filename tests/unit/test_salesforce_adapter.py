"""The Salesforce adapter against the sandbox on a real socket: incremental pulls, deletes, writes, auth and limits."""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from config.schema import Pipeline
from connectors.domain import Deal
from connectors.errors import (
    AuthError,
    ConfigError,
    ConnectorError,
    QuotaExhaustedError,
    ReauthorizationRequired,
    TransientError,
    VendorError,
)
from connectors.interfaces import Cursor, DealPage, FieldSpec, FieldUpdate, TokenStore
from connectors.registry import connector_class
from connectors.salesforce import SalesforceSettings, SalesforceSource
from connectors.salesforce.sandbox import (
    DEMO_CLIENT_ID,
    DEMO_PASSWORD,
    DEMO_REFRESH_TOKEN,
    DEMO_USERNAME,
    SalesforceSandbox,
    sandbox_settings,
)
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import PRODUCTS, Book, effective_lines, generate_book
from connectors.xero.adapter import XeroLedger
from connectors.xero.sandbox import DEMO_CLIENT_ID as XERO_CLIENT_ID
from connectors.xero.sandbox import DEMO_CLIENT_SECRET as XERO_CLIENT_SECRET
from connectors.xero.sandbox import DEMO_TENANT_ID, XeroSandbox
from sync.engine import PipelineRunner
from sync.state import StateStore

TOKEN_ENDPOINT = "POST /services/oauth2/token"
FAR = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


class MemoryTokens(TokenStore):
    """A token store in memory, as the state store would keep it (minus the encryption)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def load(self, connection: str) -> dict[str, Any] | None:
        return dict(self.data[connection]) if connection in self.data else None

    def save(self, connection: str, token: dict[str, Any]) -> None:
        self.data[connection] = dict(token)


def fast_sleep(seconds: float) -> None:
    time.sleep(min(seconds, 0.01))


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(21, companies=150, deals=400)


Env = tuple[SalesforceSandbox, SalesforceSource]


@pytest.fixture
def env(book: Book) -> Iterator[Callable[..., Env]]:
    """Builds a loaded sandbox served on 127.0.0.1 and an adapter pointed at it; all torn down after the test."""
    servers: list[SandboxServer] = []
    sources: list[SalesforceSource] = []
    urls: dict[int, str] = {}

    def build(sandbox_options: dict[str, Any] | None = None, tokens: TokenStore | None = None,
              sandbox: SalesforceSandbox | None = None, **settings: Any) -> Env:
        if sandbox is None:
            sandbox = SalesforceSandbox(seed=21, **(sandbox_options or {}))
            sandbox.load_book(book)
            server = serve(sandbox)
            servers.append(server)
            urls[id(sandbox)] = server.url
        url = urls[id(sandbox)]
        config = {**sandbox_settings(url), "query_batch_size": 200, "requests_per_second": 1000, **settings}
        src = SalesforceSource(SalesforceSettings.model_validate(config), tokens or MemoryTokens(), sleep=fast_sleep)
        sources.append(src)
        return sandbox, src

    yield build
    for src in sources:
        src.close()
    for server in servers:
        server.stop()


def pull(src: SalesforceSource, since: Cursor | None = None, page_size: int = 100,
         until: dt.datetime = FAR) -> list[DealPage]:
    return list(src.changed_deals(since, until, page_size))


def ids(pages: list[DealPage]) -> list[str]:
    return [d.crm_id for p in pages for d in p.deals]


def check_order(pages: list[DealPage]) -> None:
    """Deals come in (SystemModstamp, Id) order, once each, and each page's cursor is its last deal."""
    keys = [(d.updated_at, d.crm_id) for p in pages for d in p.deals]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for p in pages:
        assert p.cursor == Cursor(p.deals[-1].updated_at, p.deals[-1].crm_id)


def test_the_entry_point_names_the_adapter() -> None:
    """The ledgerbridge.crm entry point "salesforce" loads SalesforceSource."""
    assert connector_class("crm", "salesforce") is SalesforceSource


def test_full_pull_yields_every_deal_once_in_order(env: Callable[..., Env], book: Book) -> None:
    """A full pull pages through queryAll batches and nextRecordsUrl, handing every opportunity out once, in order."""
    sb, src = env()
    pages = pull(src, page_size=37)
    assert Counter(ids(pages)) == Counter(sb.object_ids("Opportunity"))
    assert len(ids(pages)) == len(book.deals)
    check_order(pages)
    assert all(len(p.deals) <= 37 for p in pages)
    calls = src.stats.by_endpoint
    assert (calls["GET queryAll"], calls["GET query/next"], calls[TOKEN_ENDPOINT]) == (1, 1, 1)
    assert src.stats.api_used == sb.api_usage()[0]


def test_won_deals_carry_customer_and_effective_lines(env: Callable[..., Env], book: Book) -> None:
    """Won deals carry the account and the synced, accepted quote's lines when there is one, else their own; open
    and lost deals carry their account too, without lines."""
    sb, src = env()
    by_id: dict[str, Deal] = {d.crm_id: d for p in pull(src) for d in p.deals}
    opp_ids, account_ids, quote_ids = sb.deal_ids_by_book_id(), sb.account_ids_by_book_id(), sb.quote_ids_by_book_id()
    sources: Counter[tuple[str, str | None]] = Counter()
    stages: Counter[str] = Counter()
    for bd in book.deals:
        deal = by_id[opp_ids[bd.id]]
        assert (deal.is_won, deal.currency, deal.amount, deal.name) == (bd.is_won, bd.currency, bd.amount, bd.name)
        assert (deal.acquisition_source, deal.owner, deal.archived) == (bd.acquisition_source, bd.owner, False)
        company = book.company(bd.company_id)
        c = deal.customer
        assert c is not None
        assert c.crm_id == account_ids[company.id]
        if not bd.is_won:
            assert (deal.line_items, deal.lines_source, deal.quote_id) == ([], "deal", None)
            continue
        stages[deal.stage or ""] += 1
        assert (c.name, c.vat_number, c.siren, c.siret, c.email, c.country, c.currency, c.domain) == (
            company.name, company.vat_number, company.siren, company.siret, company.email, company.country,
            company.currency, company.domain)
        assert (c.address.line1, c.address.city, c.address.postal_code) == (company.address, company.city,
                                                                            company.postal_code)
        assert c.acquisition_source == company.acquisition_source
        assert [(li.sku, li.quantity, li.unit_price, li.discount_percent, li.tax_rate, li.description)
                for li in deal.line_items] == [(ln.sku, ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate,
                                                ln.description) for ln in effective_lines(bd)]
        accepted = bd.quote is not None and bd.quote.status == "accepted"
        assert deal.lines_source == ("quote" if accepted else "deal")
        assert deal.quote_id == (quote_ids[bd.quote.id] if accepted and bd.quote else None)
        assert deal.lines_net_total() == deal.amount
        sources[(deal.lines_source, bd.quote.status if bd.quote else None)] += 1
    assert sources[("quote", "accepted")] > 5
    assert sources[("deal", "sent")] > 3
    assert set(stages) == {"Closed Won", "Signé"}


def test_probability_creation_and_customer_fields(env: Callable[..., Env], book: Book) -> None:
    """Every deal carries Probability / 100 (1 won, 0 lost), IsClosed and CreatedDate; its account's CreatedDate
    and AccountSource; all within the same number of calls as before (the accounts ride on the same queries)."""
    sb, src = env()
    deals = {d.crm_id: d for p in pull(src) for d in p.deals}
    opp_ids = sb.deal_ids_by_book_id()
    seen: Counter[Decimal] = Counter()
    for bd in book.deals:
        deal = deals[opp_ids[bd.id]]
        rec = sb.record("Opportunity", deal.crm_id)
        assert (deal.is_closed, deal.created_at) == (bd.is_closed, bd.created_at)
        if bd.is_won:
            assert deal.probability == 1
        elif bd.stage == "lost":
            assert deal.probability == 0
        else:
            assert deal.probability == rec["Probability"] / 100
            assert 0 < deal.probability < 1
        assert deal.probability is not None
        seen[deal.probability] += 1
        c = deal.customer
        assert c is not None
        assert c.created_at == sb.record("Account", c.crm_id)["CreatedDate"]
        assert c.acquisition_source == book.company(bd.company_id).acquisition_source
    assert {Decimal("0.1"), Decimal("0.75"), Decimal("0.95")} <= set(seen)  # Verbal Won: open at 95 %
    with_override = next(i for i, d in deals.items() if not d.is_closed)
    sb.modify("Opportunity", with_override, Probability=Decimal(35))
    [again] = src.get_deals([with_override])
    assert again.probability == Decimal("0.35")


def test_activity_counts_use_aggregate_queries_on_all_rows(env: Callable[..., Env], book: Book) -> None:
    """Tasks and Events are counted per opportunity as the book logged them, in two aggregate queryAll calls per
    200 opportunities (the activities are more than a year old: archived, so query would miss them)."""
    sb, src = env()
    opp_ids = sb.deal_ids_by_book_id()
    expected = {opp_ids[d.id]: dict(Counter(a.kind for a in book.activities(d))) for d in book.deals}
    expected = {k: v for k, v in expected.items() if v}
    assert 0 < len(expected) < len(book.deals)
    with sb.lock:
        assert sb.execute("SELECT COUNT() FROM Task")[0] == 0
        assert sb.execute("SELECT COUNT() FROM Task", include_deleted=True)[0] == sum(
            n for counts in expected.values() for k, n in counts.items() if k != "meeting")
    ids = list(opp_ids.values())
    short = ids[0][:15]
    asked = [*ids[1:], short, "006000000000000AAA", "not-an-id", "0018d00010vrx2pAAA"]
    got = src.activity_counts(asked)
    want = {(short if k == ids[0] else k): v for k, v in expected.items()}
    assert got == want
    assert src.stats.by_endpoint["GET queryAll"] == 3 * 2  # 401 opportunities: three chunks, Task and Event each
    assert "GET query/next" not in src.stats.by_endpoint
    assert src.activity_counts([]) == {}
    assert src.activity_counts(["006000000000000AAA"]) == {}


def test_activity_counts_skip_deleted_and_keep_archived_activities(env: Callable[..., Env], book: Book) -> None:
    """A deleted task no longer counts; a fresh, open task counts as much as an archived one; a Task whose subtype
    is the generic Task counts by its Type."""
    sb, src = env()
    opp = next(i for d, i in sb.deal_ids_by_book_id().items() if book.activities(book.deal(d)))
    before = src.activity_counts([opp])[opp]
    task = sb.query(f"SELECT Id FROM Task WHERE WhatId = '{opp}'", include_deleted=True)[0]["Id"]
    sb.delete("Task", task)
    with httpx.Client(base_url=src.settings.instance_url or "",
                      headers={"Authorization": f"Bearer {sb.issue_session()}"}) as api:
        made = api.post("/services/data/v62.0/sobjects/Task", json={
            "WhatId": opp, "Subject": "Rappeler", "Type": "Call", "ActivityDate": "2026-12-01"})
        assert made.status_code == 201, made.text
    after = src.activity_counts([opp])[opp]
    removed = sb.record("Task", task)
    kind = {"Call": "call", "Email": "email"}.get(removed["TaskSubtype"], "task")
    expected = Counter(before)
    expected[kind] -= 1
    expected["call"] += 1
    assert after == {k: n for k, n in expected.items() if n}


def test_activity_counts_split_a_chunk_with_more_groups_than_one_answer(env: Callable[..., Env],
                                                                         book: Book) -> None:
    """200 opportunities with 11 subtype-and-type pairs each exceed the 2,000 rows of an aggregate answer
    (EXCEEDED_ID_LIMIT): the chunk is counted in halves, and the counts stay exact."""
    sb, src = env()
    opp_ids = sb.deal_ids_by_book_id()
    chunk = list(opp_ids.values())[:200]
    pairs = [(st, ty) for st in ("Task", "Email", "Call", "ListEmail") for ty in ("Call", "Email", "Meeting")][:11]
    records = [{"attributes": {"type": "Task"}, "WhatId": opp, "Subject": "Suivi", "TaskSubtype": st, "Type": ty}
               for opp in chunk for st, ty in pairs]
    with httpx.Client(base_url=src.settings.instance_url or "",
                      headers={"Authorization": f"Bearer {sb.issue_session()}"}) as api:
        for i in range(0, len(records), 200):
            answer = api.post("/services/data/v62.0/composite/sobjects", json={"records": records[i:i + 200]})
            assert all(r["success"] for r in answer.json()), answer.text
    added: Counter[str] = Counter()
    for st, ty in pairs:
        added[{"Call": "call", "Email": "email", "ListEmail": "email"}.get(st) or
              {"Call": "call", "Email": "email", "Meeting": "meeting"}[ty]] += 1
    by_opp = {i: d for d, i in opp_ids.items()}
    got = src.activity_counts(chunk)
    for opp in chunk:
        assert got[opp] == dict(Counter(a.kind for a in book.activities(book.deal(by_opp[opp]))) + added), opp
    assert src.stats.by_endpoint["GET queryAll"] == 1 + 2 * 2  # refused once, then two halves of Task and Event


def test_resume_from_a_cursor_with_ties(env: Callable[..., Env]) -> None:
    """Resuming from any page's cursor, even inside 60 deals sharing one SystemModstamp, yields exactly the rest."""
    sb, src = env()
    tie = dt.datetime(2024, 9, 9, 9, 9, 9, 999000, tzinfo=dt.UTC)
    sb.touch("Opportunity", sb.object_ids("Opportunity")[:60], tie)
    pages = pull(src, page_size=25)
    everything = ids(pages)
    check_order(pages)
    for k in (0, len(pages) // 2, len(pages) - 2):
        cursor = pages[k].cursor
        assert cursor is not None
        done = sum(len(p.deals) for p in pages[:k + 1])
        assert ids(pull(src, since=cursor, page_size=25)) == everything[done:]
    inside = [p.cursor for p in pages if p.cursor is not None and p.cursor.value == tie]
    assert inside
    for cursor in inside:
        assert ids(pull(src, since=cursor, page_size=7)) == everything[everything.index(cursor.tiebreak) + 1:]
    assert ids(pull(src, since=Cursor(tie), page_size=50))[:60] == sorted(sb.object_ids("Opportunity")[:60])
    assert pull(src, since=pages[-1].cursor) == []


def test_until_bounds_the_pull_and_changes_come_back(env: Callable[..., Env]) -> None:
    """Only deals modified up to until come; a deal changed later is the only one in the next incremental pull."""
    sb, src = env()
    everything = pull(src)
    stamps = sorted({d.updated_at for p in everything for d in p.deals})
    until = stamps[len(stamps) // 2]
    first = pull(src, until=until)
    expected = [i for i in sb.object_ids("Opportunity") if sb.record("Opportunity", i)["SystemModstamp"] <= until]
    assert sorted(ids(first)) == sorted(expected)
    assert all(d.updated_at <= until for p in first for d in p.deals)
    deal = sb.object_ids("Opportunity")[3]
    sb.modify("Opportunity", deal, NextStep="Relancer le client")
    again = pull(src, since=everything[-1].cursor)
    assert ids(again) == [deal]


def test_deleted_opportunities_come_back_archived(env: Callable[..., Env], book: Book) -> None:
    """A deleted won deal comes back archived through queryAll; one purged from the recycle bin via the delete log."""
    sb, src = env()
    cursor = pull(src)[-1].cursor
    opp_ids = sb.deal_ids_by_book_id()
    won = [opp_ids[d.id] for d in book.deals if d.is_won]
    in_bin, purged, live = won[0], won[1], won[2]
    sb.delete("Opportunity", in_bin)
    sb.delete("Opportunity", purged)
    sb.purge("Opportunity", purged)
    pages = pull(src, since=cursor)
    assert [ids([p]) for p in pages] == [[purged], [in_bin]]
    swept, streamed = pages[0].deals[0], pages[1].deals[0]
    assert pages[0].cursor is None
    assert pages[1].cursor == Cursor(streamed.updated_at, in_bin)
    assert swept.archived
    assert swept.customer is None
    assert streamed.archived
    assert streamed.is_won
    assert streamed.line_items == []
    assert src.stats.by_endpoint["GET sobjects/Opportunity/deleted"] == 1
    got = src.get_deals([in_bin, purged, "006000000000000AAA", "not-an-id", live, in_bin])
    assert [(d.crm_id, d.archived) for d in got] == [(in_bin, True), (live, False)]
    assert got[1].customer is not None
    assert got[1].line_items


def test_write_fields_isolates_poison_records(env: Callable[..., Env]) -> None:
    """200 updates go in one sObject Collections call; bad records fail alone; a call refused as a whole is split."""
    sb, src = env()
    src.ensure_fields("deal", [FieldSpec("ledgerbridge_invoice_number", "Invoice number"),
                               FieldSpec("ledgerbridge_invoiced_amount", "Invoiced amount", "number"),
                               FieldSpec("ledgerbridge_invoiced_on", "Invoiced on", "date")])
    deals = sb.object_ids("Opportunity")[:199]
    sb.delete("Opportunity", deals[71])
    updates = [FieldUpdate(d, {"ledgerbridge_invoice_number": f"INV-{i}", "ledgerbridge_invoiced_amount":
                               Decimal("12.50"), "ledgerbridge_invoiced_on": dt.date(2026, 1, 31)})
               for i, d in enumerate(deals)]
    updates[70] = FieldUpdate(deals[70], {"ledgerbridge_invoice_number": "X" * 300})
    updates.append(FieldUpdate("006000000000000AAA", {"ledgerbridge_invoice_number": "INV-X"}))
    updates.append(FieldUpdate("42", {"ledgerbridge_invoice_number": "INV-Y"}))
    results = src.write_fields("deal", updates)
    assert [r.object_id for r in results] == [u.object_id for u in updates]
    failed = {r.object_id: r.error or "" for r in results if not r.ok}
    assert set(failed) == {deals[70], deals[71], "006000000000000AAA", "42"}
    assert "STRING_TOO_LONG" in failed[deals[70]]
    assert "ENTITY_IS_DELETED" in failed[deals[71]]
    assert src.stats.by_endpoint["PATCH composite/sobjects"] == 1
    rec = sb.record("Opportunity", deals[72])
    assert (rec["ledgerbridge_invoice_number__c"], rec["ledgerbridge_invoiced_amount__c"],
            rec["ledgerbridge_invoiced_on__c"]) == ("INV-72", Decimal("12.50"), dt.date(2026, 1, 31))
    assert sb.record("Opportunity", deals[70])["ledgerbridge_invoice_number__c"] is None
    batch = [FieldUpdate(d, {"ledgerbridge_invoiced_amount": Decimal("1.25")}) for d in deals[100:110]]
    batch[6] = FieldUpdate(deals[106], {"ledgerbridge_invoiced_amount": "beaucoup"})
    split = src.write_fields("deal", batch)
    assert [r.ok for r in split] == [i != 6 for i in range(10)]
    assert "JSON_PARSER_ERROR" in (split[6].error or "")
    assert sb.record("Opportunity", deals[109])["ledgerbridge_invoiced_amount__c"] == Decimal("1.25")
    # Values as text (as the metrics write-back sends them), and an empty text clearing any field.
    as_text = src.write_fields("deal", [FieldUpdate(deals[108], {"ledgerbridge_invoiced_amount": "7.75",
                                                                 "ledgerbridge_invoiced_on": "2026-02-28"})])
    assert [r.ok for r in as_text] == [True]
    rec = sb.record("Opportunity", deals[108])
    assert (rec["ledgerbridge_invoiced_amount__c"], rec["ledgerbridge_invoiced_on__c"]) == (
        Decimal("7.75"), dt.date(2026, 2, 28))
    cleared = src.write_fields("deal", [FieldUpdate(deals[108], dict.fromkeys(
        ("ledgerbridge_invoice_number", "ledgerbridge_invoiced_amount", "ledgerbridge_invoiced_on"), ""))])
    assert [r.ok for r in cleared] == [True]
    rec = sb.record("Opportunity", deals[108])
    assert (rec["ledgerbridge_invoice_number__c"], rec["ledgerbridge_invoiced_amount__c"],
            rec["ledgerbridge_invoiced_on__c"]) == (None, None, None)


def test_ensure_fields_creates_through_tooling_once(env: Callable[..., Env]) -> None:
    """Missing fields are created once through the Tooling API with their types; a second call creates nothing."""
    sb, src = env()
    fields = [FieldSpec("ledgerbridge_status", "Status", "enumeration", ("invoiced", "paid")),
              FieldSpec("ledgerbridge_paid", "Paid", "bool"), FieldSpec("ledgerbridge_synced_at", "Synced", "datetime"),
              FieldSpec("ledgerbridge_total", "Total", "number"), FieldSpec("ledgerbridge_ref", "Reference"),
              FieldSpec("Website", "Website")]
    src.ensure_fields("customer", fields)
    creates = src.stats.by_endpoint["POST tooling/sobjects/CustomField"]
    assert creates == 5
    src.ensure_fields("customer", fields)
    assert src.stats.by_endpoint["POST tooling/sobjects/CustomField"] == creates
    assert src.stats.by_endpoint["GET sobjects/Account/describe"] == 2
    with httpx.Client(transport=sb.transport(), base_url="https://acme.my.salesforce.com",
                      headers={"Authorization": f"Bearer {sb.issue_session()}"}) as api:
        described = {f["name"]: f for f in api.get("/services/data/v62.0/sobjects/Account/describe").json()["fields"]}
    assert described["ledgerbridge_status__c"]["type"] == "picklist"
    assert [v["value"] for v in described["ledgerbridge_status__c"]["picklistValues"]] == ["invoiced", "paid"]
    assert (described["ledgerbridge_paid__c"]["type"], described["ledgerbridge_synced_at__c"]["type"],
            described["ledgerbridge_total__c"]["type"]) == ("boolean", "datetime", "double")
    account = sb.object_ids("Account")[0]
    [result] = src.write_fields("customer", [FieldUpdate(account, {"ledgerbridge_status": "paid",
                                                                    "ledgerbridge_paid": True,
                                                                    "ledgerbridge_ref": "LB-1"})])
    assert result.ok, result.error
    assert sb.record("Account", account)["ledgerbridge_status__c"] == "paid"


def test_new_fields_get_access_through_the_permission_set(env: Callable[..., Env]) -> None:
    """With field-level security, created fields are granted through the permission set; without it, writes fail."""
    spec = [FieldSpec("ledgerbridge_invoice_number", "Invoice number")]
    sb, src = env({"field_security": True})
    deals = sb.object_ids("Opportunity")[:5]
    src.ensure_fields("deal", spec)
    hidden = src.write_fields("deal", [FieldUpdate(d, {"ledgerbridge_invoice_number": "F-1"}) for d in deals])
    assert [r.ok for r in hidden] == [False] * 5
    assert all("INVALID_FIELD" in (r.error or "") for r in hidden)
    assert src.stats.by_endpoint["PATCH composite/sobjects"] == 1  # the same failure for all: no splitting
    _, granted = env(sandbox=sb, field_permission_set_id=sb.permission_set_id())
    granted.ensure_fields("deal", spec)  # already created: only the access is granted
    assert granted.stats.by_endpoint["POST sobjects/FieldPermissions"] == 1
    assert all(r.ok for r in granted.write_fields("deal", [FieldUpdate(d, {"ledgerbridge_invoice_number": "F-2"})
                                                           for d in deals]))
    assert sb.record("Opportunity", deals[0])["ledgerbridge_invoice_number__c"] == "F-2"
    granted.ensure_fields("deal", spec)
    assert granted.stats.by_endpoint["POST tooling/sobjects/CustomField"] == 1


def test_an_expired_query_locator_restarts_from_the_last_deal(env: Callable[..., Env]) -> None:
    """When the engine is slow and the query locator expires, the pull queries again from the last deal handed out."""
    sb, src = env({"locator_ttl_s": 0.05})
    pages = []
    for page in src.changed_deals(None, FAR, 150):
        pages.append(page)
        time.sleep(0.1)
    assert sorted(ids(pages)) == sorted(sb.object_ids("Opportunity"))
    check_order(pages)
    assert src.stats.by_endpoint["GET queryAll"] == 2


def test_orgs_without_quotes_take_lines_from_products(env: Callable[..., Env], book: Book) -> None:
    """With quotes_enabled false no quote field is queried and every won deal's lines are its products."""
    _sb, src = env(quotes_enabled=False)
    deals = [d for p in pull(src) for d in p.deals if d.is_won]
    assert deals
    assert all(d.lines_source == "deal" and d.quote_id is None for d in deals)
    assert all(d.lines_net_total() == d.amount for d in deals)


def test_invalid_session_renews_once_and_keeps_the_rotated_refresh_token(env: Callable[..., Env]) -> None:
    """INVALID_SESSION_ID triggers one refresh and one resend; a rotated refresh token is saved and used next time."""
    tokens = MemoryTokens()
    sb, src = env({"refresh_rotation": True}, tokens=tokens)
    some = sb.object_ids("Opportunity")[:3]
    assert len(src.get_deals(some)) == 3
    stored = tokens.data["salesforce:" + DEMO_CLIENT_ID]
    assert stored["refresh_token"] != DEMO_REFRESH_TOKEN
    assert sb.valid_refresh_tokens() == [stored["refresh_token"]]
    sb.expire_sessions()
    assert len(src.get_deals(some)) == 3
    assert src.stats.by_endpoint[TOKEN_ENDPOINT] == 2
    assert src.stats.retries == 0
    assert sb.valid_refresh_tokens() == [tokens.data["salesforce:" + DEMO_CLIENT_ID]["refresh_token"]]
    # A new process with the same store (the configured refresh token is long dead) carries on.
    sb.expire_sessions()
    _, again = env(tokens=tokens, sandbox=sb)
    assert len(again.get_deals(some)) == 3
    assert again.stats.by_endpoint[TOKEN_ENDPOINT] == 1
    # The refresh token is revoked and the connection authorised again: the configured one replaces it.
    tokens.data["salesforce:" + DEMO_CLIENT_ID] = {"access_token": "", "refresh_token": "5Aep861-revoked",
                                                   "instance_url": "http://127.0.0.1:9", "issued_at": None}
    _, reauthorised = env(tokens=tokens, sandbox=sb, refresh_token=sb.issue_refresh_token())
    assert len(reauthorised.get_deals(some)) == 3
    assert reauthorised.stats.by_endpoint[TOKEN_ENDPOINT] == 2


def test_a_session_refused_after_renewal_is_an_auth_error(env: Callable[..., Env]) -> None:
    """When even the renewed session is refused, the call fails with AuthError after exactly one renewal."""
    sb, src = env({"session_lifetime_s": -1.0})
    with pytest.raises(AuthError) as caught:
        src.get_deals(sb.object_ids("Opportunity")[:1])
    assert caught.value.code == "INVALID_SESSION_ID"
    assert not isinstance(caught.value, ReauthorizationRequired)  # a refused session is not a dead grant
    assert src.stats.by_endpoint[TOKEN_ENDPOINT] == 2
    assert src.stats.retries == 0


def test_daily_limit_exhausted_stops_without_retry(env: Callable[..., Env]) -> None:
    """403 REQUEST_LIMIT_EXCEEDED is a QuotaExhaustedError with a one-line message; never retried, then fails fast."""
    sb, src = env({"daily_limit": 12}, daily_api_share=1.0, slow_down_share=1.0)
    some = sb.object_ids("Opportunity")[:2]
    assert len(src.get_deals(some)) == 2
    # Another integration of the org uses up what is left of the allocation.
    with httpx.Client(transport=sb.transport(), base_url="https://acme.my.salesforce.com",
                      headers={"Authorization": f"Bearer {sb.issue_session()}"}) as other:
        while other.get("/services/data/v62.0/limits").status_code == 200:
            pass
    refused = sb.stats()["request_limit_exceeded"]
    with pytest.raises(QuotaExhaustedError) as caught:
        src.get_deals(some)
    exc = caught.value
    assert exc.detail == ("Salesforce daily API request limit exhausted (DailyApiRequests 12/12); the pipeline stops "
                          "until it resets")
    assert "\n" not in str(exc)
    assert exc.status == 403
    assert exc.code == "REQUEST_LIMIT_EXCEEDED"
    assert sb.stats()["request_limit_exceeded"] == refused + 1
    assert src.stats.retries == 0
    calls = src.stats.calls
    with pytest.raises(QuotaExhaustedError):
        pull(src)
    assert (src.stats.calls, sb.stats()["request_limit_exceeded"]) == (calls, refused + 1)


def test_usage_near_the_allocation_slows_down_then_stops(env: Callable[..., Env]) -> None:
    """Past slow_down_share calls are spaced out; at daily_api_share the pipeline stops before Salesforce refuses."""
    sb, src = env({"daily_limit": 40}, daily_api_share=0.5, slow_down_share=0.25, slow_down_pause_s=0.01)
    some = sb.object_ids("Opportunity")[:2]

    def hammer() -> None:
        for _ in range(40):
            src.get_deals(some)

    with pytest.raises(QuotaExhaustedError) as caught:
        hammer()
    assert caught.value.code == "DAILY_API_SHARE"
    assert "20/40" in caught.value.detail
    assert src.stats.slowed > 0
    assert sb.stats()["request_limit_exceeded"] == 0


def test_faults_are_retried_without_duplicates(env: Callable[..., Env]) -> None:
    """Injected 429s and 5xx are retried under the one retry policy; every deal still comes once, in order."""
    sb, src = env({"faults": "429=0.15,503=0.1,502=0.05,500=0.05"})
    pages = pull(src, page_size=50)
    assert sorted(ids(pages)) == sorted(sb.object_ids("Opportunity"))
    check_order(pages)
    results = src.write_fields("deal", [FieldUpdate(d, {"NextStep": "Facturé – 30 € HT"})
                                        for d in sb.object_ids("Opportunity")[:300]])
    assert all(r.ok for r in results)
    assert sb.record("Opportunity", sb.object_ids("Opportunity")[299])["NextStep"] == "Facturé – 30 € HT"
    injected = sb.stats()["faults_injected"]
    assert injected.get("429", 0) > 0
    assert injected.get("503", 0) + injected.get("502", 0) + injected.get("500", 0) > 0
    assert src.stats.rate_limited == injected["429"]
    assert src.stats.retries == sum(injected.values())


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def test_no_client_library_exception_escapes(env: Callable[..., Env]) -> None:
    """A refused refresh token is an AuthError, a refused connection a TransientError, a bad field a VendorError."""
    sb, src = env(refresh_token="5Aep861-not-a-valid-token")
    with pytest.raises(ReauthorizationRequired) as refused:
        pull(src)
    assert refused.value.code == "invalid_grant"
    assert "not-a-valid" not in str(refused.value)
    _, wrong_field = env(sandbox=sb, vat_number_field="TVA__c")
    with pytest.raises(VendorError) as bad_field:
        pull(wrong_field)
    assert bad_field.value.code == "INVALID_FIELD"
    assert "TVA__c" in str(bad_field.value)
    dead = SalesforceSource(SalesforceSettings.model_validate({
        "type": "salesforce", "instance_url": "http://127.0.0.1:9", "login_url": "http://127.0.0.1:9",
        "allow_http": True, "client_id": DEMO_CLIENT_ID, "refresh_token": DEMO_REFRESH_TOKEN, "max_attempts": 2}),
        MemoryTokens(), sleep=fast_sleep)
    try:
        with pytest.raises(TransientError) as unreachable:
            dead.get_deals(sb.object_ids("Opportunity")[:1])
    finally:
        dead.close()
    for caught in (refused.value, bad_field.value, unreachable.value):
        assert isinstance(caught, ConnectorError)
        assert all(not type(e).__module__.startswith(("simple_salesforce", "requests", "urllib3"))
                   for e in _chain(caught))


def test_username_password_login(env: Callable[..., Env]) -> None:
    """The username-password flow logs in (password plus security token) and keeps no refresh token."""
    tokens = MemoryTokens()
    sb, src = env({"users": {DEMO_USERNAME: DEMO_PASSWORD}, "security_tokens": {DEMO_USERNAME: "TOKEN123"}},
                  tokens=tokens, auth="password", refresh_token=None, username=DEMO_USERNAME,
                  password=DEMO_PASSWORD, security_token="TOKEN123")
    assert len(src.get_deals(sb.object_ids("Opportunity")[:2])) == 2
    stored = tokens.data[f"salesforce:{DEMO_CLIENT_ID}:{DEMO_USERNAME}"]
    assert stored["refresh_token"] is None
    assert stored["access_token"]
    _, wrong = env(sandbox=sb, auth="password", refresh_token=None, username=DEMO_USERNAME, password="nope")
    with pytest.raises(AuthError, match="username-password"):
        wrong.get_deals(sb.object_ids("Opportunity")[:1])


def test_settings_are_validated() -> None:
    """http URLs need allow_http; missing or unknown keys and bad field names are ConfigErrors naming the key."""
    base = {"type": "salesforce", "client_id": DEMO_CLIENT_ID, "refresh_token": DEMO_REFRESH_TOKEN}
    tokens = MemoryTokens()
    with pytest.raises(ConfigError, match="allow_http"):
        SalesforceSource.from_config({**base, "instance_url": "http://127.0.0.1:8103"}, tokens)
    with pytest.raises(ConfigError, match="client_id"):
        SalesforceSource.from_config({"type": "salesforce"}, tokens)
    with pytest.raises(ConfigError, match="colour"):
        SalesforceSource.from_config({**base, "colour": "blue"}, tokens)
    with pytest.raises(ConfigError, match="username"):
        SalesforceSource.from_config({**base, "auth": "password"}, tokens)
    with pytest.raises(ConfigError, match="Tax Rate"):
        SalesforceSource.from_config({**base, "line_tax_rate_field": "Tax Rate"}, tokens)
    ok = SalesforceSource.from_config({**base, "instance_url": "https://acme.my.salesforce.com/"}, tokens)
    assert isinstance(ok, SalesforceSource)
    assert ok.settings.api_origin == "https://acme.my.salesforce.com"
    ok.close()


def test_the_engine_invoices_once_and_flags_invoiced_deals_deleted_in_salesforce(tmp_path: Path) -> None:
    """Against Xero, each won opportunity is invoiced once; deleting invoiced ones (even purged) flags them."""
    book = generate_book(5, companies=15, deals=40)
    sf = SalesforceSandbox(seed=5)
    sf.load_book(book)
    xero = XeroSandbox(seed=5, calls_per_minute=10_000)
    sf_server, xero_server = serve(sf), serve(xero)
    store = StateStore.open(f"sqlite:///{tmp_path}/state.db")
    refresh = xero.issue_tokens()["refresh_token"]
    goods = ("HW-", "CAT-LUNCH", "BOOK-", "PRESS-")
    pipeline = Pipeline.model_validate({
        "crm": {"type": "salesforce"}, "ledger": {"type": "xero"},
        "items": {"on_unmapped": "fail", "map": {p.sku: {"item_code": p.sku, "account_code": "707" if p.sku.startswith(
            goods) else "706"} for p in PRODUCTS}},
        "taxes": {"on_unmapped": "fail", "map": {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}}})
    closers: list[Callable[[], None]] = []

    def run() -> Any:
        tokens = store.token_store()
        crm = SalesforceSource.from_config(sandbox_settings(sf_server.url), tokens)
        ledger = XeroLedger.from_config({
            "type": "xero", "base_url": xero_server.url, "token_url": f"{xero_server.url}/connect/token",
            "tenant_id": DEMO_TENANT_ID, "client_id": XERO_CLIENT_ID, "client_secret": XERO_CLIENT_SECRET,
            "calls_per_minute": 10_000, "refresh_token": refresh}, tokens)
        closers.extend([crm.close, ledger.close])
        return PipelineRunner("main", pipeline, crm, ledger, store).run()

    try:
        first = run()
        won = [d for d in book.deals if d.is_won]
        assert (first.status, first.counts["created"]) == ("ok", len(won))
        live = [i["Reference"] for i in xero.invoices() if i["Status"] not in ("DELETED", "VOIDED")]
        opp_ids = sf.deal_ids_by_book_id()
        assert sorted(live) == sorted(f"LB-main:{opp_ids[d.id]}" for d in won)
        in_bin, purged = opp_ids[won[0].id], opp_ids[won[1].id]
        sf.delete("Opportunity", in_bin)
        sf.delete("Opportunity", purged)
        sf.purge("Opportunity", purged)
        second = run()
        assert second.counts["created"] == 0
        flags = store.open_flags("main")
        assert set(flags) == {in_bin, purged}
        assert {f.reason for f in flags.values()} == {"changed_after_invoice"}
    finally:
        for close in closers:
            close()
        store.close()
        sf_server.stop()
        xero_server.stop()

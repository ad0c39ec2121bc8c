"""The HubSpot adapter against the sandbox on a real socket: incremental pulls, hydration, retries, writes."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.domain import Deal
from connectors.errors import AuthError, ConfigError, ConnectorError, TransientError
from connectors.hubspot import HubSpotSource
from connectors.hubspot.sandbox import HubSpotSandbox, parse_ms, to_ms
from connectors.interfaces import Cursor, DealPage, FieldSpec, FieldUpdate, TokenStore
from connectors.sandboxkit import Clock, SandboxServer, serve
from connectors.seedbook import Book, effective_lines, generate_book

TOKEN = "demo-hubspot-token"
SCALE = 20.0


class _NoTokens(TokenStore):
    def load(self, connection: str) -> dict[str, Any] | None:
        return None

    def save(self, connection: str, token: dict[str, Any]) -> None:
        raise AssertionError("private-app tokens are never stored")


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(21, companies=150, deals=400)


Env = tuple[HubSpotSandbox, HubSpotSource]


@pytest.fixture
def env(book: Book) -> Iterator[Callable[..., Env]]:
    """Builds a loaded sandbox served on 127.0.0.1 and an adapter pointed at it; all torn down after the test."""
    servers: list[SandboxServer] = []
    sources: list[HubSpotSource] = []

    def build(sandbox_options: dict[str, Any] | None = None, **settings: Any) -> Env:
        sb = HubSpotSandbox(seed=21, clock=Clock(SCALE), **(sandbox_options or {}))
        sb.load_book(book)
        server = serve(sb)
        servers.append(server)
        src = HubSpotSource.from_config({"type": "hubspot", "base_url": server.url, "access_token": TOKEN,
                                         "time_scale": SCALE, **settings}, _NoTokens())
        assert isinstance(src, HubSpotSource)
        sources.append(src)
        return sb, src

    yield build
    for src in sources:
        src.close()
    for server in servers:
        server.stop()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)


def pull(src: HubSpotSource, since: Cursor | None = None, page_size: int = 100,
         until: dt.datetime | None = None) -> list[DealPage]:
    return list(src.changed_deals(since, until or now(), page_size))


def ids(pages: list[DealPage]) -> list[str]:
    return [d.crm_id for p in pages for d in p.deals]


def check_order(pages: list[DealPage]) -> None:
    """Deals come in (timestamp, numeric id) order and each page's cursor is its last deal."""
    keys = [(d.updated_at, int(d.crm_id)) for p in pages for d in p.deals]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for p in pages:
        assert p.cursor == Cursor(p.deals[-1].updated_at, p.deals[-1].crm_id)


def test_full_pull_yields_every_deal_once_across_ties_and_the_cap(env: Callable[..., Env], book: Book) -> None:
    """Small pages, a search cap of 50 and 130 deals at one timestamp: every deal comes exactly once, in order."""
    sb, src = env({"search_cap": 50}, search_result_cap=50)
    tied = sb.object_ids("deals")[100:230]
    sb.touch("deals", tied, dt.datetime(2025, 2, 1, 8, 0, tzinfo=dt.UTC))
    pages = pull(src, page_size=20)
    got = ids(pages)
    assert Counter(got) == Counter(sb.object_ids("deals"))
    assert len(got) == len(book.deals)
    check_order(pages)
    assert max(Counter(d.updated_at for p in pages for d in p.deals).values()) >= 130
    assert all(len(p.deals) <= 20 for p in pages)
    assert sb.stats()["search_calls"] == src.stats.by_endpoint["POST /crm/v3/objects/deals/search"]


def test_more_matches_than_the_search_cap(env: Callable[..., Env], book: Book) -> None:
    """With far more matching deals than one query may page through, the pull still gets them all."""
    sb, src = env({"search_cap": 40}, search_result_cap=40)
    pages = pull(src, page_size=30)
    assert sorted(ids(pages)) == sorted(sb.object_ids("deals"))
    check_order(pages)


def test_resume_from_a_cursor_yields_exactly_the_rest(env: Callable[..., Env]) -> None:
    """Resuming from any page's cursor, including inside a tie, yields exactly the deals after it."""
    sb, src = env()
    sb.touch("deals", sb.object_ids("deals")[:60], dt.datetime(2024, 9, 9, tzinfo=dt.UTC))
    pages = pull(src, page_size=25)
    everything = ids(pages)
    for k in (1, len(pages) // 2, len(pages) - 2):
        cursor = pages[k].cursor
        assert cursor is not None
        done = sum(len(p.deals) for p in pages[:k + 1])
        rest = pull(src, since=cursor, page_size=25)
        assert ids(rest) == everything[done:]
    tie_cursor = next(p.cursor for p in pages if p.cursor and p.cursor.value == dt.datetime(2024, 9, 9, tzinfo=dt.UTC))
    assert ids(pull(src, since=tie_cursor, page_size=7)) == everything[everything.index(tie_cursor.tiebreak) + 1:]
    assert pull(src, since=pages[-1].cursor) == []


def test_until_bounds_the_pull_and_changes_come_back(env: Callable[..., Env]) -> None:
    """Only deals modified up to ``until`` come; a deal modified later is in the next incremental pull."""
    sb, src = env()
    stamps = sorted({d.updated_at for p in pull(src) for d in p.deals})
    until = stamps[len(stamps) // 2]
    first = pull(src, until=until)
    assert all(d.updated_at <= until for p in first for d in p.deals)
    limit = to_ms(until)
    expected = [i for i in sb.object_ids("deals")
                if (parse_ms(sb.properties_of("deals", i)["hs_lastmodifieddate"]) or 0) <= limit]
    assert sorted(ids(first)) == sorted(expected)
    everything = pull(src)
    cursor = everything[-1].cursor
    deal = sb.object_ids("deals")[3]
    sb.modify_deal(deal, description="changed in HubSpot")
    again = pull(src, since=cursor)
    assert ids(again) == [deal]


def test_won_deals_carry_customer_and_effective_lines(env: Callable[..., Env], book: Book) -> None:
    """Won deals carry the book's customer and the accepted quote's lines when there is one, else the deal's;
    open and lost deals carry their customer too, without lines."""
    groups = {k: str(v) for k, v in HubSpotSandbox().tax_rate_groups().items()}
    sb, src = env(tax_rate_property=None, tax_rate_groups=groups)  # rates read through hs_tax_rate_group_id
    by_id: dict[str, Deal] = {d.crm_id: d for p in pull(src) for d in p.deals}
    hs_ids = sb.deal_ids_by_book_id()
    company_ids = sb.company_ids_by_book_id()
    sources: Counter[tuple[str, str | None]] = Counter()
    for bd in book.deals:
        deal = by_id[hs_ids[bd.id]]
        assert deal.is_won == bd.is_won
        assert deal.currency == bd.currency
        assert deal.amount == bd.amount
        assert deal.acquisition_source == bd.acquisition_source
        assert deal.name == bd.name
        company = book.company(bd.company_id)
        c = deal.customer
        assert c is not None
        assert c.crm_id == company_ids[company.id]
        if not bd.is_won:
            assert deal.line_items == []
            assert (deal.lines_source, deal.quote_id) == ("deal", None)
            continue
        assert (c.name, c.vat_number, c.siren, c.siret, c.email, c.country, c.currency, c.domain) == (
            company.name, company.vat_number, company.siren, company.siret, company.email, company.country,
            company.currency, company.domain)
        assert c.address.city == company.city
        assert c.address.postal_code == company.postal_code
        expected = [(ln.sku, ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate, ln.description)
                    for ln in effective_lines(bd)]
        assert [(li.sku, li.quantity, li.unit_price, li.discount_percent, li.tax_rate, li.description)
                for li in deal.line_items] == expected
        accepted = bd.quote is not None and bd.quote.status == "accepted"
        assert deal.lines_source == ("quote" if accepted else "deal")
        assert (deal.quote_id is not None) == accepted
        assert deal.lines_net_total() == deal.amount
        sources[(deal.lines_source, bd.quote.status if bd.quote else None)] += 1
    assert sources[("quote", "accepted")] > 5
    assert sources[("deal", "sent")] > 5
    quote_props = [sb.properties_of("quotes", by_id[hs_ids[b.id]].quote_id or "") for b in book.deals
                   if b.quote is not None and b.quote.status == "accepted"]
    assert {q["hs_status"] for q in quote_props} == {"ACCEPTED", "APPROVAL_NOT_NEEDED"}


def test_probability_creation_and_acquisition_of_every_deal(env: Callable[..., Env], book: Book) -> None:
    """Every deal carries its stage's probability on the 0..1 scale (1 won, 0 lost), its creation time and whether
    it is closed; its customer carries the company's creation time and original source."""
    sb, src = env()
    deals = {d.crm_id: d for p in pull(src) for d in p.deals}
    with httpx.Client(base_url=src.settings.base_url or "", headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        pipelines = api.get("/crm/v3/pipelines/deals").json()["results"]
    stages = {s["id"]: Decimal(s["metadata"]["probability"]) for p in pipelines for s in p["stages"]}
    hs_ids = sb.deal_ids_by_book_id()
    seen: Counter[Decimal] = Counter()
    for bd in book.deals:
        deal = deals[hs_ids[bd.id]]
        assert (deal.is_closed, deal.created_at) == (bd.is_closed, bd.created_at)
        props = sb.properties_of("deals", deal.crm_id)
        assert props["hs_deal_stage_probability"] == str(Decimal(float(stages[props["dealstage"]])))
        expected = Decimal(1) if bd.is_won else Decimal(0) if bd.stage == "lost" else stages[props["dealstage"]]
        assert deal.probability == expected, bd.id
        assert deal.probability is not None
        seen[deal.probability] += 1
        company = book.company(bd.company_id)
        c = deal.customer
        assert c is not None
        assert c.acquisition_source == company.acquisition_source
        assert c.created_at is not None
        assert c.created_at.isoformat(timespec="milliseconds").replace("+00:00", "Z") == \
            sb.properties_of("companies", c.crm_id)["createdate"]
        assert c.created_at < bd.created_at
    assert {Decimal("0.2"), Decimal("0.1"), Decimal("0.9")} <= set(seen)  # rounded out of the binary expansion
    assert all(p == p.quantize(Decimal("0.0001")) for p in seen)


def test_probability_is_normalised_to_the_unit_interval() -> None:
    """HubSpot's double expansion is rounded, a percentage is scaled, won and lost deals are 1 and 0."""
    from connectors.hubspot.adapter import _probability

    assert _probability("0.200000000000000011102230246251565404236316680908203125", won=False, closed=False) == \
        Decimal("0.2")
    assert _probability("0.6", won=False, closed=False) == Decimal("0.6")
    assert _probability("60", won=False, closed=False) == Decimal("0.6")
    assert _probability("-0.1", won=False, closed=False) == Decimal(0)
    assert _probability(None, won=False, closed=False) is None
    assert _probability("not a number", won=False, closed=False) is None
    assert _probability("0.4", won=True, closed=True) == Decimal(1)
    assert _probability("0.4", won=False, closed=True) == Decimal(0)


def test_activity_counts_are_the_engagements_associated_with_each_deal(env: Callable[..., Env], book: Book) -> None:
    """Calls, meetings, emails and tasks are counted per deal as the book logged them, in one association read
    per type and 1,000 deals; deals without any, unknown ids and malformed ids are absent."""
    sb, src = env()
    hs_ids = sb.deal_ids_by_book_id()
    expected = {hs_ids[d.id]: dict(Counter(a.kind for a in book.activities(d))) for d in book.deals}
    expected = {k: v for k, v in expected.items() if v}
    assert 0 < len(expected) < len(book.deals)
    asked = [*hs_ids.values(), "42", "not-an-id", next(iter(hs_ids.values()))]
    assert src.activity_counts(asked) == expected
    reads = {k: n for k, n in src.stats.by_endpoint.items() if k.startswith("POST /crm/v4/associations/deals/")}
    assert reads == {f"POST /crm/v4/associations/deals/{t}/batch/read": 1
                     for t in ("calls", "meetings", "emails", "tasks")}
    assert src.activity_counts([]) == {}
    assert src.activity_counts(["42", "x"]) == {}
    assert src.stats.calls == 4 + 4  # no call for no ids; one read per type for the well-formed unknown id


def test_activity_counts_follow_archives_and_association_paging(env: Callable[..., Env], book: Book) -> None:
    """An archived call no longer counts; a deal with more calls than one association page holds counts them all."""
    sb, src = env()
    busy = sb.object_ids("deals")[0]
    before = src.activity_counts([busy]).get(busy, {})
    with httpx.Client(base_url=src.settings.base_url or "", headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        for _ in range(6):  # 600 calls logged on one deal: more than a 500-association page
            body = {"inputs": [{"properties": {"hs_timestamp": "2025-03-01T10:00:00.000Z", "hs_call_title": "Relance"},
                                "associations": [{"to": {"id": busy}, "types": [
                                    {"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 206}]}]}
                               for _ in range(100)]}
            assert api.post("/crm/v3/objects/calls/batch/create", json=body).status_code == 201
    after = src.activity_counts([busy])[busy]
    assert after["call"] == before.get("call", 0) + 600
    assert {k: v for k, v in after.items() if k != "call"} == {k: v for k, v in before.items() if k != "call"}
    call = sb.associated_ids("deals", busy, "calls")[0]
    sb.archive_object("calls", call)
    assert src.activity_counts([busy])[busy]["call"] == after["call"] - 1


def test_faults_are_retried_without_duplicates(env: Callable[..., Env]) -> None:
    """Injected 429s and 5xx are retried; the pull still yields each deal once and the stats count them."""
    sb, src = env({"faults": "429=0.06,503=0.05,502=0.03"})
    pages = pull(src, page_size=50)
    assert sorted(ids(pages)) == sorted(sb.object_ids("deals"))
    check_order(pages)
    injected = sb.stats()["faults_injected"]
    assert injected.get("429", 0) > 0
    assert injected.get("503", 0) + injected.get("502", 0) > 0
    assert src.stats.rate_limited == injected["429"]
    assert src.stats.retries == sum(injected.values())


def test_write_fields_isolates_a_poison_record(env: Callable[..., Env]) -> None:
    """In 150 updates, an invalid value and an unknown id fail alone; every other record is written."""
    sb, src = env()
    src.ensure_fields("deal", [FieldSpec("ledgerbridge_invoice_number", "Invoice number"),
                               FieldSpec("ledgerbridge_invoiced_amount", "Invoiced amount", "number"),
                               FieldSpec("ledgerbridge_invoiced_on", "Invoiced on", "date")])
    deals = sb.object_ids("deals")[:149]
    updates = [FieldUpdate(d, {"ledgerbridge_invoice_number": f"INV-{i}",
                               "ledgerbridge_invoiced_amount": Decimal("12.50"),
                               "ledgerbridge_invoiced_on": dt.date(2026, 1, 31)}) for i, d in enumerate(deals)]
    updates[70] = FieldUpdate(deals[70], {"ledgerbridge_invoiced_amount": "not a number"})
    updates.append(FieldUpdate("999999", {"ledgerbridge_invoice_number": "INV-X"}))
    results = src.write_fields("deal", updates)
    assert [r.object_id for r in results] == [u.object_id for u in updates]
    failed = {r.object_id for r in results if not r.ok}
    assert failed == {deals[70], "999999"}
    assert all(r.error for r in results if not r.ok)
    props = sb.properties_of("deals", deals[71])
    assert props["ledgerbridge_invoice_number"] == "INV-71"
    assert props["ledgerbridge_invoiced_amount"] == "12.50"
    assert props["ledgerbridge_invoiced_on"] == "2026-01-31"
    assert "ledgerbridge_invoiced_amount" not in sb.properties_of("deals", deals[70])


def test_ensure_fields_is_idempotent(env: Callable[..., Env]) -> None:
    """The group and typed properties are created once; a second call creates nothing."""
    sb, src = env()
    fields = [FieldSpec("ledgerbridge_status", "Status", "enumeration", ("invoiced", "paid")),
              FieldSpec("ledgerbridge_paid", "Paid", "bool"), FieldSpec("ledgerbridge_synced_at", "Synced", "datetime")]
    src.ensure_fields("customer", fields)
    creates = {k: v for k, v in src.stats.by_endpoint.items() if k.startswith("POST /crm/v3/properties")}
    assert creates == {"POST /crm/v3/properties/companies/groups": 1, "POST /crm/v3/properties/companies": 3}
    src.ensure_fields("customer", fields)
    assert {k: v for k, v in src.stats.by_endpoint.items() if k.startswith("POST /crm/v3/properties")} == creates
    with httpx.Client(transport=sb.transport(), base_url="https://api.hubapi.com",
                      headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        group = api.get("/crm/v3/properties/companies/groups/ledgerbridge").json()
        props = {p["name"]: p for p in api.get("/crm/v3/properties/companies").json()["results"]}
    assert group["label"] == "Finance (LedgerBridge)"
    assert props["ledgerbridge_status"]["type"] == "enumeration"
    assert [o["value"] for o in props["ledgerbridge_status"]["options"]] == ["invoiced", "paid"]
    assert props["ledgerbridge_paid"]["type"] == "bool"
    assert props["ledgerbridge_synced_at"]["type"] == "datetime"
    assert all(props[f.name]["groupName"] == "ledgerbridge" for f in fields)


def test_get_deals_reads_hydrates_and_skips_unknown(env: Callable[..., Env], book: Book) -> None:
    """get_deals returns known deals with customer and lines, archived ones flagged, unknown ids left out."""
    sb, src = env()
    hs_ids = sb.deal_ids_by_book_id()
    open_deal = next(hs_ids[d.id] for d in book.deals if not d.is_won)
    won = next(hs_ids[d.id] for d in book.deals if d.is_won)
    gone = sb.object_ids("deals")[-1]
    sb.archive_object("deals", gone)
    got = src.get_deals([won, "42", open_deal, gone, won])
    assert [d.crm_id for d in got] == [won, open_deal, gone]
    assert got[0].customer is not None
    assert got[0].line_items
    assert got[1].customer is not None
    assert not got[1].is_won
    assert got[2].archived


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def test_no_sdk_exception_escapes(env: Callable[..., Env]) -> None:
    """A bad token is an AuthError, a refused connection a TransientError; no SDK type leaks, no token in text."""
    _sb, src = env(access_token="pat-na1-wrong-token")
    with pytest.raises(AuthError) as caught:
        pull(src)
    assert caught.value.status == 401
    assert caught.value.code == "INVALID_AUTHENTICATION"
    assert all(not type(e).__module__.startswith(("hubspot", "urllib3")) for e in _chain(caught.value))
    assert "wrong-token" not in str(caught.value)
    dead = HubSpotSource.from_config({"type": "hubspot", "base_url": "http://127.0.0.1:9", "access_token": TOKEN,
                                      "max_attempts": 2}, _NoTokens())
    assert isinstance(dead, HubSpotSource)
    try:
        with pytest.raises(TransientError) as refused:
            dead.get_deals(["1"])
    finally:
        dead.close()
    assert isinstance(refused.value, ConnectorError)
    assert all(not type(e).__module__.startswith(("hubspot", "urllib3")) for e in _chain(refused.value))
    assert dead.stats.retries == 1


def test_proactive_pacing_avoids_429(env: Callable[..., Env]) -> None:
    """With the sandbox enforcing 30 requests per 10 s, the adapter's budget keeps it from ever hitting a 429."""
    sb, src = env({"requests_per_10s": 30}, requests_per_10s=30)
    pages = pull(src, page_size=100)
    assert len(ids(pages)) == len(sb.object_ids("deals"))
    assert src.stats.rate_limited == 0
    assert sb.stats()["rate_limited"] == 0
    assert src.stats.calls > 30


def test_settings_are_validated() -> None:
    """A block without a token, or with an unknown key, is a ConfigError naming the field."""
    with pytest.raises(ConfigError, match="access_token"):
        HubSpotSource.from_config({"type": "hubspot"}, _NoTokens())
    with pytest.raises(ConfigError, match="colour"):
        HubSpotSource.from_config({"type": "hubspot", "access_token": TOKEN, "colour": "blue"}, _NoTokens())


def test_a_cap_lower_than_configured_is_survived(env: Callable[..., Env]) -> None:
    """When HubSpot refuses to page earlier than the configured cap, the tie walk restarts from the last id."""
    sb, src = env({"search_cap": 30})
    tied = sb.object_ids("deals")[:130]
    sb.touch("deals", tied, dt.datetime(2025, 3, 3, tzinfo=dt.UTC))
    pages = pull(src, page_size=20)
    assert sorted(ids(pages)) == sorted(sb.object_ids("deals"))
    check_order(pages)

"""The Pipedrive adapter against its sandbox: incremental pulls, hydration, field mapping, writes, limits, auth."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.domain import Deal
from connectors.errors import AuthError, ConfigError, QuotaExhaustedError
from connectors.interfaces import Cursor, DealPage, FieldSpec, FieldUpdate, TokenStore
from connectors.pipedrive import PipedriveSource
from connectors.pipedrive.sandbox import PipedriveSandbox
from connectors.sandboxkit import Clock
from connectors.seedbook import Book, effective_lines, generate_book

TOKEN = "demo-pipedrive-token"
SCALE = 20.0


class _MemoryTokens(TokenStore):
    def __init__(self) -> None:
        self.saved: dict[str, dict[str, Any]] = {}

    def load(self, connection: str) -> dict[str, Any] | None:
        return self.saved.get(connection)

    def save(self, connection: str, token: dict[str, Any]) -> None:
        self.saved[connection] = dict(token)


@pytest.fixture(scope="module")
def book() -> Book:
    return generate_book(21, companies=120, deals=320)


Env = tuple[PipedriveSandbox, PipedriveSource]


@pytest.fixture
def env(book: Book) -> Iterator[Callable[..., Env]]:
    """Builds a loaded sandbox (compressed clock) and an adapter on its in-process transport."""
    sources: list[PipedriveSource] = []

    def build(sandbox_options: dict[str, Any] | None = None, **settings: Any) -> Env:
        sb = PipedriveSandbox(seed=21, clock=Clock(SCALE), **(sandbox_options or {}))
        sb.load_book(book)
        block: dict[str, Any] = {"type": "pipedrive", "api_token": TOKEN, "time_scale": SCALE, "burst_limit": 80}
        block.update(settings)
        block = {k: v for k, v in block.items() if v is not None}
        src = PipedriveSource.from_config(block, _MemoryTokens(), transport=sb.transport())
        sources.append(src)
        return sb, src

    yield build
    for src in sources:
        src.close()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)


def pull(src: PipedriveSource, since: Cursor | None = None, page_size: int = 100,
         until: dt.datetime | None = None) -> list[DealPage]:
    return list(src.changed_deals(since, until or now(), page_size))


def ids(pages: list[DealPage]) -> list[str]:
    return [d.crm_id for p in pages for d in p.deals]


def check_order(pages: list[DealPage]) -> None:
    """Deals come in (update_time, numeric id) order, each once, and each page's cursor is its last deal."""
    keys = [(d.updated_at, int(d.crm_id)) for p in pages for d in p.deals]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)
    for p in pages:
        assert p.cursor == Cursor(p.deals[-1].updated_at, p.deals[-1].crm_id)


def everyone(sb: PipedriveSandbox) -> list[str]:
    return [str(i) for i in sb.deal_ids()]


def test_full_pull_yields_every_deal_once(env: Callable[..., Env], book: Book) -> None:
    """Small pages and list calls, a 90-deal tie at one second: every deal comes once, in order, deleted included."""
    sb, src = env(list_limit=25)
    sb.touch(sb.deal_ids()[50:140], dt.datetime(2025, 2, 1, 8, 0, tzinfo=dt.UTC))
    gone = sb.deal_ids()[7]
    sb.delete_deal(gone)
    pages = pull(src, page_size=20)
    got = ids(pages)
    assert Counter(got) == Counter([*everyone(sb), str(gone)])
    assert len(got) == len(book.deals)
    check_order(pages)
    assert max(Counter(d.updated_at for p in pages for d in p.deals).values()) >= 90
    assert all(len(p.deals) <= 20 for p in pages)
    deleted = next(d for p in pages for d in p.deals if d.crm_id == str(gone))
    assert deleted.archived
    assert not deleted.is_won


def test_list_calls_are_few_and_use_the_v2_cursor(env: Callable[..., Env], book: Book) -> None:
    """At 500 a page the whole book is one deals call; hydration reads 100 deals' products and orgs per call."""
    sb, src = env()
    pull(src, page_size=100)
    calls = src.stats.by_endpoint
    assert calls["GET /api/v2/deals"] == 1
    assert calls["GET /api/v2/deals/archived"] == 1
    won = sum(1 for d in book.deals if d.is_won)
    assert calls["GET /api/v2/deals/products"] <= -(-won // 100) + 4
    assert calls["GET /api/v2/organizations"] <= calls["GET /api/v2/deals/products"]
    assert all(not k.startswith("GET /v1") for k in calls)
    assert src.client.tokens_spent == sb.stats()["tokens_charged"]


def test_resume_from_a_cursor_with_second_ties(env: Callable[..., Env]) -> None:
    """Resuming from any page's cursor, including one inside a tie at one second, yields exactly the rest."""
    sb, src = env(list_limit=30)
    tie = dt.datetime(2024, 9, 9, 10, 0, 0, tzinfo=dt.UTC)
    sb.touch(sb.deal_ids()[:60], tie)
    pages = pull(src, page_size=25)
    everything = ids(pages)
    for k in (0, len(pages) // 2, len(pages) - 2):
        cursor = pages[k].cursor
        assert cursor is not None
        done = sum(len(p.deals) for p in pages[:k + 1])
        assert ids(pull(src, since=cursor, page_size=25)) == everything[done:]
    inside = next(p.cursor for p in pages if p.cursor and p.cursor.value == tie)
    rest = ids(pull(src, since=inside, page_size=7))
    assert rest == everything[everything.index(inside.tiebreak) + 1:]
    tied_ids = [i for i in everything if str(i) in {str(x) for x in sb.deal_ids()[:60]}]
    assert rest[:len(tied_ids) - tied_ids.index(inside.tiebreak) - 1] == tied_ids[tied_ids.index(inside.tiebreak) + 1:]
    assert pull(src, since=pages[-1].cursor) == []


def test_until_bounds_the_pull_and_changes_come_back(env: Callable[..., Env]) -> None:
    """Only deals updated up to ``until`` come; a deal a user changes later is in the next incremental pull."""
    sb, src = env()
    stamps = sorted({d.updated_at for p in pull(src) for d in p.deals})
    until = stamps[len(stamps) // 2]
    first = pull(src, until=until)
    assert all(d.updated_at <= until for p in first for d in p.deals)
    assert until in {d.updated_at for p in first for d in p.deals}
    expected = [str(i) for i in sb.deal_ids() if sb.deal(i)["update_time"] <= until.strftime("%Y-%m-%dT%H:%M:%SZ")]
    assert sorted(ids(first)) == sorted(expected)
    cursor = pull(src)[-1].cursor
    deal = sb.deal_ids()[3]
    sb.modify_deal(deal, title="Changed in Pipedrive")
    assert ids(pull(src, since=cursor)) == [str(deal)]


def test_won_deals_carry_customer_and_effective_lines(env: Callable[..., Env], book: Book) -> None:
    """Won deals (status=won) carry the organization's custom fields mapped by hash key and the effective lines;
    open and lost deals carry their organization too, without lines."""
    sb, src = env()
    by_id: dict[str, Deal] = {d.crm_id: d for p in pull(src) for d in p.deals}
    pd_ids = sb.deal_ids_by_book_id()
    org_ids = sb.org_ids_by_book_id()
    checked = 0
    for bd in book.deals:
        deal = by_id[str(pd_ids[bd.id])]
        assert deal.is_won == bd.is_won
        assert (deal.amount, deal.currency, deal.name) == (bd.amount, bd.currency, bd.name)
        assert deal.acquisition_source == bd.acquisition_source
        company = book.company(bd.company_id)
        c = deal.customer
        assert c is not None
        assert c.crm_id == str(org_ids[company.id])
        if not bd.is_won:
            assert deal.line_items == []
            continue
        checked += 1
        assert deal.close_date == bd.close_date
        assert (c.name, c.vat_number, c.siren, c.siret, c.email, c.country, c.currency, c.domain) == (
            company.name, company.vat_number, company.siren, company.siret, company.email, company.country,
            company.currency, company.domain)
        assert (c.address.city, c.address.postal_code) == (company.city, company.postal_code)
        assert c.address.line1 == company.address
        expected = [(ln.sku, ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate, ln.description)
                    for ln in effective_lines(bd)]
        assert [(li.sku, li.quantity, li.unit_price, li.discount_percent, li.tax_rate, li.description)
                for li in deal.line_items] == expected
        assert deal.lines_source == "deal"
        assert deal.lines_net_total() == deal.amount
    assert checked > 100


def test_probability_creation_and_customer_acquisition(env: Callable[..., Env], book: Book) -> None:
    """Open deals carry their own probability when set, else their stage's deal_probability (read once), over 100;
    won 1, lost 0; every deal its add_time; its customer the organization's add_time and acquisition source."""
    sb, src = env()
    deals = {d.crm_id: d for p in pull(src) for d in p.deals}
    assert src.stats.by_endpoint["GET /api/v2/stages"] == 1
    assert src.client.tokens_spent == sb.stats()["tokens_charged"]  # the stages list costs 5
    with httpx.Client(transport=sb.transport(), base_url="https://api.pipedrive.com",
                      headers={"x-api-token": TOKEN}) as api:
        stages = {s["id"]: s["deal_probability"] for s in api.get("/api/v2/stages").json()["data"]}
    pd_ids = sb.deal_ids_by_book_id()
    own = 0
    for bd in book.deals:
        deal = deals[str(pd_ids[bd.id])]
        raw = sb.deal(pd_ids[bd.id])
        assert (deal.is_closed, deal.created_at) == (bd.is_closed, bd.created_at.replace(microsecond=0))
        if bd.is_won:
            assert deal.probability == 1
        elif bd.stage == "lost":
            assert deal.probability == 0
        elif raw["probability"] is not None:
            own += 1
            assert deal.probability == raw["probability"] / 100
        else:
            assert deal.probability == Decimal(stages[raw["stage_id"]]) / 100
        c = deal.customer
        assert c is not None
        assert c.acquisition_source == book.company(bd.company_id).acquisition_source
        assert c.created_at == dt.datetime.fromisoformat(sb.organization(int(c.crm_id))["add_time"])
        assert deal.created_at is not None
        assert c.created_at < deal.created_at
    assert own > 5


def test_activity_counts_deal_by_deal_or_in_one_scan(env: Callable[..., Env], book: Book) -> None:
    """A few deals are read one list call each; many deals through one scan of every activity, 500 a call; both
    count what the book logged; unknown and malformed ids are absent and no ids cost nothing."""
    sb, src = env()
    pd_ids = sb.deal_ids_by_book_id()
    expected = {str(pd_ids[d.id]): dict(Counter(a.kind for a in book.activities(d))) for d in book.deals}
    expected = {k: v for k, v in expected.items() if v}
    few = list(expected)[:4]
    assert src.activity_counts([*few, "424242", "x-1", few[0]]) == {k: expected[k] for k in few}
    assert src.stats.by_endpoint["GET /api/v2/activities"] == 5
    assert src.activity_counts([]) == {}
    assert src.stats.by_endpoint["GET /api/v2/activities"] == 5
    scan = PipedriveSource.from_config({"type": "pipedrive", "api_token": TOKEN, "time_scale": SCALE,
                                        "burst_limit": 80}, _MemoryTokens(), transport=sb.transport())
    try:
        assert scan.activity_counts([str(i) for i in pd_ids.values()] + ["424242"]) == expected
        total = sb.stats()["objects"]["activities"]
        assert total > 1000
        assert scan.stats.by_endpoint["GET /api/v2/activities"] == -(-total // 500)
        assert scan.client.tokens_spent == 10 * -(-total // 500)
    finally:
        scan.close()


def test_activity_counts_follow_types_and_deletes(env: Callable[..., Env], book: Book) -> None:
    """Types map to kinds through activity_types (a lunch counts as a meeting when configured, else not at all);
    a deleted activity no longer counts."""
    sb, src = env()
    mapped = PipedriveSource.from_config({
        "type": "pipedrive", "api_token": TOKEN, "time_scale": SCALE,
        "activity_types": {"call": "call", "meeting": "meeting", "email": "email", "task": "task", "lunch": "meeting"},
    }, _MemoryTokens(), transport=sb.transport())
    deal = next(i for i in sb.deal_ids() if sb.activity_counts_of(i).get("call"))
    with contextlib.closing(mapped), httpx.Client(transport=sb.transport(), base_url="https://api.pipedrive.com",
                                                  headers={"x-api-token": TOKEN}) as api:
        before = src.activity_counts([str(deal)]).get(str(deal), {})
        made = api.post("/api/v2/activities", json={"deal_id": deal, "type": "lunch", "subject": "Déjeuner",
                                                    "done": True})
        assert made.status_code == 200, made.text
        assert src.activity_counts([str(deal)]).get(str(deal), {}) == before
        assert mapped.activity_counts([str(deal)])[str(deal)] == {**before, "meeting": before.get("meeting", 0) + 1}
        call = next(a["id"] for a in sb.activities_of(deal) if a["type"] == "call")
        assert api.delete(f"/api/v2/activities/{call}").status_code == 200
    after = src.activity_counts([str(deal)]).get(str(deal), {})
    assert after.get("call", 0) == before["call"] - 1


def test_status_not_stage_decides_won(env: Callable[..., Env], book: Book) -> None:
    """A deal reopened or lost in Pipedrive is no longer won though it keeps its stage; an archived one stays won."""
    sb, src = env()
    pd_ids = sb.deal_ids_by_book_id()
    won = [pd_ids[d.id] for d in book.deals if d.is_won][:3]
    stage = sb.deal(won[0])["stage_id"]
    sb.modify_deal(won[0], status="open")
    sb.modify_deal(won[1], status="lost")
    sb.archive_deal(won[2])
    got = {d.crm_id: d for d in src.get_deals([str(i) for i in won])}
    assert sb.deal(won[0])["stage_id"] == stage
    assert not got[str(won[0])].is_won
    assert not got[str(won[1])].is_won
    # Archiving tidies Pipedrive's views; the deal still stands, with its customer and lines.
    assert not got[str(won[2])].archived
    assert got[str(won[2])].is_won
    assert got[str(won[2])].customer is not None
    assert got[str(won[2])].line_items


def test_get_deals_reads_archived_deleted_and_skips_unknown(env: Callable[..., Env], book: Book) -> None:
    """get_deals returns known deals in order with lines, deleted ones flagged, unknown ids left out."""
    sb, src = env()
    pd_ids = sb.deal_ids_by_book_id()
    won = next(pd_ids[d.id] for d in book.deals if d.is_won)
    open_deal = next(pd_ids[d.id] for d in book.deals if not d.is_won)
    deleted, archived = sb.deal_ids()[-1], sb.deal_ids()[-2]
    sb.delete_deal(deleted)
    sb.archive_deal(archived)
    got = src.get_deals([str(won), "424242", str(open_deal), str(deleted), "abc", str(archived), str(won)])
    assert [d.crm_id for d in got] == [str(won), str(open_deal), str(deleted), str(archived)]
    assert got[0].customer is not None
    assert got[0].line_items
    assert not got[1].is_won
    assert got[2].archived
    assert not got[3].archived


def test_archived_and_deleted_deals_come_back_in_incremental_pulls(env: Callable[..., Env], book: Book) -> None:
    """Deals archived or deleted after the last pull are in the next pull; only the deleted one is retracted."""
    sb, src = env()
    cursor = pull(src)[-1].cursor
    pd_ids = sb.deal_ids_by_book_id()
    a, b = [pd_ids[d.id] for d in book.deals if d.is_won][:2]
    sb.archive_deal(a)
    sb.delete_deal(b)
    again = [d for p in pull(src, since=cursor) for d in p.deals]
    assert {d.crm_id for d in again} == {str(a), str(b)}
    retracted = {d.crm_id: d.archived for d in again}
    assert retracted == {str(a): False, str(b): True}
    quiet_sb, quiet = env(include_archived=False, include_deleted=False)
    cursor = pull(quiet)[-1].cursor
    quiet_sb.archive_deal(a)
    quiet_sb.delete_deal(b)
    assert pull(quiet, since=cursor) == []
    assert "GET /api/v2/deals/archived" not in quiet.stats.by_endpoint


def test_custom_fields_resolve_by_label_or_key(env: Callable[..., Env], book: Book) -> None:
    """Settings may name organization fields by label or by 40-char key; an unknown field reads as empty."""
    sb, _ = env()
    vat_key = sb.custom_field_key("organization", "VAT number")
    _, src = env(vat_number_field=vat_key, siren_field="siren", email_field="No such field",
                 acquisition_source_field="origin", email_from_person=False)
    pd_ids = sb.deal_ids_by_book_id()
    won = [bd for bd in book.deals if bd.is_won][:20]
    got = {d.crm_id: d for d in src.get_deals([str(pd_ids[bd.id]) for bd in won])}
    for bd in won:
        deal = got[str(pd_ids[bd.id])]
        company = book.company(bd.company_id)
        assert deal.customer is not None
        assert deal.customer.vat_number == company.vat_number
        assert deal.customer.siren == company.siren
        assert deal.customer.email is None
        assert deal.acquisition_source in {"import", "manuallycreated"}


def test_person_email_fills_a_missing_billing_email(env: Callable[..., Env], book: Book) -> None:
    """With the billing e-mail field empty, the contact person's primary e-mail is the customer's."""
    sb, src = env()
    bd = next(d for d in book.deals if d.is_won and book.company(d.company_id).email)
    pd_id = sb.deal_ids_by_book_id()[bd.id]
    org_id = sb.deal(pd_id)["org_id"]
    email_key = sb.custom_field_key("organization", "Billing email")
    with httpx.Client(transport=sb.transport(), base_url="https://api.pipedrive.com",
                      headers={"x-api-token": TOKEN}) as api:
        assert api.patch(f"/api/v2/organizations/{org_id}",
                         json={"custom_fields": {email_key: None}}).status_code == 200
    [deal] = src.get_deals([str(pd_id)])
    assert deal.customer is not None
    assert deal.customer.email == book.company(bd.company_id).email
    assert "GET /api/v2/persons" in src.stats.by_endpoint


def test_tax_methods_and_amount_discounts(env: Callable[..., Env], book: Book) -> None:
    """Tax-inclusive prices come back net, tax_method none is 0 %, an amount discount comes off the unit price."""
    sb, src = env()
    bd = next(d for d in book.deals if d.is_won and len(effective_lines(d)) >= 3)
    pd_id = sb.deal_ids_by_book_id()[bd.id]
    first, second, third = sb.deal_products_of(pd_id)[:3]
    sb.modify_deal_product(first["id"], item_price=Decimal("120"), tax=Decimal("20"), tax_method="inclusive",
                           discount=Decimal(0), quantity=Decimal(1))
    sb.modify_deal_product(second["id"], tax_method="none")
    sb.modify_deal_product(third["id"], discount=Decimal("10"), discount_type="amount", quantity=Decimal(4),
                           item_price=Decimal("50"))
    [deal] = src.get_deals([str(pd_id)])
    one, two, three = deal.line_items[:3]
    assert (one.unit_price, one.tax_rate) == (Decimal("100.0000"), Decimal("20"))
    assert two.tax_rate == Decimal(0)
    assert (three.unit_price, three.discount_percent, three.net_amount(deal.currency)) == (
        Decimal("47.5"), Decimal(0), Decimal("190.00"))


def test_write_fields_isolates_a_poison_record(env: Callable[..., Env]) -> None:
    """In 60 updates, a non-number, an unknown option and an unknown deal fail alone; the rest are written."""
    sb, src = env()
    src.ensure_fields("deal", [FieldSpec("ledgerbridge_invoice_number", "Invoice number"),
                               FieldSpec("ledgerbridge_invoiced_amount", "Invoiced amount", "number"),
                               FieldSpec("ledgerbridge_invoiced_on", "Invoiced on", "date"),
                               FieldSpec("ledgerbridge_status", "Invoice status", "enumeration",
                                         ("invoiced", "paid"))])
    deals = sb.deal_ids()[:58]
    updates = [FieldUpdate(str(d), {"ledgerbridge_invoice_number": f"INV-{i}",
                                    "ledgerbridge_invoiced_amount": Decimal("1234.56"),
                                    "ledgerbridge_invoiced_on": dt.date(2026, 1, 31),
                                    "ledgerbridge_status": "invoiced"}) for i, d in enumerate(deals)]
    updates[20] = FieldUpdate(str(deals[20]), {"ledgerbridge_invoiced_amount": "not a number"})
    updates[30] = FieldUpdate(str(deals[30]), {"ledgerbridge_status": "cancelled"})
    updates.append(FieldUpdate("999999", {"ledgerbridge_invoice_number": "INV-X"}))
    updates.append(FieldUpdate(str(deals[40]), {"no_such_field": "x"}))
    results = src.write_fields("deal", updates)
    assert [r.object_id for r in results] == [u.object_id for u in updates]
    failed = {r.object_id for r in results if not r.ok}
    assert failed == {str(deals[20]), str(deals[30]), "999999", str(deals[40])}
    assert all(r.error for r in results if not r.ok)
    keys = {f["field_name"]: f for f in sb.fields_of("deal")}
    written = sb.deal(deals[21])["custom_fields"]
    assert written[keys["Invoice number"]["field_code"]] == "INV-21"
    assert written[keys["Invoiced amount"]["field_code"]] == Decimal("1234.56")
    assert written[keys["Invoiced on"]["field_code"]] == "2026-01-31"
    paid_options = {o["label"]: o["id"] for o in keys["Invoice status"]["options"]}
    assert written[keys["Invoice status"]["field_code"]] == paid_options["invoiced"]
    assert sb.deal(deals[20])["custom_fields"][keys["Invoiced amount"]["field_code"]] is None
    assert src.stats.by_endpoint["PATCH /api/v2/deals/{id}".replace("{id}", str(deals[0]))] == 1


def test_values_written_as_text_take_the_field_type(env: Callable[..., Env]) -> None:
    """Values given as text, as the metrics write-back gives them, are sent in the field's type: numbers as numbers,
    a datetime's text as its day, true/false as Yes/No, and an empty text clears the field."""
    sb, src = env()
    specs = [FieldSpec("ledgerbridge_clv", "CLV", "number"),
             FieldSpec("ledgerbridge_last_invoice", "Last invoice", "date"),
             FieldSpec("ledgerbridge_at_risk", "At risk", "bool"),
             FieldSpec("ledgerbridge_note", "Note")]
    src.ensure_fields("customer", specs)
    org = str(sb.org_ids_by_book_id()[next(iter(sb.org_ids_by_book_id()))])
    values = {"ledgerbridge_clv": "90826.27", "ledgerbridge_last_invoice": "2026-01-31T22:30:00.000Z",
              "ledgerbridge_at_risk": "true", "ledgerbridge_note": "relancer"}
    assert [r.ok for r in src.write_fields("customer", [FieldUpdate(org, values)])] == [True]
    keys = {f["field_name"]: f for f in sb.fields_of("organization")}
    written = sb.organization(int(org))["custom_fields"]
    yes = next(o["id"] for o in keys["At risk"]["options"] if o["label"] == "Yes")
    assert (written[keys["CLV"]["field_code"]], written[keys["Last invoice"]["field_code"]],
            written[keys["At risk"]["field_code"]], written[keys["Note"]["field_code"]]) == (
        Decimal("90826.27"), "2026-01-31", yes, "relancer")
    cleared = src.write_fields("customer", [FieldUpdate(org, dict.fromkeys(values, ""))])
    assert [r.ok for r in cleared] == [True]
    assert all(sb.organization(int(org))["custom_fields"][keys[n]["field_code"]] is None
               for n in ("CLV", "Last invoice", "At risk", "Note"))


def test_ensure_fields_creates_once_and_is_found_again(env: Callable[..., Env]) -> None:
    """Fields are created once; a later run finds them by their marker even after a label is renamed."""
    sb, src = env()
    fields = [FieldSpec("ledgerbridge_invoice_number", "Invoice number"),
              FieldSpec("ledgerbridge_paid", "Paid", "bool"),
              FieldSpec("ledgerbridge_synced_at", "Synced at", "datetime")]
    src.ensure_fields("customer", fields)
    creates = src.stats.by_endpoint.get("POST /api/v2/organizationFields")
    assert creates == 3
    src.ensure_fields("customer", fields)
    assert src.stats.by_endpoint.get("POST /api/v2/organizationFields") == 3
    created = {f["field_name"]: f for f in sb.fields_of("organization") if f["is_custom_field"]}
    assert created["Paid"]["field_type"] == "enum"
    assert [o["label"] for o in created["Paid"]["options"]] == ["Yes", "No"]
    assert created["Synced at"]["field_type"] == "varchar"
    for f in sb._fields["organization"]:
        if f.name == "Invoice number":
            f.name = "N° de facture"  # a user renames the label in Pipedrive
    block = {"type": "pipedrive", "api_token": TOKEN, "time_scale": SCALE, "burst_limit": 80}
    later = PipedriveSource.from_config(block, _MemoryTokens(), transport=sb.transport())
    try:
        later.ensure_fields("customer", fields)
        assert "POST /api/v2/organizationFields" not in later.stats.by_endpoint
        [result] = later.write_fields("customer", [FieldUpdate("3", {"ledgerbridge_invoice_number": "F-3",
                                                                     "ledgerbridge_paid": True,
                                                                     "ledgerbridge_synced_at": dt.datetime(
                                                                         2026, 2, 1, 9, 30, tzinfo=dt.UTC)})])
    finally:
        later.close()
    assert result.ok
    custom = sb.organization(3)["custom_fields"]
    assert custom[created["Invoice number"]["field_code"]] == "F-3"
    assert custom[created["Paid"]["field_code"]] == created["Paid"]["options"][0]["id"]
    assert custom[created["Synced at"]["field_code"]] == "2026-02-01T09:30:00Z"


def test_faults_are_retried_without_duplicates(env: Callable[..., Env]) -> None:
    """Injected 429s, 5xx and dropped connections are retried; each deal still comes once and writes land once."""
    sb, src = env({"faults": "429=0.08,503=0.06,502=0.03,drop=0.03"}, list_limit=40)
    pages = pull(src, page_size=30)
    assert sorted(ids(pages), key=int) == everyone(sb)
    check_order(pages)
    injected = sb.stats()["faults_injected"]
    assert injected.get("429", 0) > 0
    assert injected.get("503", 0) + injected.get("502", 0) > 0
    assert src.stats.rate_limited == injected["429"]
    assert src.stats.retries == sum(injected.values())
    assert src.client.tokens_spent == sb.stats()["tokens_charged"]  # refused and failed calls cost nothing
    src.ensure_fields("deal", [FieldSpec("ledgerbridge_invoice_number", "Invoice number")])
    results = src.write_fields("deal", [FieldUpdate(str(d), {"ledgerbridge_invoice_number": f"N-{d}"})
                                        for d in sb.deal_ids()[:30]])
    assert all(r.ok for r in results)
    assert sum(1 for f in sb.fields_of("deal") if f["field_name"] == "Invoice number") == 1


def test_no_token_ever_travels_in_a_url(env: Callable[..., Env]) -> None:
    """Every request the adapter sends authenticates by header; none carries api_token in its query string."""
    sb, src = env({"faults": "503=0.05"})
    pull(src, page_size=50)
    src.get_deals([str(i) for i in sb.deal_ids()[:5]])
    src.ensure_fields("deal", [FieldSpec("ledgerbridge_invoice_number", "Invoice number")])
    src.write_fields("deal", [FieldUpdate(str(sb.deal_ids()[0]), {"ledgerbridge_invoice_number": "A"})])
    assert len(sb.access_log) > 10
    assert not [e for e in sb.access_log if e["api_token_in_query"] or "api_token" in e["query"]]
    assert {e["auth"] for e in sb.access_log} == {"header"}


def test_bad_token_is_an_auth_error_without_the_token(env: Callable[..., Env]) -> None:
    """A rejected token is an AuthError (401) whose text never contains the token."""
    _sb, src = env(api_token="pd-secret-wrong-token")
    with pytest.raises(AuthError) as caught:
        pull(src)
    assert caught.value.status == 401
    assert "wrong-token" not in str(caught.value)
    assert src.stats.retries == 0


def test_daily_budget_exhausted_stops_with_quota_error(env: Callable[..., Env]) -> None:
    """When the company's token budget runs out mid-pull, QuotaExhaustedError stops it and no call is retried."""
    sb, src = env({"daily_token_budget": 60}, list_limit=50)
    with pytest.raises(QuotaExhaustedError) as caught:
        pull(src, page_size=50)
    assert caught.value.status == 429
    refused = sb.stats()["quota_refused"]
    assert refused == 1
    with pytest.raises(QuotaExhaustedError):
        src.get_deals(["1"])
    assert sb.stats()["quota_refused"] == refused  # known exhausted: not even sent
    assert src.stats.retries == 0


def test_daily_allowance_is_enforced_before_sending(env: Callable[..., Env]) -> None:
    """With a daily_token_allowance, the connector stops itself before a call would overspend it."""
    sb, src = env(daily_token_allowance=45)
    with pytest.raises(QuotaExhaustedError, match="allowance"):
        pull(src, page_size=50)
    assert src.client.tokens_spent <= 45
    assert sb.stats()["tokens_charged"] == src.client.tokens_spent
    assert sb.stats()["quota_refused"] == 0


def test_proactive_pacing_avoids_429(env: Callable[..., Env]) -> None:
    """With the sandbox allowing 8 requests per 2 s, the adapter's burst budget keeps it from any 429."""
    sb, src = env({"burst_limit": 8}, burst_limit=8, list_limit=40)
    pages = pull(src, page_size=40)
    assert len(ids(pages)) == len(sb.deal_ids())
    assert src.stats.calls > 8
    assert src.stats.rate_limited == 0
    assert sb.stats()["rate_limited"] == 0


def test_oauth_refreshes_through_the_token_store(book: Book) -> None:
    """With an OAuth app, the adapter refreshes once, saves the token set, and calls with a bearer token."""
    sb = PipedriveSandbox(seed=21, clock=Clock(SCALE), oauth_client=("app-id", "app-secret"))
    sb.load_book(book)
    store = _MemoryTokens()
    src = PipedriveSource.from_config({
        "type": "pipedrive", "client_id": "app-id", "client_secret": "app-secret",
        "refresh_token": sb.issue_refresh_token(), "token_url": "https://oauth.pipedrive.com/oauth/token",
        "time_scale": SCALE, "burst_limit": 80}, store, transport=sb.transport())
    try:
        deals = src.get_deals(["1", "2", "3"])
    finally:
        src.close()
    assert [d.crm_id for d in deals] == ["1", "2", "3"]
    assert set(store.saved) == {"pipedrive:app-id"}
    assert store.saved["pipedrive:app-id"]["access_token"]
    assert {e["auth"] for e in sb.access_log if e["path"] != "/oauth/token"} == {"bearer"}


def test_settings_are_validated() -> None:
    """A block without credentials, with two kinds of credentials, or with an unknown key is a ConfigError."""
    store = _MemoryTokens()
    with pytest.raises(ConfigError, match="api_token"):
        PipedriveSource.from_config({"type": "pipedrive"}, store)
    with pytest.raises(ConfigError, match="either"):
        PipedriveSource.from_config({"type": "pipedrive", "api_token": TOKEN, "client_id": "x",
                                     "client_secret": "y"}, store)
    with pytest.raises(ConfigError, match="colour"):
        PipedriveSource.from_config({"type": "pipedrive", "api_token": TOKEN, "colour": "blue"}, store)
    with pytest.raises(ConfigError, match="list_limit"):
        PipedriveSource.from_config({"type": "pipedrive", "api_token": TOKEN, "list_limit": 501}, store)

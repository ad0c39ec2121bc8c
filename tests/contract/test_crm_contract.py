"""The contract every CRM connector keeps, checked against its sandbox for each registered ``ledgerbridge.crm``.

Each test runs once per connector that :func:`connectors.registry.available` lists; the vendor specifics (how to
build and act on the sandbox) come from ``crm_kits.py``. A registered connector without a kit fails the suite.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.domain import Deal
from connectors.errors import AuthError, ConnectorError, LedgerBridgeError
from connectors.hubspot import HubSpotSource
from connectors.interfaces import CrmSource, Cursor, DealPage, FieldSpec, FieldUpdate
from connectors.registry import available, connector_class, registered
from connectors.sandboxkit import SandboxApp, SandboxServer, serve
from connectors.seedbook import Book
from connectors.xero.testing import MemoryTokenStore
from tests.contract.crm_kits import KITS, CrmKit, StepClock

VENDORS = available("crm")
PAGE = 10
DEALS = 40
#: A book size whose seeded activities leave some deals without any (two, for SEED).
ACTIVITY_DEALS = 60
FAULTS = "429=0.1,503=0.1"
#: Before every deal of the seeded book (2024 onwards), so that the tied deals are the first pages of a pull.
TIE = dt.datetime(2023, 6, 1, 8, 0, tzinfo=dt.UTC)
DEAD_URL = "http://127.0.0.1:9"
FIELDS = (FieldSpec("ledgerbridge_invoice_number", "Invoice number"),
          FieldSpec("ledgerbridge_invoiced_amount", "Invoiced amount", "number"),
          FieldSpec("ledgerbridge_invoiced_on", "Invoiced on", "date"))

each_crm = pytest.mark.parametrize("vendor", VENDORS)


def kit_for(vendor: str) -> CrmKit:
    kit = KITS.get(vendor)
    if kit is None:
        pytest.fail(f"the CRM connector {vendor!r} is registered but has no contract kit: add a CrmKit subclass for "
                    f"it to tests/contract/crm_kits.py (and to KITS) so that the CRM contract suite runs against it")
    return kit


class Tokens(MemoryTokenStore):
    """The token store, remembering which connections were saved."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: set[str] = set()

    def save(self, connection: str, token: dict[str, Any]) -> None:
        super().save(connection, token)
        self.connections.add(connection)


@dataclass
class Crm:
    """One vendor's fresh sandbox behind the module's server, and the connectors built against it."""

    vendor: str
    kit: CrmKit
    sandbox: SandboxApp
    server: SandboxServer
    oauth: bool
    tokens: Tokens = field(default_factory=lambda: Tokens())
    sources: list[CrmSource] = field(default_factory=list)
    block: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.block = self.kit.settings(self.sandbox, self.server.url, oauth=self.oauth)

    def source(self, **overrides: Any) -> CrmSource:
        """A new connector instance (a new process, as far as it knows) sharing the token store."""
        cls = connector_class("crm", self.vendor)
        src = cls.from_config({**self.block, **overrides}, self.tokens)
        self.sources.append(src)
        return src

    def until(self) -> dt.datetime:
        """The run's upper bound: the vendor's now (its clock is compressed), plus a minute."""
        return dt.datetime.fromtimestamp(self.sandbox.clock.now(), dt.UTC) + dt.timedelta(minutes=1)

    def pull(self, src: CrmSource, since: Cursor | None = None, page_size: int = PAGE) -> list[DealPage]:
        return list(src.changed_deals(since, self.until(), page_size))

    def deals(self) -> dict[str, dict[str, Any]]:
        """The sandbox's live deals by id, from its ``GET /_sandbox/deals``."""
        with httpx.Client(base_url=self.server.url, timeout=30) as admin:
            rows = admin.get("/_sandbox/deals").json()
        return {str(r["id"]): r for r in rows}

    def won_ids(self) -> list[str]:
        return [i for i, r in self.deals().items() if r["won"]]

    def close(self) -> None:
        for src in self.sources:
            src.close()


OpenCrm = Callable[..., Crm]


@pytest.fixture
def crm(servers: dict[str, SandboxServer]) -> Iterator[OpenCrm]:
    """Opens a vendor's fresh sandbox (seeded book, optional fault plan or OAuth app) behind its server."""
    opened: list[Crm] = []

    def open_crm(vendor: str, *, deals: int = DEALS, faults: str | None = None, oauth: bool = False) -> Crm:
        kit = kit_for(vendor)
        sb = kit.build(deals=deals, faults=faults, clock=StepClock(), oauth=oauth)
        server = servers.get(vendor)
        if server is None:
            server = servers[vendor] = serve(sb)
        server.app = sb
        env = Crm(vendor, kit, sb, server, oauth)
        opened.append(env)
        return env

    yield open_crm
    for env in opened:
        env.close()


def ids(pages: list[DealPage]) -> list[str]:
    return [d.crm_id for p in pages for d in p.deals]


def crash_after(env: Crm, n: int) -> list[DealPage]:
    """The first ``n`` pages of a full pull by an instance that then dies (closed, never to resume itself)."""
    crashed = env.source()
    first: list[DealPage] = []
    for page in crashed.changed_deals(None, env.until(), PAGE):
        first.append(page)
        if len(first) == n:
            break
    crashed.close()
    assert len(first) == n
    return first


def check_pages(pages: list[DealPage], page_size: int = PAGE) -> None:
    """Pages are non-empty and at most ``page_size``; cursors never go back and cover every deal handed out."""
    assert pages
    assert all(0 < len(p.deals) <= page_size for p in pages)
    cursors = [p.cursor for p in pages if p.cursor is not None]
    assert cursors == sorted(cursors)
    latest: dt.datetime | None = None
    for p in pages:
        for d in p.deals:
            latest = d.updated_at if latest is None else max(latest, d.updated_at)
        if p.cursor is not None:
            assert latest is not None
            assert p.cursor.value >= latest


def check_deal(deal: Deal, row: dict[str, Any]) -> None:
    """A deal agrees with the sandbox's row; a won one carries its customer and lines adding up to its amount."""
    assert deal.is_won == row["won"], deal.crm_id
    assert deal.amount == Decimal(str(row["amount"])), deal.crm_id
    assert deal.currency == row["currency"], deal.crm_id
    assert not deal.archived, deal.crm_id
    if deal.is_won:
        assert deal.customer is not None, deal.crm_id
        assert deal.line_items, deal.crm_id
        assert deal.lines_net_total() == deal.amount, deal.crm_id


def check_metrics_fields(deal: Deal, row: dict[str, Any], book: Book) -> None:
    """A live deal carries its creation time, whether it is closed, a probability on the 0..1 scale (1 once won,
    0 once lost) and its customer with the book's creation order and acquisition channel."""
    bd = book.deal(row["book_id"])
    assert deal.is_closed == row["closed"] == bd.is_closed, deal.crm_id
    assert deal.created_at is not None, deal.crm_id
    assert abs(deal.created_at - bd.created_at) < dt.timedelta(seconds=1), deal.crm_id  # Pipedrive keeps seconds
    assert deal.acquisition_source == bd.acquisition_source, deal.crm_id
    assert deal.probability is not None, deal.crm_id
    assert 0 <= deal.probability <= 1, deal.crm_id
    if deal.is_won:
        assert deal.probability == 1, deal.crm_id
    elif deal.is_closed:
        assert deal.probability == 0, deal.crm_id
    else:
        assert 0 < deal.probability < 1, deal.crm_id
    c = deal.customer
    assert c is not None, deal.crm_id
    assert c.acquisition_source == book.company(bd.company_id).acquisition_source, deal.crm_id
    assert c.created_at is not None, deal.crm_id
    assert c.created_at <= deal.created_at, deal.crm_id


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those a traceback would show with it (causes, unsuppressed contexts)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
    return out


def _secrets(env: Crm, overrides: dict[str, Any]) -> list[str]:
    """Every credential value in the settings block: the fields the connector's Settings hold as SecretStr."""
    model = connector_class("crm", env.vendor).Settings
    block = {**env.block, **overrides}
    return [str(block[name]) for name, f in model.model_fields.items()
            if "SecretStr" in repr(f.annotation) and block.get(name)]


def check_clean(exc: ConnectorError, secrets: list[str]) -> None:
    """Only LedgerBridge errors in the chain, and no credential in any message or body excerpt."""
    for e in _chain(exc):
        assert isinstance(e, LedgerBridgeError), f"{type(e).__module__}.{type(e).__name__} escaped the adapter"
        texts = [str(e), repr(e)]
        if isinstance(e, ConnectorError):
            texts += [e.detail, e.body or ""]
        for secret in secrets:
            assert all(secret not in t for t in texts), "a credential is in an error message"


# -- the suite ------------------------------------------------------------------------------------------------

def test_every_registered_crm_has_a_kit() -> None:
    """Every connector registered under ledgerbridge.crm has a contract kit; a missing one fails here."""
    assert VENDORS, "no CRM connector is registered"
    for vendor in VENDORS:
        assert kit_for(vendor).vendor == vendor
        assert connector_class("crm", vendor).vendor == vendor


def test_a_crm_without_a_kit_fails_the_suite() -> None:
    """A CRM registered without a kit fails (not skips) with a message saying where to add one."""
    with registered("crm", "contract-probe", HubSpotSource):
        assert "contract-probe" in available("crm")
        with pytest.raises(pytest.fail.Exception, match=r"tests/contract/crm_kits\.py"):
            kit_for("contract-probe")


@each_crm
def test_a_full_pull_pages_to_the_end(vendor: str, crm: OpenCrm) -> None:
    """changed_deals(None) yields every deal exactly once over several pages, cursors never go back, won deals whole."""
    env = crm(vendor)
    pages = env.pull(env.source())
    check_pages(pages)
    assert len(pages) >= DEALS // PAGE
    assert pages[-1].cursor is not None
    rows = env.deals()
    got = ids(pages)
    assert Counter(got) == Counter(list(rows))
    stamps = [d.updated_at for p in pages for d in p.deals]
    assert stamps == sorted(stamps)
    for p in pages:
        for d in p.deals:
            check_deal(d, rows[d.crm_id])
    assert sum(d.is_won for p in pages for d in p.deals) >= 5


@each_crm
def test_resume_after_a_crash_yields_exactly_the_rest(vendor: str, crm: OpenCrm) -> None:
    """A pull abandoned after its second page resumes, in a new instance, with exactly the deals not yet handed out."""
    env = crm(vendor)
    reference = ids(env.pull(env.source()))
    first = crash_after(env, 2)
    cursor = first[-1].cursor
    assert cursor is not None
    done = ids(first)
    rest = env.pull(env.source(), since=cursor)
    check_pages(rest)
    assert Counter(done + ids(rest)) == Counter(list(env.deals()))
    assert ids(rest) == reference[len(done):]


@each_crm
def test_resume_inside_a_timestamp_tie_yields_exactly_the_rest(vendor: str, crm: OpenCrm) -> None:
    """With 25 deals sharing one timestamp, a crash after the second page (inside the tie) resumes exactly."""
    env = crm(vendor)
    tied = list(env.deals())[5:30]
    env.kit.touch(env.sandbox, tied, TIE)
    reference = env.pull(env.source())
    check_pages(reference)
    everything = ids(reference)
    assert sorted(everything[:25]) == sorted(tied)
    assert {d.updated_at for p in reference for d in p.deals if d.crm_id in tied} == {TIE}
    first = crash_after(env, 2)
    cursor = first[-1].cursor
    assert cursor is not None
    assert cursor.value == TIE  # the crash happened inside the tie
    done = ids(first)
    assert 0 < len(done) < 25
    for page_size in (PAGE, 7):
        rest = env.pull(env.source(), since=cursor, page_size=page_size)
        check_pages(rest, page_size)
        assert not set(done) & set(ids(rest))
        assert Counter(done + ids(rest)) == Counter(list(env.deals()))
        assert ids(rest) == everything[len(done):]


@each_crm
def test_an_incremental_pull_returns_exactly_the_modified_deals(vendor: str, crm: OpenCrm) -> None:
    """Three deals edited after the cursor are exactly what the next pull returns; the one after it is empty."""
    env = crm(vendor)
    src = env.source()
    cursor = env.pull(src)[-1].cursor
    assert cursor is not None
    edited = list(env.deals())[3:6]
    for deal_id in edited:
        env.kit.modify(env.sandbox, deal_id)
    pages = env.pull(src, since=cursor)
    check_pages(pages)
    got = ids(pages)
    assert sorted(got) == sorted(edited)
    rows = env.deals()
    for p in pages:
        for d in p.deals:
            assert d.updated_at > cursor.value
            check_deal(d, rows[d.crm_id])
    after = pages[-1].cursor
    assert after is not None
    assert after > cursor
    assert env.pull(env.source(), since=after) == []


@each_crm
def test_a_retracted_invoiced_deal_comes_back_archived(vendor: str, crm: OpenCrm) -> None:
    """An invoiced won deal deleted (HubSpot: archived) comes back archived=True; one merely put aside stands."""
    env = crm(vendor)
    src = env.source()
    gone, shelved = env.won_ids()[:2]
    src.ensure_fields("deal", FIELDS[:1])
    written = src.write_fields("deal", [FieldUpdate(gone, {FIELDS[0].name: "INV-2026-0001"})])
    assert [r.ok for r in written] == [True]
    cursor = env.pull(src)[-1].cursor
    assert cursor is not None
    env.kit.retract(env.sandbox, gone)
    # Only where the vendor can hide a deal without taking it back (Pipedrive's archive tidies the views).
    shelves = env.kit.shelve(env.sandbox, shelved)
    pages = env.pull(env.source(), since=cursor)
    check_pages(pages)
    reported = [d for p in pages for d in p.deals]
    assert gone in {d.crm_id for d in reported}
    assert all(d.archived for d in reported if d.crm_id == gone)
    [again] = env.source().get_deals([gone])
    assert (again.crm_id, again.archived) == (gone, True)
    assert gone not in env.deals()
    if shelves:
        assert [d.archived for d in reported if d.crm_id == shelved] == [False]
        [kept] = src.get_deals([shelved])
        assert (kept.crm_id, kept.archived, kept.is_won) == (shelved, False, True)
        assert kept.customer is not None
        assert kept.lines_net_total() == kept.amount
    else:
        assert shelved not in {d.crm_id for d in reported}


@each_crm
def test_get_deals_keeps_the_order_and_leaves_unknown_ids_out(vendor: str, crm: OpenCrm) -> None:
    """get_deals returns the known deals in the order asked, hydrated; unknown and malformed ids are left out."""
    env = crm(vendor)
    rows = env.deals()
    won = [i for i, r in rows.items() if r["won"]]
    other = [i for i, r in rows.items() if not r["won"]]
    wanted = [won[2], other[0], won[0], other[3], won[1]]
    asked = [wanted[0], env.kit.unknown_id, wanted[1], wanted[2], "no-such-deal", wanted[3], wanted[4]]
    got = env.source().get_deals(asked)
    assert [d.crm_id for d in got] == wanted
    for d in got:
        check_deal(d, rows[d.crm_id])
    assert env.source().get_deals([env.kit.unknown_id]) == []


@each_crm
def test_deals_carry_probability_creation_and_acquisition(vendor: str, crm: OpenCrm) -> None:
    """Every deal of a pull, and of get_deals, carries created_at, is_closed, a probability in [0, 1] (1 when won,
    0 when lost) and its customer (open and lost deals too) with created_at and the acquisition channel."""
    env = crm(vendor)
    book = env.kit.book(DEALS)
    rows = env.deals()
    deals = [d for p in env.pull(env.source()) for d in p.deals]
    assert len(deals) == len(rows)
    for d in deals:
        check_metrics_fields(d, rows[d.crm_id], book)
    assert {d.is_won for d in deals} == {True, False}
    assert any(not d.is_closed for d in deals)
    assert any(d.is_closed and not d.is_won for d in deals)
    sample = [d.crm_id for d in deals if not d.is_closed][:3] + [d.crm_id for d in deals if d.is_closed][:3]
    for d in env.source().get_deals(sample):
        check_metrics_fields(d, rows[d.crm_id], book)


@each_crm
def test_activity_counts_are_the_seeded_activities(vendor: str, crm: OpenCrm) -> None:
    """activity_counts gives, per deal and kind, the activities the sandbox holds, which are the book's: for a few
    deals and for all of them; deals without any, unknown and malformed ids are absent; no ids give {}."""
    env = crm(vendor, deals=ACTIVITY_DEALS)
    book = env.kit.book(ACTIVITY_DEALS)
    rows = env.deals()
    held = {i: r["activities"] for i, r in rows.items() if r["activities"]}
    for i, r in rows.items():
        assert r["activities"] == dict(Counter(a.kind for a in book.activities(book.deal(r["book_id"])))), i
    assert 0 < len(held) < len(rows)  # some deals of this book have no activity at all
    assert {k for counts in held.values() for k in counts} == {"call", "meeting", "email", "task"}
    src = env.source()
    assert src.activity_counts([]) == {}
    few = list(rows)[:6]
    assert src.activity_counts([*few, env.kit.unknown_id, "no-such-deal"]) == {i: held[i] for i in few if i in held}
    assert src.activity_counts(list(rows)) == held
    assert src.activity_counts([env.kit.unknown_id]) == {}


@each_crm
def test_activity_counts_survive_429_and_5xx(vendor: str, crm: OpenCrm) -> None:
    """Under seeded 429 and 503 faults the counts are still exact: the reads are retried, never counted twice."""
    env = crm(vendor, faults=FAULTS)
    rows = env.deals()
    src = env.source()
    assert src.activity_counts(list(rows)) == {i: r["activities"] for i, r in rows.items() if r["activities"]}
    few = list(rows)[:5]
    assert src.activity_counts(few) == {i: rows[i]["activities"] for i in few if rows[i]["activities"]}
    injected = sum(env.sandbox.stats()["faults_injected"].values())
    assert injected > 0
    assert src.stats.retries >= injected


@each_crm
def test_write_back_in_batches_isolates_the_poison_records(vendor: str, crm: OpenCrm) -> None:
    """Over more than one batch, a bad value and an unknown id fail alone; the rest is written; fields made once."""
    kit = kit_for(vendor)
    env = crm(vendor, deals=max(DEALS, kit.write_records + 5))
    src = env.source()

    def creates(s: CrmSource) -> int:
        return sum(n for k, n in s.stats.by_endpoint.items() if k.startswith(kit.field_create_endpoints))

    src.ensure_fields("deal", FIELDS)
    made = creates(src)
    assert made >= len(FIELDS)
    src.ensure_fields("deal", FIELDS)
    assert creates(src) == made
    later = env.source()
    later.ensure_fields("deal", FIELDS)
    assert creates(later) == 0
    targets = list(env.deals())[:kit.write_records]
    assert len(targets) > kit.write_batch
    number, invoiced_on = Decimal("1234.50"), dt.date(2026, 1, 31)
    updates = [FieldUpdate(d, {FIELDS[0].name: f"INV-{i:04d}", FIELDS[1].name: number, FIELDS[2].name: invoiced_on})
               for i, d in enumerate(targets)]
    poison = targets[len(targets) // 2]
    updates[len(targets) // 2] = FieldUpdate(poison, {FIELDS[1].name: "not a number"})
    updates.append(FieldUpdate(kit.unknown_id, {FIELDS[0].name: "INV-9999"}))
    results = later.write_fields("deal", updates)
    assert [r.object_id for r in results] == [u.object_id for u in updates]
    failed = {r.object_id: r.error for r in results if not r.ok}
    assert set(failed) == {poison, kit.unknown_id}
    assert all(failed.values())
    for i, d in enumerate(targets):
        if d == poison:
            assert kit.read_field(env.sandbox, d, FIELDS[1]) is None
            continue
        assert kit.read_field(env.sandbox, d, FIELDS[0]) == f"INV-{i:04d}"
        assert Decimal(str(kit.read_field(env.sandbox, d, FIELDS[1]))) == number
        assert str(kit.read_field(env.sandbox, d, FIELDS[2]))[:10] == invoiced_on.isoformat()


@each_crm
def test_429_and_5xx_are_retried_and_every_deal_still_comes_once(vendor: str, crm: OpenCrm) -> None:
    """Under seeded 429 and 503 faults the full pull still yields every deal exactly once; retries are counted."""
    env = crm(vendor, faults=FAULTS)
    src = env.source()
    pages = env.pull(src)
    check_pages(pages)
    rows = env.deals()
    assert Counter(ids(pages)) == Counter(list(rows))
    for p in pages:
        for d in p.deals:
            check_deal(d, rows[d.crm_id])
    injected = env.sandbox.stats()["faults_injected"]
    assert injected.get("429", 0) > 0
    assert injected.get("503", 0) > 0
    assert src.stats.retries > 0
    assert src.stats.rate_limited > 0
    assert src.stats.retries >= sum(injected.values())


@each_crm
def test_an_expired_token_mid_pull_is_refreshed_once(vendor: str, crm: OpenCrm) -> None:
    """OAuth connectors refresh once when the access token expires mid-pull and keep the new token set.

    Salesforce (refresh-token flow, rotating here) and Pipedrive (its OAuth option) refresh exactly once and the
    pull completes; the token store then holds the (rotated) refresh token, which a new instance carries on with.
    HubSpot uses a private-app token and its adapter has no refresh flow: a token revoked mid-pull must end the
    pull with connectors.errors.AuthError, whose text carries no token.
    """
    kit = kit_for(vendor)
    endpoint = kit.token_endpoint
    if endpoint is None:
        env = crm(vendor)
        src = env.source()
        stream = src.changed_deals(None, env.until(), PAGE)
        assert next(stream).deals
        kit.revoke(env.sandbox)
        with pytest.raises(AuthError) as caught:
            list(stream)
        assert caught.value.status == 401
        check_clean(caught.value, _secrets(env, {}))
        return
    env = crm(vendor, deals=kit.midpull_deals, oauth=True)
    initial = env.block["refresh_token"]
    src = env.source()
    stream = src.changed_deals(None, env.until(), PAGE)
    pages = [next(stream)]
    refreshes, calls = src.stats.by_endpoint.get(endpoint, 0), src.stats.calls
    assert refreshes == 1  # the first access token
    kit.expire_access(env.sandbox)
    pages += list(stream)
    assert src.stats.by_endpoint.get(endpoint, 0) == refreshes + 1
    assert src.stats.calls > calls + 1  # calls were made with the expired token, then with the new one
    check_pages(pages)
    assert Counter(ids(pages)) == Counter(list(env.deals()))
    [connection] = env.tokens.connections  # one token set, under the connector's connection name
    stored = env.tokens.load(connection)
    assert stored is not None
    assert stored["access_token"]
    if kit.rotates_refresh_tokens:
        assert stored["refresh_token"] != initial
    else:
        assert stored["refresh_token"] == initial
    # A new process with the same store uses the stored token set: no refresh, even with a dead initial token.
    later = env.source(refresh_token="contract-long-dead-refresh-token") if kit.rotates_refresh_tokens \
        else env.source()
    some = ids(pages)[:3]
    assert [d.crm_id for d in later.get_deals(some)] == some
    assert later.stats.by_endpoint.get(endpoint, 0) == 0


@each_crm
def test_no_vendor_exception_escapes_and_no_token_leaks(vendor: str, crm: OpenCrm) -> None:
    """A refused credential is an AuthError and an unreachable host a ConnectorError; no vendor type, no token."""
    kit = kit_for(vendor)
    env = crm(vendor)
    bad = kit.bad_credentials()
    with pytest.raises(AuthError) as refused:
        env.pull(env.source(**bad))
    check_clean(refused.value, _secrets(env, bad))
    assert refused.value.vendor == vendor
    dead = kit.unreachable(DEAD_URL)
    with pytest.raises(ConnectorError) as unreachable:
        env.source(**dead).get_deals(list(env.deals())[:1])
    check_clean(unreachable.value, _secrets(env, dead))
    assert not isinstance(unreachable.value, AuthError)

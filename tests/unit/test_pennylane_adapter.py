"""PennylaneLedger against the in-process Pennylane sandbox: customers, invoices without idempotency keys,
ambiguous writes and the delayed reference lookup, changelog reads, payments, limits, auth and secrets."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.domain import Address, Customer, Invoice, InvoiceLine
from connectors.errors import AmbiguousWriteError, AuthError, ConfigError, TransientError, VendorError
from connectors.interfaces import InvoiceRequest
from connectors.pennylane import PennylaneLedger
from connectors.pennylane.sandbox import DEMO_API_TOKEN, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, PennylaneSandbox
from connectors.pennylane.settings import PennylaneSettings
from connectors.registry import connector_class
from connectors.sandboxkit import FaultPlan
from connectors.xero.testing import ManualClock, MemoryTokenStore

CANARY_TOKEN = "canary-pennylane-token-4f1c2e"


class FakeTime:
    """Client sleeps move the sandbox clock: the client and the simulated Pennylane share one timeline."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock

    def sleep(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def monotonic(self) -> float:
        return self.clock.now()


class Recorder:
    """A transport that hands requests to the sandbox and keeps (method, path, query) of each."""

    def __init__(self, sandbox: PennylaneSandbox) -> None:
        self.sandbox = sandbox
        self.calls: list[tuple[str, str, dict[str, list[str]]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = urlsplit(str(request.url))
        self.calls.append((request.method, url.path, parse_qs(url.query)))
        return self.sandbox.handle_httpx(request)

    def creates(self) -> list[int]:
        return [n for n, (m, p, _) in enumerate(self.calls) if m == "POST" and p.endswith("/customer_invoices")]

    def reference_lookups(self) -> list[tuple[int, str]]:
        out = []
        for n, (m, p, q) in enumerate(self.calls):
            if m == "GET" and p.endswith("/customer_invoices") and "filter" in q:
                for cond in json.loads(q["filter"][0]):
                    if cond["field"] == "external_reference":
                        out.append((n, cond["value"]))
        return out


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> PennylaneSandbox:
    return PennylaneSandbox(clock=clock, seed=7, reference_lookup_delay_s=60)


def make_ledger(sandbox: PennylaneSandbox, clock: ManualClock, *, transport: httpx.BaseTransport | None = None,
                ledger_clock: Callable[[], float] | None = None, **overrides: Any) -> PennylaneLedger:
    fake = FakeTime(clock)
    fields: dict[str, Any] = {"api_token": DEMO_API_TOKEN, **overrides}
    return PennylaneLedger(PennylaneSettings(**fields), MemoryTokenStore(),
                           transport=transport or sandbox.transport(), sleep=fake.sleep, monotonic=fake.monotonic,
                           clock=ledger_clock or clock.now)


def customer(n: int) -> Customer:
    return Customer(crm_id=f"C{n:04d}", name=f"Société {n} SAS", email=f"compta{n}@societe{n}.fr",
                    vat_number="FR40303265045", siren="303265045", country="FR", currency="EUR",
                    address=Address(line1=f"{n} rue de la Paix", line2="Bât. B", city="Lyon", postal_code="69002",
                                    country="FR"))


def request(ref: str, customer_id: str, *, status: str = "authorised", tax_type: str | None = "FR_200",
            currency: str = "EUR", lines: list[InvoiceLine] | None = None) -> InvoiceRequest:
    lines = lines or [
        InvoiceLine(description="Journée de conseil", quantity=Decimal("2.5"), unit_price=Decimal("850.00"),
                    tax_rate=Decimal(20), tax_type=tax_type, item_code="CONSEIL-J"),
        InvoiceLine(description="Guide pratique", quantity=Decimal(3), unit_price=Decimal("34.00"),
                    discount_percent=Decimal("12.5"), tax_rate=Decimal("5.5"), tax_type="FR_55"),
    ]
    inv = Invoice(reference=ref, currency=currency, lines=lines, issue_date=dt.date(2026, 1, 10),
                  due_date=dt.date(2026, 2, 9), status=status)
    return InvoiceRequest(idempotency_key=f"intent-{ref}", invoice=inv, customer_ledger_id=customer_id)


def one_customer(ledger: PennylaneLedger) -> str:
    return ledger.create_customers([("hubspot:C0001", customer(1))], "customers-1")["hubspot:C0001"].ledger_id


def live(sandbox: PennylaneSandbox) -> list[dict[str, Any]]:
    return [row for row in sandbox.ledger_view() if row["Status"] not in ("DELETED", "VOIDED")]


# == customers =======================================================================================

def test_customers_are_created_once_and_found_by_external_reference(sandbox: PennylaneSandbox,
                                                                    clock: ManualClock) -> None:
    """Company customers carry the number, SIREN, VAT, e-mail and address; a second call creates nothing."""
    ledger = make_ledger(sandbox, clock)
    created = ledger.create_customers([("C0001", customer(1)), ("C0002", customer(2))], "k1")
    assert set(created) == {"C0001", "C0002"}
    stored = {c["external_reference"]: c for c in sandbox.customers()}
    assert stored["C0001"]["reg_no"] == "303265045"
    assert stored["C0001"]["vat_number"] == "FR40303265045"
    assert stored["C0001"]["emails"] == ["compta1@societe1.fr"]
    assert stored["C0001"]["billing_address"] == {"address": "1 rue de la Paix, Bât. B", "postal_code": "69002",
                                                  "city": "Lyon", "country_alpha2": "FR"}
    assert stored["C0001"]["customer_type"] == "company"
    found = ledger.find_customers_by_number(["C0002", "C0001", "C9999"])
    assert {k: v.ledger_id for k, v in found.items()} == {k: v.ledger_id for k, v in created.items()}
    assert found["C0001"].company_id == "303265045"
    assert found["C0001"].email == "compta1@societe1.fr"
    again = ledger.create_customers([("C0001", customer(1)), ("C0003", customer(3))], "k2")
    assert again["C0001"].ledger_id == created["C0001"].ledger_id
    assert sorted(c.number or "" for c in ledger.list_customers()) == ["C0001", "C0002", "C0003"]
    assert sandbox.stats()["customer_creates"] == 3


def test_many_numbers_are_looked_up_with_in_filters_in_chunks(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """120 numbers are found with a few `in` filters on external_reference, resent on every page."""
    rec = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(rec), page_size=20)
    numbers = [f"pipedrive:{i:05d}" for i in range(120)]
    ledger.create_customers([(n, customer(i)) for i, n in enumerate(numbers)], "bulk")
    rec.calls.clear()
    found = ledger.find_customers_by_number(numbers)
    assert set(found) == set(numbers)
    lookups = [q for m, p, q in rec.calls if p.endswith("/customers")]
    assert 6 <= len(lookups) <= 12
    for q in lookups:
        (cond,) = json.loads(q["filter"][0])
        assert (cond["field"], cond["operator"]) == ("external_reference", "in")
        assert len(cond["value"]) <= 50


# == invoices ========================================================================================

def test_invoices_carry_lines_vat_codes_totals_and_the_draft_flag(sandbox: PennylaneSandbox,
                                                                  clock: ManualClock) -> None:
    """Lines by label with VAT codes and string prices; draft -> draft:true; authorised/submitted finalized."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    by_rate = [InvoiceLine(description="Livre", quantity=Decimal(4), unit_price=Decimal("12.345"),
                           tax_rate=Decimal(10))]
    outcomes = ledger.create_invoices([
        request("LB-1", cid), request("LB-2", cid, status="draft"), request("LB-3", cid, status="submitted"),
        request("LB-4", cid, lines=by_rate, currency="USD"),
    ], "batch-1")
    assert [o.ok for o in outcomes] == [True, True, True, True]
    first = outcomes[0].invoice
    assert first is not None
    assert first.ledger_total == request("LB-1", cid).invoice.total == Decimal("2644.16")
    assert first.number == "F20260001"
    assert first.status == "authorised"
    assert first.customer_ledger_id == cid
    assert outcomes[1].invoice is not None
    assert (outcomes[1].invoice.status, outcomes[1].invoice.number) == ("draft", None)
    stored = {inv["external_reference"]: inv for inv in sandbox.invoices()}
    assert [stored[r]["draft"] for r in ("LB-1", "LB-2", "LB-3", "LB-4")] == [False, True, False, False]
    lines = stored["LB-1"]["lines"]
    assert [(ln["label"], ln["vat_rate"], ln["unit_price"], ln["quantity"]) for ln in lines] == [
        ("Journée de conseil", "FR_200", Decimal("850.00"), Decimal("2.5")),
        ("Guide pratique", "FR_55", Decimal("34.00"), Decimal(3))]
    assert lines[1]["discount"] == {"type": "relative", "value": Decimal("12.5")}
    assert stored["LB-4"]["lines"][0]["vat_rate"] == "FR_100"  # derived from the 10 % rate
    assert stored["LB-4"]["currency"] == "USD"
    assert stored["LB-4"]["total"] == request("LB-4", cid, lines=by_rate).invoice.total == Decimal("54.32")


def test_rejected_invoices_come_back_per_invoice(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """A bad VAT code (400), an unknown customer (422) and a non-numeric id fail alone; the rest is created."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    outcomes = ledger.create_invoices([
        request("LB-1", cid), request("LB-2", cid, tax_type="TAX001"), request("LB-3", "999999"),
        request("LB-4", "not-a-number"), request("LB-5", cid, status="paid"), request("LB-6", cid),
    ], "batch")
    assert [o.ok for o in outcomes] == [True, False, False, False, False, True]
    assert [o.idempotency_key for o in outcomes] == [f"intent-LB-{i}" for i in range(1, 7)]
    assert "vat_rate" in (outcomes[1].error or "")
    assert "999999" in (outcomes[2].error or "")
    assert "not a Pennylane customer id" in (outcomes[3].error or "")
    assert "paid" in (outcomes[4].error or "")
    assert sorted(row["Reference"] for row in live(sandbox)) == ["LB-1", "LB-6"]


def test_every_create_is_preceded_by_a_lookup_and_a_found_reference_is_not_created(
        sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """A second create call for a reference the lookup sees creates nothing and returns the first invoice."""
    rec = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(rec))
    cid = one_customer(ledger)
    first = ledger.create_invoices([request("LB-main:D1", cid)], "b1")[0]
    clock.advance(61)
    again = ledger.create_invoices([request("LB-main:D1", cid), request("LB-main:D2", cid)], "b2")
    assert again[0].ok
    assert again[0].invoice is not None
    assert first.invoice is not None
    assert again[0].invoice.ledger_id == first.invoice.ledger_id
    assert again[0].invoice.number == first.invoice.number
    assert again[1].ok
    assert sandbox.stats()["invoice_creates"] == 2
    assert sorted(row["Reference"] for row in live(sandbox)) == ["LB-main:D1", "LB-main:D2"]
    # Each create follows a lookup of its own reference.
    lookups = rec.reference_lookups()
    created_refs = [inv["external_reference"] for inv in sandbox.invoices()]
    for ref, n in zip(created_refs, rec.creates(), strict=True):
        assert any(r == ref and at < n for at, r in lookups)


def test_one_reference_twice_in_a_batch_is_created_once(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """The lookup cannot see a create of the same call yet; the batch itself remembers it."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    outcomes = ledger.create_invoices([request("LB-X", cid), request("LB-X", cid)], "b")
    assert [o.ok for o in outcomes] == [True, True]
    assert outcomes[0].invoice is not None
    assert outcomes[1].invoice is not None
    assert outcomes[0].invoice.ledger_id == outcomes[1].invoice.ledger_id
    assert len(live(sandbox)) == 1


def test_ambiguous_create_raises_and_exactly_one_invoice_exists(sandbox: PennylaneSandbox,
                                                                clock: ManualClock) -> None:
    """A create dropped after commit raises AmbiguousWriteError, is never re-sent, and is adopted later."""
    rec = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(rec))
    cid = one_customer(ledger)
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices([request("LB-A", cid), request("LB-B", cid)], "batch-a")
    assert len(rec.creates()) == 1  # no retry, and the rest of the batch is not sent
    assert ledger.stats.retries == 0
    assert [row["Reference"] for row in live(sandbox)] == ["LB-A"]
    sandbox.faults = FaultPlan(None)
    clock.advance(61)
    found = ledger.find_invoices_by_reference(["LB-A", "LB-B"])
    assert set(found) == {"LB-A"}
    outcomes = ledger.create_invoices([request("LB-A", cid), request("LB-B", cid)], "batch-a")
    assert [o.ok for o in outcomes] == [True, True]
    assert outcomes[0].invoice is not None
    assert outcomes[0].invoice.ledger_id == found["LB-A"].ledger_id
    assert sorted(row["Reference"] for row in live(sandbox)) == ["LB-A", "LB-B"]


def test_right_after_an_ambiguous_create_the_lookup_reports_not_found(sandbox: PennylaneSandbox,
                                                                      clock: ManualClock) -> None:
    """Inside the lookup delay the reference is reported missing, the ledger declares that a miss is not yet
    proof (idempotent_creates False, lookup_settle_s), and the adapter has created only after lookups."""
    rec = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(rec), lookup_settle_s=120, time_scale=2)
    assert PennylaneLedger.idempotent_creates is False
    assert ledger.lookup_settle_s == 60.0  # 120 s of the vendor's clock at time_scale 2
    cid = one_customer(ledger)
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices([request("LB-P", cid)], "batch-p")
    sandbox.faults = FaultPlan(None)
    clock.advance(10)
    assert ledger.find_invoices_by_reference(["LB-P"]) == {}
    assert sandbox.invoice_by_reference("LB-P") is not None
    assert len(sandbox.invoices()) == 1
    creates = rec.creates()
    assert len(creates) == 1
    assert [r for at, r in rec.reference_lookups() if at < creates[0]] == ["LB-P"]
    clock.advance(60)
    assert set(ledger.find_invoices_by_reference(["LB-P"])) == {"LB-P"}


def test_a_taken_reference_409_is_resolved_by_lookup(clock: ManualClock) -> None:
    """Where Pennylane refuses a used external_reference (409), the adapter adopts it or reports ambiguity."""
    sandbox = PennylaneSandbox(clock=clock, reference_lookup_delay_s=60, unique_invoice_reference=True)
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices([request("LB-U", cid)], "b")
    sandbox.faults = FaultPlan(None)
    with pytest.raises(AmbiguousWriteError) as err:
        ledger.create_invoices([request("LB-U", cid)], "b")
    assert err.value.status == 409
    clock.advance(61)
    outcome = ledger.create_invoices([request("LB-U", cid)], "b")[0]
    assert outcome.ok
    assert len(sandbox.invoices()) == 1


def test_only_429_500_503_are_retried(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Reads retry 503 and give up; a 502 read is definitive; a 503 on a create is ambiguous at once."""
    ledger = make_ledger(sandbox, clock, max_attempts=3)
    cid = one_customer(ledger)
    sandbox.faults = FaultPlan("503=1.0")
    with pytest.raises(TransientError):
        ledger.find_customers_by_number(["x"])
    assert ledger.stats.retries == 2
    sandbox.faults = FaultPlan("502=1.0")
    with pytest.raises(VendorError) as err:
        ledger.find_customers_by_number(["x"])
    assert err.value.status == 502
    assert ledger.stats.retries == 2
    sandbox.faults = FaultPlan("w:503=1.0")
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices([request("LB-5", cid)], "b")
    assert ledger.stats.retries == 2


def test_429_is_waited_out_and_pacing_avoids_it(clock: ManualClock) -> None:
    """A 429 (another client spent the window) waits retry-after; remaining 0 in the headers pauses early."""
    sandbox = PennylaneSandbox(clock=clock, requests_per_5s=3)
    other = httpx.Client(transport=sandbox.transport(), base_url="https://app.pennylane.com/api/external/v2",
                         headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"})
    for _ in range(3):
        assert other.get("/customers").status_code == 200
    eager = make_ledger(sandbox, clock, requests_per_5s=1000)
    assert eager.find_customers_by_number(["nobody"]) == {}
    assert sandbox.stats()["rate_limited"] == 1
    assert eager.stats.rate_limited == 1
    for _ in range(9):  # alone on the token, the ratelimit-remaining header is enough to pace it
        assert eager.find_customers_by_number(["nobody"]) == {}
    assert sandbox.stats()["rate_limited"] == 1
    clock.advance(10)
    paced = make_ledger(sandbox, clock, requests_per_5s=3)
    for _ in range(9):
        assert paced.find_customers_by_number(["nobody"]) == {}
    assert sandbox.stats()["rate_limited"] == 1
    assert paced.stats.rate_limited == 0


# == reads ===========================================================================================

def test_list_invoices_reads_the_changelog_since_a_date(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Changes since a recent date come from the changelog; None or a date past retention lists everything."""
    rec = Recorder(sandbox)
    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(rec))
    cid = one_customer(ledger)
    ledger.create_invoices([request("OLD", cid)], "k-old")
    clock.advance(86400)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(60)
    new = ledger.create_invoices([request("NEW", cid), request("NEW-DRAFT", cid, status="draft")], "k-new")
    assert new[0].invoice is not None
    assert new[0].invoice.ledger_id is not None
    sandbox.create_payment(int(new[0].invoice.ledger_id), Decimal("1000.00"))
    rec.calls.clear()
    changed = list(ledger.list_invoices(since))
    assert [i.reference for i in changed] == ["NEW-DRAFT", "NEW"]  # the payment changed NEW last
    assert changed[1].amount_paid == Decimal("1000.00")
    assert changed[1].amount_due == Decimal("1644.16")
    assert [ln.tax_type for ln in changed[1].lines] == ["FR_200", "FR_55"]
    assert [ln.tax_rate for ln in changed[1].lines] == [Decimal(20), Decimal("5.5")]
    assert changed[1].lines[1].discount_percent == Decimal("12.5")
    assert changed[1].total == changed[1].ledger_total
    assert changed[0].status == "draft"
    assert any(p.endswith("/changelogs/customer_invoices") for _, p, _ in rec.calls)
    rec.calls.clear()
    assert sorted(i.reference for i in ledger.list_invoices()) == ["NEW", "NEW-DRAFT", "OLD"]
    assert not any("changelogs" in p for _, p, _ in rec.calls)
    rec.calls.clear()
    old_since = since - dt.timedelta(days=40)
    assert len(list(ledger.list_invoices(old_since))) == 3
    assert not any("changelogs" in p for _, p, _ in rec.calls)


def test_a_changelog_422_falls_back_to_the_full_list(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """When Pennylane's clock says start_date is past retention (422), every invoice is listed instead."""
    ledger = make_ledger(sandbox, clock, ledger_clock=lambda: clock.now() - 3 * 3600)
    cid = one_customer(ledger)
    ledger.create_invoices([request("R1", cid)], "k")
    clock.advance(28 * 86400)
    since = dt.datetime.fromtimestamp(clock.now() - 28 * 86400 - 3600, tz=dt.UTC)  # within reach by our clock
    assert [i.reference for i in ledger.list_invoices(since)] == ["R1"]


def test_lines_beyond_the_included_twenty_come_from_the_sub_resource(sandbox: PennylaneSandbox,
                                                                     clock: ManualClock) -> None:
    """An invoice of 25 lines reads back whole and in order, with include on or off."""
    many = [InvoiceLine(description=f"Ligne {i}", quantity=Decimal(1), unit_price=Decimal(i + 1),
                        tax_rate=Decimal(20), tax_type="FR_200") for i in range(25)]
    for include in (True, False):
        ledger = make_ledger(sandbox, clock, include_lines=include)
        cid = one_customer(ledger)
        ref = f"MANY-{include}"
        ledger.create_invoices([request(ref, cid, lines=many)], "k")
        clock.advance(61)
        found = ledger.find_invoices_by_reference([ref])[ref]
        assert [ln.description for ln in found.lines] == [f"Ligne {i}" for i in range(25)]
        assert found.total == found.ledger_total == Decimal("390.00")


def test_list_payments_reads_each_changed_invoices_payments(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """Payments since a date, from the payments of the invoices that show one."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    outcomes = ledger.create_invoices([request("P1", cid), request("P2", cid)], "k")
    ids = [int(o.invoice.ledger_id) for o in outcomes if o.invoice and o.invoice.ledger_id]
    sandbox.create_payment(ids[0], Decimal("100.00"))
    clock.advance(3600)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(60)
    sandbox.create_payment(ids[0], Decimal("44.16"))
    sandbox.create_payment(ids[1], Decimal("2644.16"))
    recent = list(ledger.list_payments(since))
    assert sorted((p.invoice_ledger_id, p.amount) for p in recent) == [
        (str(ids[0]), Decimal("44.16")), (str(ids[1]), Decimal("2644.16"))]
    assert {p.currency for p in recent} == {"EUR"}
    assert {p.status for p in recent} == {"authorised"}
    assert recent[0].date == dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC).date()
    assert len(list(ledger.list_payments())) == 3


# == config, auth, secrets ===========================================================================

def test_entry_point_and_from_config(sandbox: PennylaneSandbox) -> None:
    """The ledger entry point names PennylaneLedger; from_config builds it and reports bad blocks by field."""
    assert connector_class("ledger", "pennylane") is PennylaneLedger
    ledger = PennylaneLedger.from_config({"type": "pennylane", "api_token": DEMO_API_TOKEN}, MemoryTokenStore(),
                                         transport=sandbox.transport())
    assert ledger.find_customers_by_number(["nobody"]) == {}
    with pytest.raises(ConfigError) as err:
        PennylaneLedger.from_config({"type": "pennylane", "api_token": CANARY_TOKEN, "client_id": "x",
                                     "requests_per_5s": 0}, MemoryTokenStore())
    assert "requests_per_5s" in str(err.value)
    assert CANARY_TOKEN not in str(err.value)
    with pytest.raises(ConfigError):
        PennylaneLedger.from_config({"type": "pennylane"}, MemoryTokenStore())


def test_oauth_tokens_are_refreshed_and_rotated(sandbox: PennylaneSandbox, clock: ManualClock) -> None:
    """With an OAuth client the first refresh token is exchanged, the rotated one saved, and calls succeed."""
    store = MemoryTokenStore()
    first = sandbox.issue_tokens()["refresh_token"]
    ledger = PennylaneLedger(
        PennylaneSettings(client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET, refresh_token=first),
        store, transport=sandbox.transport(), sleep=FakeTime(clock).sleep, monotonic=clock.now, clock=clock.now)
    assert ledger.find_customers_by_number(["nobody"]) == {}
    saved = store.load("pennylane:" + DEMO_CLIENT_ID)
    assert saved is not None
    assert saved["refresh_token"] != first
    assert sandbox.stats()["oauth_refreshes"] == 1


def test_no_token_reaches_an_error_or_a_log(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """The API token never appears in raised errors, outcomes, reprs or captured logs."""
    sandbox = PennylaneSandbox(clock=clock, api_tokens=(CANARY_TOKEN,), reference_lookup_delay_s=0)
    ledger = make_ledger(sandbox, clock, api_token=CANARY_TOKEN, max_attempts=2)
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        cid = one_customer(ledger)
        bad = ledger.create_invoices([request("LB-S", cid, tax_type="BAD")], "k")[0]
        assert not bad.ok
        sandbox.faults = FaultPlan("w:503=1.0")
        try:
            ledger.create_invoices([request("LB-T", cid)], "k")
        except AmbiguousWriteError as exc:
            errors.append(exc)
        sandbox.faults = FaultPlan(None)
        wrong = make_ledger(sandbox, clock, api_token=CANARY_TOKEN + "-revoked")
        try:
            list(wrong.list_invoices())
        except AuthError as exc:
            errors.append(exc)
    assert [type(e) for e in errors] == [AmbiguousWriteError, AuthError]
    text = " ".join([*(str(e) + repr(e) + str(e.__dict__) for e in errors), repr(logs), caplog.text,
                     bad.error or "", repr(ledger.settings), repr(ledger.client.auth), repr(wrong.settings)])
    assert CANARY_TOKEN not in text

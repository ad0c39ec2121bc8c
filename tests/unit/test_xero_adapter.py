"""XeroLedger against the in-process Xero sandbox: customers, invoice batches, ambiguity, reads, limits, secrets."""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.domain import Address, Customer, Invoice, InvoiceLine
from connectors.errors import (
    AmbiguousWriteError,
    AuthError,
    ConfigError,
    QuotaExhaustedError,
    ReauthorizationRequired,
)
from connectors.interfaces import InvoiceRequest
from connectors.sandboxkit import Fault, FaultPlan
from connectors.seedbook import PRODUCTS
from connectors.xero import XeroLedger, wire
from connectors.xero.adapter import home_rate
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, XeroSandbox
from connectors.xero.settings import XeroSettings
from connectors.xero.testing import ManualClock, MemoryTokenStore

CANARY_SECRET = "canary-client-secret-5d1e0b"
CANARY_REFRESH = "canary-refresh-token-77a9c3"


class FakeTime:
    """Client sleeps move the sandbox clock: the client and the simulated Xero share one timeline."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.slept += seconds
        self.clock.advance(seconds)

    def monotonic(self) -> float:
        return self.clock.now()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> XeroSandbox:
    return XeroSandbox(clock=clock, seed=11)


def make_ledger(sandbox: XeroSandbox, clock: ManualClock, store: MemoryTokenStore | None = None,
                transport: httpx.BaseTransport | None = None, max_attempts: int = 8,
                **overrides: Any) -> XeroLedger:
    fake = FakeTime(clock)
    fields: dict[str, Any] = {
        "tenant_id": sandbox.tenant_id,
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "refresh_token": sandbox.issue_tokens()["refresh_token"],
        **overrides,
    }
    return XeroLedger(XeroSettings(**fields), store or MemoryTokenStore(),
                      transport=transport or sandbox.transport(), sleep=fake.sleep, monotonic=fake.monotonic,
                      clock=clock.now, max_attempts=max_attempts)


def customer(n: int, name: str | None = None) -> Customer:
    return Customer(crm_id=f"C{n:04d}", name=name or f"Société {n} SAS", email=f"compta{n}@societe{n}.fr",
                    vat_number="FR40303265045", siren="303265045", country="FR", currency="EUR",
                    address=Address(line1=f"{n} rue de la Paix", city="Lyon", postal_code="69002", country="FR"))


def request(ref: str, contact_id: str, *, tax_type: str = "TAX001", status: str = "authorised",
            currency: str = "EUR") -> InvoiceRequest:
    lines = [
        InvoiceLine(description="Journée de conseil", quantity=Decimal("2.5"), unit_price=Decimal("850.00"),
                    tax_rate=Decimal(20), account_code="706", tax_type=tax_type, item_code=PRODUCTS[0].sku),
        InvoiceLine(description="Guide pratique", quantity=Decimal(3), unit_price=Decimal("34.00"),
                    discount_percent=Decimal("12.5"), tax_rate=Decimal("5.5"), account_code="707",
                    tax_type="TAX003"),
    ]
    inv = Invoice(reference=ref, currency=currency, lines=lines, issue_date=dt.date(2026, 1, 10),
                  due_date=dt.date(2026, 2, 9), status=status)
    return InvoiceRequest(idempotency_key=f"intent-{ref}", invoice=inv, customer_ledger_id=contact_id)


def one_contact(ledger: XeroLedger) -> str:
    return ledger.create_customers([("C0001", customer(1))], "contacts-1")["C0001"].ledger_id


def test_customers_are_created_and_found_by_number(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """Contacts carry number, VAT, company number, address and currency, and are found by number."""
    ledger = make_ledger(sandbox, clock)
    created = ledger.create_customers([("C0001", customer(1)), ("C0002", customer(2))], "key-c")
    assert set(created) == {"C0001", "C0002"}
    stored = {c["ContactNumber"]: c for c in sandbox.contacts()}
    assert stored["C0001"]["TaxNumber"] == "FR40303265045"
    assert stored["C0001"]["CompanyNumber"] == "303265045"
    assert stored["C0001"]["DefaultCurrency"] == "EUR"
    assert stored["C0001"]["Addresses"][0] == {"AddressType": "POBOX", "AddressLine1": "1 rue de la Paix",
                                               "City": "Lyon", "PostalCode": "69002", "Country": "FR"}
    found = ledger.find_customers_by_number(["C0002", "C0001", "C9999"])
    assert {k: v.ledger_id for k, v in found.items()} == {k: v.ledger_id for k, v in created.items()}
    assert found["C0001"].vat_number == "FR40303265045"
    assert found["C0001"].email == "compta1@societe1.fr"
    assert sorted(c.number or "" for c in ledger.list_customers()) == ["C0001", "C0002"]


def test_a_taken_contact_name_gets_the_number_as_suffix(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """Xero contact names are unique: a clash is retried once with the external number appended."""
    ledger = make_ledger(sandbox, clock)
    ledger.create_customers([("C0001", customer(1, "Dupont SARL"))], "k1")
    second = ledger.create_customers([("C0002", customer(2, "Dupont SARL")), ("C0003", customer(3))], "k2")
    assert second["C0002"].name == "Dupont SARL (C0002)"
    assert second["C0003"].name == "Société 3 SAS"
    assert sorted(c["Name"] for c in sandbox.contacts()) == ["Dupont SARL", "Dupont SARL (C0002)", "Société 3 SAS"]


def test_number_lookups_are_chunked_to_short_urls(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """150 numbers (one over 50 characters) are looked up in several where-queries, each URL under 2,000."""
    urls: list[str] = []

    def record(req: httpx.Request) -> httpx.Response:
        urls.append(str(req.url))
        return sandbox.handle_httpx(req)

    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(record))
    long_number = "CRM-" + "x" * 70
    numbers = [f"C{i:05d}" for i in range(149)] + [long_number]
    ledger.create_customers([(n, customer(i)) for i, n in enumerate(numbers)], "bulk")
    found = ledger.find_customers_by_number(numbers)
    assert set(found) == set(numbers)
    number = found[long_number].number
    assert number is not None
    assert len(number) <= 50
    lookups = [u for u in urls if "where=" in u]
    assert len(lookups) >= 2
    assert max(len(u) for u in urls) < 2000


def test_batch_with_one_invalid_invoice_keeps_the_others(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """One PUT creates the valid invoices; the bad one comes back ok=False with Xero's message."""
    ledger = make_ledger(sandbox, clock)
    cid = one_contact(ledger)
    reqs = [request("LB-1", cid), request("LB-2", cid, tax_type="TAX999"), request("LB-3", cid, currency="USD")]
    outcomes = ledger.create_invoices(reqs, "batch-1")
    assert [e["method"] for e in sandbox.request_log if e["path"].endswith("/Invoices")] == ["PUT"]
    assert [o.ok for o in outcomes] == [True, False, True]
    assert [o.idempotency_key for o in outcomes] == ["intent-LB-1", "intent-LB-2", "intent-LB-3"]
    assert "TAX999" in (outcomes[1].error or "")
    first = outcomes[0].invoice
    assert first is not None
    assert first.ledger_id
    assert first.number == "INV-0001"
    assert first.status == "authorised"
    assert first.ledger_total == reqs[0].invoice.total == Decimal("2644.16")
    assert first.lines[0].tax_rate == Decimal(20)
    assert first.lines[1].discount_percent == Decimal("12.5")
    assert first.customer_ledger_id == cid
    assert first.due_date == dt.date(2026, 2, 9)
    stored = sandbox.invoice_by_reference("LB-3")
    assert stored is not None
    assert stored["CurrencyCode"] == "USD"
    assert stored["Status"] == "AUTHORISED"
    assert [i["Reference"] for i in sandbox.invoices()] == ["LB-1", "LB-3"]


def test_ambiguous_write_is_resolved_by_replaying_the_same_key(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A write dropped after commit raises AmbiguousWriteError; the same key later returns the original invoice."""
    ledger = make_ledger(sandbox, clock, max_attempts=2)
    cid = one_contact(ledger)
    reqs = [request("LB-A", cid)]
    sandbox.faults = FaultPlan("drop_after_commit=1.0")
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices(reqs, "batch-a")
    original = sandbox.invoice_by_reference("LB-A")
    assert original is not None
    sandbox.faults = FaultPlan(None)
    outcome = ledger.create_invoices(reqs, "batch-a")[0]
    assert outcome.ok
    assert outcome.invoice is not None
    assert outcome.invoice.ledger_id == original["InvoiceID"]
    assert len(sandbox.invoices()) == 1
    assert ledger.find_invoices_by_reference(["LB-A"])["LB-A"].ledger_id == original["InvoiceID"]


class _DropFirstWrite(FaultPlan):
    def __init__(self) -> None:
        super().__init__(None)
        self.dropped = False

    def decide(self, is_write: bool) -> Fault | None:
        if is_write and not self.dropped:
            self.dropped = True
            return Fault("drop_after_commit")
        return None


def test_dropped_answer_is_retried_with_the_same_key(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """The retry layer resends the identical write; Xero replays its answer, so one invoice exists."""
    ledger = make_ledger(sandbox, clock)
    cid = one_contact(ledger)
    sandbox.faults = _DropFirstWrite()
    outcome = ledger.create_invoices([request("LB-R", cid)], "batch-r")[0]
    assert outcome.ok
    assert len(sandbox.invoices()) == 1
    assert sandbox.idempotent_replays == 1
    assert ledger.stats.retries == 1


def test_find_invoices_by_reference_over_many_references(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """References are looked up in chunks; unknown ones are absent; voided ones yield to live ones."""
    ledger = make_ledger(sandbox, clock)
    cid = one_contact(ledger)
    refs = [f"LB-pipeline-D{i:06d}" for i in range(60)]
    for start in range(0, 60, 50):
        ledger.create_invoices([request(r, cid) for r in refs[start:start + 50]], f"b{start}")
    found = ledger.find_invoices_by_reference([*refs, "LB-missing"])
    assert set(found) == set(refs)
    assert found[refs[7]].ledger_total == request(refs[7], cid).invoice.total


def test_list_invoices_and_payments_since_a_date(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """Changes after the given time come back (invoices with lines, payments as domain objects)."""
    ledger = make_ledger(sandbox, clock)
    cid = one_contact(ledger)
    ledger.create_invoices([request("OLD", cid)], "k-old")
    clock.advance(86400)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(60)
    new = ledger.create_invoices([request("NEW", cid)], "k-new")[0].invoice
    assert new is not None
    assert new.ledger_id
    sandbox.create_payment(new.ledger_id, Decimal("1000.00"), dt.date(2026, 1, 20))
    changed = list(ledger.list_invoices(since))
    assert [i.reference for i in changed] == ["NEW"]
    assert changed[0].amount_paid == Decimal("1000.00")
    assert len(changed[0].lines) == 2
    assert sorted(i.reference for i in ledger.list_invoices()) == ["NEW", "OLD"]
    payments = list(ledger.list_payments(since))
    assert len(payments) == 1
    assert payments[0].invoice_ledger_id == new.ledger_id
    assert payments[0].amount == Decimal("1000.00")
    assert payments[0].currency == "EUR"
    assert payments[0].date == dt.date(2026, 1, 20)
    assert list(ledger.list_payments(dt.datetime.fromtimestamp(clock.now() + 60, tz=dt.UTC))) == []


def test_minute_limit_429_is_waited_out(clock: ManualClock) -> None:
    """A 429 minute answer (another client used the window) pauses for Retry-After, then the call succeeds."""
    sandbox = XeroSandbox(clock=clock, calls_per_minute=3)
    ledger = make_ledger(sandbox, clock, calls_per_minute=1000)
    assert ledger.find_customers_by_number(["nobody"]) == {}  # Xero now says 2 calls are left
    other = make_ledger(sandbox, clock, calls_per_minute=1000)
    for _ in range(2):  # another client takes them, unknown to this one
        assert other.find_customers_by_number(["nobody"]) == {}
    assert ledger.find_customers_by_number(["nobody"]) == {}
    assert sandbox.rate_limited.get("minute", 0) >= 1
    assert ledger.stats.rate_limited >= 1


def test_the_budget_follows_xeros_remaining_count(clock: ManualClock) -> None:
    """A new client on an organisation whose minute another client used up learns it from X-MinLimit-Remaining:
    it waits instead of sending into a full window, beyond the one 429 that taught it Retry-After."""
    sandbox = XeroSandbox(clock=clock, calls_per_minute=6)
    first = make_ledger(sandbox, clock, calls_per_minute=6)
    for _ in range(5):
        assert first.find_customers_by_number(["nobody"]) == {}
    second = make_ledger(sandbox, clock, calls_per_minute=6)
    for _ in range(6):
        assert second.find_customers_by_number(["nobody"]) == {}
    assert second.stats.rate_limited <= 1
    assert sandbox.rate_limited.get("minute", 0) <= 1


def test_daily_limit_stops_the_pipeline_without_retrying(clock: ManualClock) -> None:
    """429 day becomes QuotaExhaustedError at once, and later calls fail fast without reaching Xero."""
    sandbox = XeroSandbox(clock=clock, calls_per_day=4)
    ledger = make_ledger(sandbox, clock)
    ledger.find_customers_by_number(["a"])  # the token refresh is not an API call; this is call 1
    other = httpx.Client(transport=sandbox.transport(), base_url="https://api.xero.com/api.xro/2.0", headers={
        "Authorization": f"Bearer {sandbox.issue_tokens()['access_token']}", "xero-tenant-id": sandbox.tenant_id})
    for _ in range(3):  # another app spends the rest of the day's allowance
        assert other.get("/Currencies").status_code == 200
    with pytest.raises(QuotaExhaustedError):
        ledger.find_customers_by_number(["c"])
    assert sandbox.rate_limited == {"day": 1}
    calls = sandbox.calls
    with pytest.raises(QuotaExhaustedError):
        ledger.find_customers_by_number(["d"])
    assert sandbox.calls == calls


def test_day_allowance_reaching_zero_stops_before_a_429(clock: ManualClock) -> None:
    """X-DayLimit-Remaining: 0 on an answer makes the next call fail fast instead of spending a 429."""
    sandbox = XeroSandbox(clock=clock, calls_per_day=2)
    ledger = make_ledger(sandbox, clock)
    ledger.find_customers_by_number(["a"])
    ledger.find_customers_by_number(["b"])
    calls = sandbox.calls
    with pytest.raises(QuotaExhaustedError):
        ledger.find_customers_by_number(["c"])
    assert sandbox.calls == calls
    assert sandbox.rate_limited == {}


def test_unknown_tenant_is_an_auth_error(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A tenant the token does not cover answers 403, mapped to AuthError without retries."""
    ledger = make_ledger(sandbox, clock, tenant_id="00000000-0000-4000-8000-000000000000")
    with pytest.raises(AuthError) as err:
        list(ledger.list_customers())
    assert err.value.status == 403
    assert ledger.stats.retries == 0


def test_invoice_status_that_cannot_be_created_is_refused_locally(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A paid or voided invoice is not sent; the outcome says why."""
    ledger = make_ledger(sandbox, clock)
    before = sandbox.calls
    outcome = ledger.create_invoices([request("LB-X", "00000000-0000-4000-8000-000000000001", status="paid")],
                                     "k")[0]
    assert not outcome.ok
    assert "paid" in (outcome.error or "")
    assert sandbox.calls == before


def test_from_config_validates_and_hides_secrets(sandbox: XeroSandbox) -> None:
    """from_config builds a working connector; an invalid block is a ConfigError naming fields, not secrets."""
    ledger = XeroLedger.from_config(
        {"type": "xero", "tenant_id": sandbox.tenant_id, "client_id": DEMO_CLIENT_ID,
         "client_secret": DEMO_CLIENT_SECRET, "refresh_token": sandbox.issue_tokens()["refresh_token"]},
        MemoryTokenStore(), transport=sandbox.transport(),
    )
    assert ledger.find_customers_by_number(["nobody"]) == {}
    with pytest.raises(ConfigError) as err:
        XeroLedger.from_config({"type": "xero", "client_id": "x", "client_secret": CANARY_SECRET,
                                "calls_per_minute": 0}, MemoryTokenStore())
    assert "tenant_id" in str(err.value)
    assert "calls_per_minute" in str(err.value)
    assert CANARY_SECRET not in str(err.value)


def test_no_secret_reaches_an_error_or_a_log(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """Client secret, refresh and access tokens never appear in raised errors or captured logs."""
    sandbox = XeroSandbox(clock=clock, client_secret=CANARY_SECRET, initial_refresh_token=CANARY_REFRESH)
    store = MemoryTokenStore()
    ledger = make_ledger(sandbox, clock, store, client_secret=CANARY_SECRET, refresh_token=CANARY_REFRESH,
                         max_attempts=2)
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        cid = one_contact(ledger)
        outcome = ledger.create_invoices([request("LB-S", cid, tax_type="BAD")], "k-s")[0]
        assert not outcome.ok
        tokens = store.load(ledger.settings.connection_name) or {}
        sandbox.faults = FaultPlan("503=1.0")
        try:
            ledger.create_invoices([request("LB-T", cid)], "k-t")
        except AmbiguousWriteError as exc:
            errors.append(exc)
        sandbox.faults = FaultPlan(None)
        sandbox.revoke_refresh_tokens()
        sandbox.expire_access_tokens()
        try:
            list(ledger.list_invoices())
        except AuthError as exc:
            errors.append(exc)
    assert [type(e) for e in errors] == [AmbiguousWriteError, ReauthorizationRequired]
    text = " ".join([*(str(e) + repr(e) + str(e.__dict__) for e in errors), repr(logs), caplog.text,
                     outcome.error or "", repr(ledger.settings), repr(ledger.client.auth)])
    for secret in (CANARY_SECRET, CANARY_REFRESH, tokens["access_token"], tokens["refresh_token"]):
        assert secret
        assert secret not in text


def xero_api(sandbox: XeroSandbox, method: str, path: str, body: Any) -> Any:
    """One call to the sandbox's API as another app would make it (a person's edits in Xero)."""
    token = sandbox.issue_tokens()["access_token"]
    with httpx.Client(transport=sandbox.transport(), base_url="https://api.xero.com/api.xro/2.0") as http:
        headers = {"Authorization": f"Bearer {token}", "xero-tenant-id": sandbox.tenant_id,
                   "Content-Type": "application/json"}
        resp = http.request(method, path, content=wire.dumps(body), headers=headers)
    assert resp.status_code == 200, resp.text
    return wire.loads(resp.content)


def test_currency_rates_become_home_units_per_unit_of_the_invoice_currency() -> None:
    """Xero's CurrencyRate (units of the document's currency per base unit) is turned round; nonsense gives None."""
    assert home_rate(Decimal("0.75")) == Decimal("1.3333333333")
    assert home_rate(Decimal("1.080000")) == Decimal("0.9259259259")
    assert home_rate(1) == Decimal(1)
    assert [home_rate(v) for v in (None, "", 0, Decimal("-1.2"))] == [None, None, None, None]


def test_invoices_carry_the_exchange_rate_and_their_xero_link(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A USD invoice reads back with 1 / CurrencyRate (EUR per USD), a EUR one with 1; invoice_url opens it."""
    ledger = make_ledger(sandbox, clock)
    cid = one_contact(ledger)
    outcomes = ledger.create_invoices([request("EUR-1", cid), request("USD-1", cid, currency="USD")], "k-fx")
    assert all(o.ok for o in outcomes)
    by_ref = {i.reference: i for i in ledger.list_invoices()}
    stored = sandbox.invoice_by_reference("USD-1")
    assert stored is not None
    read = by_ref["USD-1"].exchange_rate
    assert read == (Decimal(1) / stored["CurrencyRate"]).quantize(Decimal("1e-10"))
    assert read is not None
    assert Decimal("0.85") < read < 1
    assert by_ref["EUR-1"].exchange_rate == 1
    created = outcomes[1].invoice
    assert created is not None
    assert created.exchange_rate == by_ref["USD-1"].exchange_rate
    assert ledger.invoice_url(by_ref["USD-1"]) == (
        f"https://go.xero.com/AccountsReceivable/View.aspx?InvoiceID={by_ref['USD-1'].ledger_id}")
    assert ledger.invoice_url(request("X", cid).invoice) is None  # not read from Xero: no id, no page
    assert ledger.base_currency() == "EUR"


def test_credit_notes_come_with_allocations_status_and_rate(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """list_credit_notes gives sales credit notes only, paged, since a time, with allocations, remaining credit,
    the rate turned round, and the status: paid when fully allocated, voided and deleted ones as such."""
    ledger = make_ledger(sandbox, clock, page_size=2)
    cid = one_contact(ledger)
    outcomes = ledger.create_invoices([request("CN-EUR", cid), request("CN-USD", cid, currency="USD")], "k-cn")
    eur, usd = (o.invoice for o in outcomes)
    assert eur is not None
    assert usd is not None
    assert eur.ledger_id
    assert usd.ledger_id
    full = sandbox.create_credit_note(eur.ledger_id, Decimal("240.00"), dt.date(2026, 1, 12))
    part = sandbox.create_credit_note(usd.ledger_id, Decimal("500.00"), dt.date(2026, 1, 13), allocate=False)
    xero_api(sandbox, "PUT", f"/CreditNotes/{part['CreditNoteID']}/Allocations", {"Allocations": [
        {"Invoice": {"InvoiceID": usd.ledger_id}, "Amount": Decimal("200.00"), "Date": "2026-01-14"}]})
    base = {"Contact": {"ContactID": cid}, "Date": "2026-01-15", "LineItems": [
        {"Description": "Remise", "Quantity": 1, "UnitAmount": Decimal("10.00"), "AccountCode": "706"}]}
    made = xero_api(sandbox, "PUT", "/CreditNotes", {"CreditNotes": [
        dict(base, Type="ACCRECCREDIT", Status="AUTHORISED"), dict(base, Type="ACCRECCREDIT", Status="DRAFT"),
        dict(base, Type="ACCPAYCREDIT", Status="AUTHORISED")]})["CreditNotes"]
    voided, deleted, _purchase = (n["CreditNoteID"] for n in made)
    clock.advance(60)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(60)
    xero_api(sandbox, "POST", f"/CreditNotes/{voided}", {"Status": "VOIDED"})
    xero_api(sandbox, "POST", f"/CreditNotes/{deleted}", {"Status": "DELETED"})
    notes = {n.ledger_id: n for n in ledger.list_credit_notes()}
    assert set(notes) == {full["CreditNoteID"], part["CreditNoteID"], voided, deleted}
    paid = notes[full["CreditNoteID"]]
    assert (paid.status, paid.total, paid.remaining, paid.currency, paid.customer_ledger_id, paid.issue_date) == (
        "paid", Decimal("240.00"), Decimal(0), "EUR", cid, dt.date(2026, 1, 12))
    assert paid.subtotal == Decimal("200.00")
    assert paid.number == full["CreditNoteNumber"]
    assert [(a.invoice_ledger_id, a.amount, a.date) for a in paid.allocations] == [
        (eur.ledger_id, Decimal("240.00"), dt.date(2026, 1, 12))]
    assert paid.exchange_rate == 1
    open_note = notes[part["CreditNoteID"]]
    assert (open_note.status, open_note.remaining, open_note.currency) == ("authorised", Decimal("300.00"), "USD")
    assert [(a.amount, a.date) for a in open_note.allocations] == [(Decimal("200.00"), dt.date(2026, 1, 14))]
    assert open_note.exchange_rate == (Decimal(1) / part["CurrencyRate"]).quantize(Decimal("1e-10"))
    assert (notes[voided].status, notes[deleted].status) == ("voided", "deleted")
    assert notes[voided].allocations == []
    assert {n.ledger_id for n in ledger.list_credit_notes(since)} == {voided, deleted}
    [usd_now] = [i for i in ledger.list_invoices() if i.ledger_id == usd.ledger_id]
    assert usd_now.amount_due == usd.total - Decimal("200.00")


def test_expenses_are_approved_bill_and_spend_lines_of_the_accounts_net_of_tax(
    sandbox: XeroSandbox, clock: ManualClock
) -> None:
    """Lines of authorised or paid bills and authorised spend money on the asked accounts, within the dates, net of
    tax (also on tax-inclusive documents); drafts, voided bills, deleted spends, receipts and sales are left out."""
    ledger = make_ledger(sandbox, clock, page_size=2)
    day = dt.date(2026, 1, 20)
    bill = sandbox.create_bill("6231", day, Decimal("1000.00"), "Google Ads")
    paid = sandbox.create_bill("6231", dt.date(2026, 1, 31), Decimal("250.50"), "LinkedIn Ads", paid=True)
    usd = sandbox.create_bill("6231", dt.date(2026, 1, 1), Decimal("99.00"), "SaaS", currency="USD")
    sandbox.create_bill("6231", day, Decimal("7.00"), "Brouillon", status="DRAFT")
    sandbox.create_bill("6231", dt.date(2025, 12, 31), Decimal("8.00"), "Décembre")
    voided = sandbox.create_bill("6231", day, Decimal("9.00"), "Annulée")
    xero_api(sandbox, "POST", f"/Invoices/{voided['InvoiceID']}", {"Status": "VOIDED"})
    spend = sandbox.create_spend("6251", day, Decimal("80.00"), "Train Paris-Lyon")
    gone = sandbox.create_spend("6251", day, Decimal("11.00"), "Erreur")
    xero_api(sandbox, "POST", f"/BankTransactions/{gone['BankTransactionID']}", {"Status": "DELETED"})
    mixed = xero_api(sandbox, "PUT", "/Invoices", {"Invoices": [{
        "Type": "ACCPAY", "Contact": {"Name": "Agence Lumière"}, "Date": "2026-01-22", "Status": "AUTHORISED",
        "LineAmountTypes": "Inclusive", "LineItems": [
            {"Description": "Salon", "Quantity": 1, "UnitAmount": Decimal("1200.00"), "AccountCode": "6233",
             "TaxType": "TAX001"},
            {"Description": "Conseil", "Quantity": 1, "UnitAmount": Decimal("600.00"), "AccountCode": "6226",
             "TaxType": "TAX001"}]}]})["Invoices"][0]
    xero_api(sandbox, "PUT", "/BankTransactions", {"Type": "RECEIVE", "Contact": {"Name": "Agence Lumière"},
                                                   "BankAccount": {"Code": "512"}, "Date": "2026-01-22", "LineItems": [
        {"Description": "Avoir", "Quantity": 1, "UnitAmount": Decimal("5.00"), "AccountCode": "6231"}]})
    lines = list(ledger.list_expenses(["6231", "6251", "6233"], dt.date(2026, 1, 1), dt.date(2026, 1, 31)))
    got = sorted((ln.ledger_id.split(":")[0], ln.account_code, ln.date, ln.net, ln.currency) for ln in lines)
    assert got == sorted([
        (bill["InvoiceID"], "6231", day, Decimal("1000.00"), "EUR"),
        (paid["InvoiceID"], "6231", dt.date(2026, 1, 31), Decimal("250.50"), "EUR"),
        (usd["InvoiceID"], "6231", dt.date(2026, 1, 1), Decimal("99.00"), "USD"),
        (spend["BankTransactionID"], "6251", day, Decimal("80.00"), "EUR"),
        (mixed["InvoiceID"], "6233", dt.date(2026, 1, 22), Decimal("1000.00"), "EUR"),
    ])
    assert len({ln.ledger_id for ln in lines}) == len(lines)
    by_doc = {ln.ledger_id.split(":")[0]: ln for ln in lines}
    assert by_doc[usd["InvoiceID"]].exchange_rate == (Decimal(1) / usd["CurrencyRate"]).quantize(Decimal("1e-10"))
    assert by_doc[bill["InvoiceID"]].exchange_rate == 1
    assert by_doc[spend["BankTransactionID"]].description == "Train Paris-Lyon"
    assert list(ledger.list_expenses([], dt.date(2026, 1, 1), dt.date(2026, 1, 31))) == []
    assert list(ledger.list_expenses(["6231"], dt.date(2026, 2, 1), dt.date(2026, 1, 1))) == []


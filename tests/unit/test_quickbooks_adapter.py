"""QuickBooksLedger against the in-process QuickBooks sandbox: customers, invoices, ambiguity, reads, limits, tokens."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.domain import Address, Customer, Invoice, InvoiceLine
from connectors.errors import AmbiguousWriteError, AuthError, ConfigError, ReauthorizationRequired, RecordError
from connectors.interfaces import InvoiceRequest
from connectors.quickbooks import QuickBooksLedger
from connectors.quickbooks.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, QuickBooksSandbox
from connectors.quickbooks.settings import QuickBooksSettings
from connectors.quickbooks.wire import doc_number
from connectors.sandboxkit import Fault, FaultPlan
from connectors.xero.testing import ManualClock, MemoryTokenStore

CANARY_SECRET = "canary-client-secret-9f2c41"
CANARY_REFRESH = "canary-refresh-token-3b8e07"


class FakeTime:
    """Client sleeps move the sandbox clock: the client and the simulated company share one timeline."""

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
def sandbox(clock: ManualClock) -> QuickBooksSandbox:
    return QuickBooksSandbox(clock=clock, seed=13)


def make_ledger(sandbox: QuickBooksSandbox, clock: ManualClock, store: MemoryTokenStore | None = None,
                transport: httpx.BaseTransport | None = None, max_attempts: int = 8,
                fake: FakeTime | None = None, **overrides: Any) -> QuickBooksLedger:
    fake = fake or FakeTime(clock)
    fields: dict[str, Any] = {
        "realm_id": sandbox.realm_id,
        "client_id": DEMO_CLIENT_ID,
        "client_secret": DEMO_CLIENT_SECRET,
        "refresh_token": sandbox.issue_tokens()["refresh_token"],
        **overrides,
    }
    return QuickBooksLedger(QuickBooksSettings(**fields), store or MemoryTokenStore(),
                            transport=transport or sandbox.transport(), sleep=fake.sleep, monotonic=fake.monotonic,
                            clock=clock.now, max_attempts=max_attempts)


def customer(n: int, name: str | None = None, currency: str = "EUR", vat: str | None = "FR40303265045") -> Customer:
    return Customer(crm_id=f"C{n:04d}", name=name or f"Société {n} SAS", email=f"compta{n}@societe{n}.fr",
                    domain=f"societe{n}.fr", vat_number=vat, siren="303265045", country="FR", currency=currency,
                    address=Address(line1=f"{n} rue de la Paix", city="Lyon", postal_code="69002", country="FR"))


def request(ref: str, customer_id: str, *, key: str | None = None, tax_type: str = "2", currency: str = "EUR",
            item: str = "SVC-CONSULT-DAY", status: str = "authorised") -> InvoiceRequest:
    lines = [
        InvoiceLine(description="Journée de conseil", quantity=Decimal("2.5"), unit_price=Decimal("850.00"),
                    tax_rate=Decimal(20), item_code=item, account_code="706", tax_type=tax_type),
        InvoiceLine(description="Guide pratique", quantity=Decimal(3), unit_price=Decimal("34.00"),
                    discount_percent=Decimal("12.5"), tax_rate=Decimal("5.5"), item_code="BOOK-GUIDE",
                    account_code="707", tax_type="4"),
        InvoiceLine(description="Abonnement", quantity=Decimal(7), unit_price=Decimal("39.90"),
                    discount_percent=Decimal("7.5"), tax_rate=Decimal(20), item_code="LIC-SAAS-USER", tax_type="2"),
    ]
    inv = Invoice(reference=ref, currency=currency, lines=lines, issue_date=dt.date(2026, 1, 10),
                  due_date=dt.date(2026, 2, 9), status=status)
    return InvoiceRequest(idempotency_key=key or str(uuid.uuid5(uuid.NAMESPACE_URL, ref)), invoice=inv,
                          customer_ledger_id=customer_id)


def one_customer(ledger: QuickBooksLedger, currency: str = "EUR") -> str:
    return ledger.create_customers([("LB-hubspot-1", customer(1, currency=currency))], "c-1")["LB-hubspot-1"].ledger_id


class _DropFirst(FaultPlan):
    """Commit the first write, then drop the connection before the answer."""

    def __init__(self) -> None:
        super().__init__(None)
        self.dropped = 0

    def decide(self, is_write: bool) -> Fault | None:
        if is_write and not self.dropped:
            self.dropped += 1
            return Fault("drop_after_commit")
        return None


def test_customers_are_created_and_found_by_number(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Customers carry the number in Notes, VAT, e-mail, site, address, currency, and are found by number."""
    ledger = make_ledger(sandbox, clock)
    created = ledger.create_customers([("LB-hubspot-1", customer(1)), ("LB-hubspot-2", customer(2, vat=None))],
                                      "key-c")
    assert set(created) == {"LB-hubspot-1", "LB-hubspot-2"}
    stored = {c["DisplayName"]: c for c in sandbox.customers()}
    first = stored["Société 1 SAS"]
    assert first["Notes"] == "LedgerBridge number: LB-hubspot-1\nSIREN: 303265045"
    assert first["PrimaryTaxIdentifier"] == "FR40303265045"
    assert first["PrimaryEmailAddr"] == {"Address": "compta1@societe1.fr"}
    assert first["BillAddr"] == {"Line1": "1 rue de la Paix", "City": "Lyon", "PostalCode": "69002", "Country": "FR"}
    assert first["CurrencyRef"]["value"] == "EUR"
    found = ledger.find_customers_by_number(["LB-hubspot-2", "LB-hubspot-1", "LB-nobody"])
    assert {k: v.ledger_id for k, v in found.items()} == {k: v.ledger_id for k, v in created.items()}
    assert found["LB-hubspot-1"].vat_number == "FR40303265045"
    assert found["LB-hubspot-1"].domain == "societe1.fr"
    assert found["LB-hubspot-1"].company_id == "303265045"
    assert sorted(c.number or "" for c in ledger.list_customers()) == ["LB-hubspot-1", "LB-hubspot-2"]


def test_a_taken_display_name_is_made_distinct(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """6240 from a vendor's or a customer's name: retried with the VAT number, then the external number."""
    ledger = make_ledger(sandbox, clock)
    sandbox.add_vendor("Dupont SARL")
    first = ledger.create_customers([("LB-1", customer(1, "Dupont SARL"))], "k1")["LB-1"]
    assert first.name == "Dupont SARL (FR40303265045)"
    second = ledger.create_customers([("LB-2", customer(2, "Dupont SARL"))], "k2")["LB-2"]
    assert second.name == "Dupont SARL (LB-2)"
    third = ledger.create_customers([("LB-3", customer(3, "Garage: Petit", vat=None))], "k3")["LB-3"]
    assert third.name == "Garage - Petit"
    assert sorted(c["DisplayName"] for c in sandbox.customers()) == [
        "Dupont SARL (FR40303265045)", "Dupont SARL (LB-2)", "Garage - Petit"]


def test_an_unanswered_customer_create_is_adopted_not_duplicated(sandbox: QuickBooksSandbox,
                                                                 clock: ManualClock) -> None:
    """A create committed without an answer, then sent in another batch: the 6240 holder carries the number."""
    ledger = make_ledger(sandbox, clock, max_attempts=1)
    sandbox.faults = _DropFirst()
    with pytest.raises(AmbiguousWriteError):
        ledger.create_customers([("LB-9", customer(9))], "batch-a")
    sandbox.faults = FaultPlan(None)
    adopted = ledger.create_customers([("LB-8", customer(8)), ("LB-9", customer(9))], "batch-b")
    assert adopted["LB-9"].ledger_id == "1"
    assert [c["DisplayName"] for c in sandbox.customers()] == ["Société 9 SAS", "Société 8 SAS"]


def test_invoices_carry_lines_tax_codes_currency_and_per_line_rounding(sandbox: QuickBooksSandbox,
                                                                       clock: ManualClock) -> None:
    """Lines (item, qty, price, discount, tax code), DocNumber, PrivateNote and totals as the domain computes."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    req = request("LB-acme-fr:123456789012", cid)
    outcome = ledger.create_invoices([req], "batch-1")[0]
    assert outcome.ok, outcome.error
    assert outcome.idempotency_key == req.idempotency_key
    inv = outcome.invoice
    assert inv is not None
    # Net 2125.00 + 89.25 + 258.35 (279.30 less 7.5 % = 258.3525); VAT per line 425.00 + 4.91 + 51.67.
    assert inv.ledger_total == req.invoice.total == Decimal("2954.18")
    assert inv.reference == "LB-acme-fr:123456789012"
    assert inv.number == doc_number("LB-acme-fr:123456789012")
    assert len(inv.number or "") == 21
    assert [ln.tax_type for ln in inv.lines] == ["2", "4", "2"]
    assert [ln.tax_rate for ln in inv.lines] == [Decimal(20), Decimal("5.5"), Decimal(20)]
    assert inv.lines[2].discount_percent == Decimal("7.5")
    assert inv.customer_ledger_id == cid
    assert inv.due_date == dt.date(2026, 2, 9)
    raw = sandbox.raw_invoice(inv.ledger_id or "")
    assert raw is not None
    assert raw["PrivateNote"] == "LedgerBridge reference: LB-acme-fr:123456789012"
    assert raw["TxnTaxDetail"]["TotalTax"] == req.invoice.tax == Decimal("481.58")
    assert [ln["SalesItemLineDetail"]["ItemRef"]["name"] for ln in raw["Line"][:3]] == [
        "SVC-CONSULT-DAY", "BOOK-GUIDE", "LIC-SAAS-USER"]
    view = sandbox.invoice_by_reference("LB-acme-fr:123456789012")
    assert view is not None
    assert (view["SubTotal"], view["Total"], view["CurrencyCode"]) == (req.invoice.subtotal, req.invoice.total, "EUR")


def test_per_invoice_failures_do_not_stop_the_others(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Unknown tax code (QuickBooks Fault), unknown item (refused locally), wrong currency: ok=False each."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    usd = ledger.create_customers([("LB-us", customer(2, "Walker Labs", currency="USD", vat=None))], "c-2")["LB-us"]
    reqs = [request("LB-1", cid), request("LB-2", cid, tax_type="99"), request("LB-3", cid, item="NOPE"),
            request("LB-4", cid, currency="USD"), request("LB-5", usd.ledger_id, currency="USD"),
            request("LB-6", cid, status="paid")]
    outcomes = ledger.create_invoices(reqs, "batch")
    assert [o.ok for o in outcomes] == [True, False, False, False, True, False]
    assert "TaxCodeRef" in (outcomes[1].error or "")
    assert "NOPE" in (outcomes[2].error or "")
    assert "currency" in (outcomes[3].error or "")
    assert "paid" in (outcomes[5].error or "")
    assert sorted(i["Reference"] for i in sandbox.invoices()) == ["LB-1", "LB-5"]
    assert sandbox.invoice_by_reference("LB-5")["CurrencyCode"] == "USD"  # type: ignore[index]


def test_ambiguous_write_is_resolved_by_replaying_the_same_requestid(sandbox: QuickBooksSandbox,
                                                                     clock: ManualClock) -> None:
    """A create dropped after commit raises AmbiguousWriteError; the same requestid later returns that invoice."""
    ledger = make_ledger(sandbox, clock, max_attempts=1)
    cid = one_customer(ledger)
    req = request("LB-A", cid)
    sandbox.faults = _DropFirst()
    with pytest.raises(AmbiguousWriteError):
        ledger.create_invoices([req], "batch-a")
    original = sandbox.invoice_by_reference("LB-A")
    assert original is not None
    sandbox.faults = FaultPlan(None)
    outcome = ledger.create_invoices([req], "batch-a")[0]
    assert outcome.ok
    assert outcome.invoice is not None
    assert outcome.invoice.ledger_id == original["InvoiceID"]
    assert len(sandbox.invoices()) == 1
    assert sandbox.requestid_replays == 1
    assert ledger.find_invoices_by_reference(["LB-A"])["LB-A"].ledger_id == original["InvoiceID"]


def test_dropped_answer_is_retried_with_the_same_requestid(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """The retry layer resends the identical write; QuickBooks replays its answer, so one invoice exists."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    sandbox.faults = _DropFirst()
    outcome = ledger.create_invoices([request("LB-R", cid)], "batch-r")[0]
    assert outcome.ok
    assert len(sandbox.invoices()) == 1
    assert sandbox.requestid_replays == 1
    assert ledger.stats.retries == 1


def test_a_second_create_under_a_new_key_adopts_the_existing_invoice(sandbox: QuickBooksSandbox,
                                                                      clock: ManualClock) -> None:
    """Same reference, other requestid: QuickBooks refuses the DocNumber (6140) and the existing invoice is returned."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    first = ledger.create_invoices([request("LB-acme:D77", cid, key="k-rev1")], "b1")[0]
    again = ledger.create_invoices([request("LB-acme:D77", cid, key="k-rev2")], "b2")[0]
    assert again.ok
    assert again.invoice is not None
    assert first.invoice is not None
    assert again.invoice.ledger_id == first.invoice.ledger_id
    assert len(sandbox.invoices()) == 1


def test_find_invoices_by_reference(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Short and long references are found in chunks of DocNumbers; a voided invoice is still found as voided."""
    ledger = make_ledger(sandbox, clock, requests_per_minute=10_000)
    cid = one_customer(ledger)
    refs = [f"LB-pipeline:D{i:03d}" for i in range(35)] + [f"LB-a-long-pipeline-name:{10**14 + i}" for i in range(30)]
    for start in range(0, len(refs), 30):
        outcomes = ledger.create_invoices([request(r, cid) for r in refs[start:start + 30]], f"b{start}")
        assert all(o.ok for o in outcomes)
    found = ledger.find_invoices_by_reference([*refs, "LB-missing:1"])
    assert set(found) == set(refs)
    assert found[refs[40]].ledger_total == request(refs[40], cid).invoice.total
    voided = ledger.void_invoice(found[refs[3]].ledger_id or "", "void-3")
    assert voided.status == "voided"
    again = ledger.find_invoices_by_reference([refs[3]])
    assert again[refs[3]].status == "voided"


def test_a_note_naming_another_reference_is_not_adopted(clock: ManualClock) -> None:
    """With duplicate numbers allowed, an invoice sharing our DocNumber but noting another reference is ignored."""
    sandbox = QuickBooksSandbox(clock=clock, allow_duplicate_doc_numbers=True)
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    impostor = request("LB-x:1", cid, key="k-imp")
    body = ledger._invoice_body(impostor)
    assert isinstance(body, dict)
    body["PrivateNote"] = "LedgerBridge reference: LB-other:1"
    ledger.client.request("POST", "/invoice", body=body)
    assert ledger.find_invoices_by_reference(["LB-x:1"]) == {}
    created = ledger.create_invoices([request("LB-x:1", cid)], "b")[0]
    assert created.ok
    assert ledger.find_invoices_by_reference(["LB-x:1"])["LB-x:1"].ledger_id == created.invoice.ledger_id  # type: ignore[union-attr]


def test_ledger_numbering_mode(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """doc_numbers=ledger: QuickBooks numbers the invoices (1001...), lookups read PrivateNote of every invoice."""
    ledger = make_ledger(sandbox, clock, doc_numbers="ledger")
    cid = one_customer(ledger)
    outcomes = ledger.create_invoices([request("LB-p:1", cid), request("LB-p:2", cid)], "b")
    assert sorted(o.invoice.number or "" for o in outcomes if o.invoice) == ["1001", "1002"]
    found = ledger.find_invoices_by_reference(["LB-p:2", "LB-p:3"])
    assert list(found) == ["LB-p:2"]
    assert found["LB-p:2"].number in {"1001", "1002"}


def test_list_invoices_and_payments_since_a_time(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Recent changes come from CDC (deletions included), older ones from a query; payments per applied invoice."""
    ledger = make_ledger(sandbox, clock)
    cid = one_customer(ledger)
    old = ledger.create_invoices([request("OLD", cid)], "k-old")[0].invoice
    assert old is not None
    clock.advance(40 * 86400)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    clock.advance(60)
    new = ledger.create_invoices([request("NEW", cid)], "k-new")[0].invoice
    assert new is not None
    assert new.ledger_id
    sandbox.create_payment(new.ledger_id, Decimal("1000.00"), dt.date(2026, 2, 20))
    changed = list(ledger.list_invoices(since))
    assert [i.reference for i in changed] == ["NEW"]
    assert changed[0].amount_paid == Decimal("1000.00")
    assert len(changed[0].lines) == 3
    assert sorted(i.reference for i in ledger.list_invoices()) == ["NEW", "OLD"]
    long_ago = since - dt.timedelta(days=45)  # beyond the CDC look-back: the query path
    assert sorted(i.reference for i in ledger.list_invoices(long_ago)) == ["NEW", "OLD"]
    payments = list(ledger.list_payments(since))
    assert [(p.invoice_ledger_id, p.amount, p.currency, p.date) for p in payments] == [
        (new.ledger_id, Decimal("1000.00"), "EUR", dt.date(2026, 2, 20))]
    later = dt.datetime.fromtimestamp(clock.now() + 60, tz=dt.UTC)
    assert list(ledger.list_payments(later)) == []
    current = sandbox.raw_invoice(old.ledger_id or "")
    assert current is not None
    ledger.client.request("POST", "/invoice", params={"operation": "delete"},
                          body={"Id": current["Id"], "SyncToken": current["SyncToken"]})
    gone = [i for i in ledger.list_invoices(since) if i.ledger_id == old.ledger_id]
    assert [i.status for i in gone] == ["deleted"]


def test_a_full_cdc_answer_falls_back_to_the_query(clock: ManualClock) -> None:
    """When CDC answers its maximum, the changes are read by paged query instead, none missing."""
    sandbox = QuickBooksSandbox(clock=clock, cdc_max_objects=5)
    ledger = make_ledger(sandbox, clock, page_size=4)
    cid = one_customer(ledger)
    since = dt.datetime.fromtimestamp(clock.now(), tz=dt.UTC)
    for i in range(9):
        clock.advance(1)
        ledger.create_invoices([request(f"LB-c:{i}", cid)], f"k{i}")
    from connectors.quickbooks import client as qbo_client

    original = qbo_client.CDC_MAX_OBJECTS
    qbo_client.CDC_MAX_OBJECTS = 5
    try:
        got = [i.reference for i in ledger.list_invoices(since)]
    finally:
        qbo_client.CDC_MAX_OBJECTS = original
    assert got == [f"LB-c:{i}" for i in range(9)]


def test_void_rereads_once_on_a_stale_sync_token(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Someone edits the invoice between read and void: Fault 5010, one re-read, the void then succeeds."""
    edited: list[str] = []

    def meddle(req: httpx.Request) -> httpx.Response:
        if req.method == "POST" and req.url.params.get("operation") == "void" and not edited:
            invoice_id = sandbox.invoices()[0]["InvoiceID"]
            sandbox.touch_invoice(invoice_id)
            edited.append(invoice_id)
        return sandbox.handle_httpx(req)

    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(meddle))
    cid = one_customer(ledger)
    created = ledger.create_invoices([request("LB-V", cid)], "b")[0].invoice
    assert created is not None
    assert created.ledger_id
    voided = ledger.void_invoice(created.ledger_id, "void-key")
    assert voided.status == "voided"
    assert edited == [created.ledger_id]
    assert sandbox.invoices()[0]["Status"] == "VOIDED"
    assert sandbox.invoices()[0]["SyncToken"] == "2"


def test_throttling_is_waited_out(clock: ManualClock) -> None:
    """429 and 403 ThrottleExceeded answers pause the client (60 s, no Retry-After) and the call then succeeds."""
    for status in (429, 403):
        sandbox = QuickBooksSandbox(clock=clock, requests_per_minute=3, throttle_status=status)
        fake = FakeTime(clock)
        ledger = make_ledger(sandbox, clock, fake=fake, requests_per_minute=1000)
        for _ in range(5):
            assert ledger.find_customers_by_number(["nobody"]) == {}
        assert sandbox.throttled >= 1
        assert ledger.stats.rate_limited >= 1
        assert fake.slept >= 60


def test_a_fault_inside_a_200_is_an_error(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """An HTTP 200 whose body is a Fault is raised as a connector error, never taken for data."""

    def fault_in_200(req: httpx.Request) -> httpx.Response:
        resp = sandbox.handle_httpx(req)
        if req.url.path.endswith("/customer"):
            body = b'{"Fault":{"Error":[{"Message":"Length exceeds limit","Detail":"Length of the field exceeds ' \
                   b'21 chars","code":"2050","element":"firstname"}],"type":"ValidationFault"},"time":"x"}'
            return httpx.Response(200, content=body, headers={"Content-Type": "application/json"}, request=req)
        return resp

    ledger = make_ledger(sandbox, clock, transport=httpx.MockTransport(fault_in_200))
    with pytest.raises(RecordError) as err:
        ledger.client.request("POST", "/customer", body={"DisplayName": "X"}, request_id="r-1")
    assert err.value.code == "2050"
    assert ledger.create_customers([("LB-1", customer(1))], "k") == {}


def test_rotated_refresh_tokens_are_persisted_before_use(sandbox: QuickBooksSandbox, clock: ManualClock) -> None:
    """Each refresh stores the new refresh token; a second connector on the same store carries on with it."""
    store = MemoryTokenStore()
    initial = sandbox.issue_tokens()["refresh_token"]
    ledger = make_ledger(sandbox, clock, store, refresh_token=initial)
    one_customer(ledger)
    saved = store.load(ledger.settings.connection_name)
    assert saved is not None
    assert saved["refresh_token"] != initial
    clock.advance(3600)  # the access token expires: the next call refreshes and rotates again
    list(ledger.list_customers())
    rotated = store.load(ledger.settings.connection_name)
    assert rotated is not None
    assert rotated["refresh_token"] != saved["refresh_token"]
    assert store.saves == 2
    successor = make_ledger(sandbox, clock, store, refresh_token=initial)  # the config's token is dead by now
    assert [c.number for c in successor.list_customers()] == ["LB-hubspot-1"]
    assert sandbox.refresh_rejected == 0


def test_from_config_validates_and_hides_secrets(sandbox: QuickBooksSandbox) -> None:
    """from_config builds a working connector; an invalid block is a ConfigError naming fields, not secrets."""
    ledger = QuickBooksLedger.from_config(
        {"type": "quickbooks", "realm_id": sandbox.realm_id, "client_id": DEMO_CLIENT_ID,
         "client_secret": DEMO_CLIENT_SECRET, "refresh_token": sandbox.issue_tokens()["refresh_token"]},
        MemoryTokenStore(), transport=sandbox.transport(),
    )
    assert ledger.find_customers_by_number(["nobody"]) == {}
    with pytest.raises(ConfigError) as err:
        QuickBooksLedger.from_config({"type": "quickbooks", "client_id": "x", "client_secret": CANARY_SECRET,
                                      "requests_per_minute": 0, "minor_version": 70}, MemoryTokenStore())
    text = str(err.value)
    assert "realm_id" in text
    assert "requests_per_minute" in text
    assert "minor_version" in text
    assert CANARY_SECRET not in text


def test_no_secret_reaches_an_error_or_a_log(clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """Client secret, refresh and access tokens never appear in raised errors or captured logs."""
    sandbox = QuickBooksSandbox(clock=clock, client_secret=CANARY_SECRET, initial_refresh_token=CANARY_REFRESH)
    store = MemoryTokenStore()
    ledger = make_ledger(sandbox, clock, store, client_secret=CANARY_SECRET, refresh_token=CANARY_REFRESH,
                         max_attempts=2)
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        cid = one_customer(ledger)
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

"""The contract every ledger connector keeps, checked against its sandbox for each registered ``ledgerbridge.ledger``.

Each test runs once per connector that :func:`connectors.registry.available` lists, against the vendor's sandbox
served on a socket; the vendor specifics (how to build and act on the sandbox, the company's tax types) come from
``ledger_kits.py``. A registered connector without a kit fails the suite.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.domain import Address, Customer, Invoice, InvoiceLine
from connectors.errors import AmbiguousWriteError, AuthError, ConnectorError, LedgerBridgeError
from connectors.interfaces import CreateOutcome, InvoiceRequest, Ledger, LedgerCustomer
from connectors.registry import available, connector_class, registered
from connectors.sandboxkit import Fault, FaultPlan, SandboxApp, SandboxServer, serve
from connectors.seedbook import PRODUCTS, generate_book
from connectors.seedhistory import book_customer
from connectors.xero import XeroLedger
from connectors.xero.testing import MemoryTokenStore
from tests.contract.ledger_kits import KITS, SCALE, SEED, LedgerKit, StepClock

VENDORS = available("ledger")
FAULTS = "429=0.2,503=0.2"
ISSUED = dt.date(2026, 1, 15)
CREDITED = dt.date(2026, 1, 20)
GONE = {"DELETED", "VOIDED"}
PAID = Decimal("100.00")
P20 = next(p for p in PRODUCTS if p.tax_rate == Decimal("20"))
P55 = next(p for p in PRODUCTS if p.tax_rate == Decimal("5.5"))

each_ledger = pytest.mark.parametrize("vendor", VENDORS)


def kit_for(vendor: str) -> LedgerKit:
    kit = KITS.get(vendor)
    if kit is None:
        pytest.fail(f"the ledger connector {vendor!r} is registered but has no contract kit: add a LedgerKit subclass "
                    f"for it to tests/contract/ledger_kits.py (and to KITS) so that the ledger contract suite runs "
                    f"against it")
    return kit


class Tokens(MemoryTokenStore):
    """The token store, remembering which connections were saved."""

    def __init__(self) -> None:
        super().__init__()
        self.connections: set[str] = set()

    def save(self, connection: str, token: dict[str, Any]) -> None:
        super().save(connection, token)
        self.connections.add(connection)


class NextWriteDropped(FaultPlan):
    """``drop_after_commit=1.0`` (seed 1) on the next write only: the write is committed and its answer lost, then
    the plan puts ``FaultPlan(None)`` back itself, so that a client resending the same write is answered."""

    def __init__(self, sandbox: SandboxApp) -> None:
        super().__init__("drop_after_commit=1.0", seed=1)
        self._sandbox = sandbox
        self._once = threading.Lock()
        self.fired = False

    def decide(self, is_write: bool) -> Fault | None:
        with self._once:
            if self.fired:
                return None
            fault = super().decide(is_write)
            if fault is not None:
                self.fired = True
                self._sandbox.faults = FaultPlan(None)
            return fault


def book_customers(n: int) -> list[tuple[str, Customer]]:
    """``n`` French companies of the seeded book (VAT number, SIREN, SIRET, e-mail, address) with their numbers."""
    book = generate_book(SEED, companies=40, deals=1)
    picked = [c for c in book.companies
              if c.country == "FR" and c.vat_number and c.siren and c.siret and c.email][:n]
    assert len(picked) == n
    return [(f"CRM-{c.id}", Customer(
        crm_id=c.id, name=c.name, domain=c.domain, email=c.email, vat_number=c.vat_number, siren=c.siren,
        siret=c.siret, country=c.country, currency=c.currency,
        address=Address(line1=c.address, city=c.city, postal_code=c.postal_code, country=c.country),
    )) for c in picked]


def book_customer_in(currency: str) -> tuple[str, Customer]:
    """A company of the seeded book that is invoiced in ``currency`` (a US company for USD), with its number."""
    book = generate_book(SEED, companies=40, deals=1)
    company = next(c for c in book.companies if c.currency == currency)
    return f"CRM-{company.id}", book_customer(company)


def invoice_lines(kit: LedgerKit, n: int, tax_20: str | None = None) -> list[InvoiceLine]:
    """Three lines at 20 % and 5.5 %, one discounted, with amounts whose rounding happens per line."""
    t20 = tax_20 or kit.tax_20
    return [
        InvoiceLine(description=P20.name, quantity=Decimal(1 + n % 3), unit_price=P20.unit_price,
                    tax_rate=Decimal("20"), item_code=P20.sku, account_code="706", tax_type=t20),
        InvoiceLine(description=f"{P20.name} (remise)", quantity=Decimal(3), unit_price=Decimal("33.335"),
                    discount_percent=Decimal("12.5"), tax_rate=Decimal("20"), item_code=P20.sku, account_code="706",
                    tax_type=t20),
        InvoiceLine(description=P55.name, quantity=Decimal(7 + n % 5), unit_price=Decimal("12.345"),
                    tax_rate=Decimal("5.5"), item_code=P55.sku, account_code="706", tax_type=kit.tax_55),
    ]


@dataclass
class Books:
    """One vendor's fresh sandbox behind the module's server, and the connectors built against it."""

    vendor: str
    kit: LedgerKit
    sandbox: SandboxApp
    clock: StepClock
    server: SandboxServer
    oauth: bool
    tokens: Tokens = field(default_factory=lambda: Tokens())
    ledgers: list[Ledger] = field(default_factory=list)
    block: dict[str, Any] = field(default_factory=dict)
    customer_id: str | None = None

    def __post_init__(self) -> None:
        self.block = self.kit.settings(self.sandbox, self.server.url, oauth=self.oauth)

    def ledger(self, **overrides: Any) -> Ledger:
        """A new connector instance (a new process, as far as it knows) sharing the token store."""
        cls = connector_class("ledger", self.vendor)
        led = cls.from_config({**self.block, **overrides}, self.tokens)
        self.ledgers.append(led)
        return led

    def admin(self, path: str) -> Any:
        with httpx.Client(base_url=self.server.url, timeout=30) as admin:
            return admin.get(path).json()

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice the sandbox holds, from its ``GET /_sandbox/invoices``."""
        rows: list[dict[str, Any]] = self.admin("/_sandbox/invoices")
        return rows

    def live(self) -> dict[str, list[dict[str, Any]]]:
        """The live (not deleted, not voided) invoices by reference."""
        out: dict[str, list[dict[str, Any]]] = {}
        for row in self.invoices():
            if row["Status"] not in GONE:
                out.setdefault(str(row["Reference"]), []).append(row)
        return out

    def customer_numbers(self) -> list[str]:
        """The external number of every customer the sandbox holds (one entry per customer)."""
        numbers = [self.kit.number_of(row) for row in self.admin(self.kit.customers_path)]
        return [n for n in numbers if n is not None]

    def now(self) -> dt.datetime:
        """The vendor's now (its clock is compressed and may have been moved forward)."""
        return dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)

    def settle(self, led: Ledger) -> None:
        """Let the ledger's declared settle time pass on the vendor's clock (its search catches up with writes)."""
        self.clock.advance(led.lookup_settle_s * SCALE + 1.0)

    def customer(self, led: Ledger) -> str:
        """The ledger id of one customer created for this test's invoices."""
        if self.customer_id is None:
            number, customer = book_customers(1)[0]
            created = led.create_customers([(number, customer)], "contract-customer")
            assert number in created
            self.customer_id = created[number].ledger_id
        return self.customer_id

    def request(self, tag: str, customer_id: str, *, n: int = 0, tax_20: str | None = None) -> InvoiceRequest:
        invoice = Invoice(reference=f"LB-contract:{tag}", currency="EUR", lines=invoice_lines(self.kit, n, tax_20),
                          issue_date=ISSUED, due_date=ISSUED + dt.timedelta(days=30), status="authorised")
        return InvoiceRequest(idempotency_key=f"intent-{tag}", invoice=invoice, customer_ledger_id=customer_id)

    def requests(self, tag: str, customer_id: str, count: int) -> list[InvoiceRequest]:
        return [self.request(f"{tag}-{i:03d}", customer_id, n=i) for i in range(count)]

    def create(self, led: Ledger, reqs: Sequence[InvoiceRequest], key: str) -> list[CreateOutcome]:
        """Create ``reqs`` in batches of the ledger's ``max_batch``; outcomes come back in the order asked."""
        out: list[CreateOutcome] = []
        for start in range(0, len(reqs), led.max_batch):
            chunk = reqs[start : start + led.max_batch]
            got = led.create_invoices(chunk, f"{key}-{start // led.max_batch}")
            assert [o.idempotency_key for o in got] == [r.idempotency_key for r in chunk]
            out.extend(got)
        return out

    def secrets(self, overrides: dict[str, Any] | None = None) -> list[str]:
        """Every credential in play: the settings' SecretStr fields and every token the store holds."""
        model = connector_class("ledger", self.vendor).Settings
        block = {**self.block, **(overrides or {})}
        found = [str(block[name]) for name, f in model.model_fields.items()
                 if "SecretStr" in repr(f.annotation) and block.get(name)]
        for connection in self.tokens.connections:
            stored = self.tokens.load(connection) or {}
            found += [str(stored[k]) for k in ("access_token", "refresh_token") if stored.get(k)]
        return found

    def close(self) -> None:
        for led in self.ledgers:
            led.close()


OpenBooks = Callable[..., Books]


@pytest.fixture
def books(servers: dict[str, SandboxServer]) -> Iterator[OpenBooks]:
    """Opens a vendor's fresh sandbox (optional fault plan, static credential or OAuth app) behind its server."""
    opened: list[Books] = []

    def open_books(vendor: str, *, oauth: bool = False) -> Books:
        kit = kit_for(vendor)
        clock = StepClock()
        sb = kit.build(clock=clock)
        server = servers.get(vendor)
        if server is None:
            server = servers[vendor] = serve(sb)
        server.app = sb
        env = Books(vendor, kit, sb, clock, server, oauth)
        opened.append(env)
        return env

    yield open_books
    for env in opened:
        env.close()


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and those a traceback would show with it (causes, unsuppressed contexts)."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ if cur.__cause__ is not None else (None if cur.__suppress_context__ else cur.__context__)
    return out


def check_clean(exc: ConnectorError, secrets: list[str]) -> None:
    """Only LedgerBridge errors in the chain, and no credential in any message or body excerpt."""
    assert secrets
    for e in _chain(exc):
        assert isinstance(e, LedgerBridgeError), f"{type(e).__module__}.{type(e).__name__} escaped the adapter"
        texts = [str(e), repr(e)]
        if isinstance(e, ConnectorError):
            texts += [e.detail, e.body or ""]
        for secret in secrets:
            assert all(secret not in t for t in texts), "a credential is in an error message"


def check_customer(got: LedgerCustomer, number: str, sent: Customer) -> None:
    """A customer read back from the ledger carries the number, name, VAT number, e-mail and company id sent."""
    assert got.ledger_id
    assert got.number == number
    assert got.name == sent.name
    assert got.vat_number == sent.vat_number
    assert got.email == sent.email
    assert got.company_id in {sent.siren, sent.siret}


def check_invoice(got: Invoice, req: InvoiceRequest) -> str:
    """An invoice read from the ledger is the one sent: reference, customer, date, currency, its ledger number and
    total, and lines that give back the amounts sent (unit prices, quantities, discounts, tax types); its id."""
    sent = req.invoice
    ref = sent.reference
    assert got.ledger_id, ref
    assert got.reference == ref
    assert got.number, ref
    assert got.customer_ledger_id == req.customer_ledger_id, ref
    assert (got.issue_date, got.currency) == (sent.issue_date, sent.currency), ref
    assert got.ledger_total == sent.total, ref
    assert [ln.tax_type for ln in got.lines] == [ln.tax_type for ln in sent.lines], ref
    assert [(ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate) for ln in got.lines] == [
        (ln.quantity, ln.unit_price, ln.discount_percent, ln.tax_rate) for ln in sent.lines], ref
    assert (got.subtotal, got.total) == (sent.subtotal, sent.total), ref
    return got.ledger_id


def check_created(outcome: CreateOutcome, req: InvoiceRequest) -> str:
    """A successful outcome carries the ledger's invoice for the request (see :func:`check_invoice`); its id."""
    assert outcome.ok, outcome.error
    assert outcome.invoice is not None
    assert outcome.invoice.status == "authorised"
    return check_invoice(outcome.invoice, req)


def check_once(env: Books, reqs: Sequence[InvoiceRequest]) -> dict[str, str]:
    """The sandbox holds exactly one live invoice per reference of ``reqs`` and nothing else; reference -> id."""
    live = env.live()
    assert Counter({ref: len(rows) for ref, rows in live.items()}) == Counter(r.invoice.reference for r in reqs)
    return {ref: str(rows[0]["InvoiceID"]) for ref, rows in live.items()}


# -- the suite ------------------------------------------------------------------------------------------------

def test_every_registered_ledger_has_a_kit() -> None:
    """Every connector registered under ledgerbridge.ledger has a contract kit; a missing one fails here."""
    assert VENDORS, "no ledger connector is registered"
    for vendor in VENDORS:
        assert kit_for(vendor).vendor == vendor
        assert connector_class("ledger", vendor).vendor == vendor


def test_a_ledger_without_a_kit_fails_the_suite() -> None:
    """A ledger registered without a kit fails (not skips) with a message saying where to add one."""
    with registered("ledger", "contract-probe", XeroLedger):
        assert "contract-probe" in available("ledger")
        with pytest.raises(pytest.fail.Exception, match=r"tests/contract/ledger_kits\.py"):
            kit_for("contract-probe")


@each_ledger
def test_customers_are_created_once_and_found_by_number(vendor: str, books: OpenBooks) -> None:
    """Three customers created under numbers are listed and found by number; a replay of the key creates none."""
    env = books(vendor)
    pairs = book_customers(3)
    numbers = [n for n, _ in pairs]
    sent = dict(pairs)
    created = env.ledger().create_customers(pairs, "contract-customers")
    assert set(created) == set(numbers)
    for number, got in created.items():
        check_customer(got, number, sent[number])
    # Small pages: the listing and the lookup read more than one page.
    listed = [c for c in env.ledger(page_size=2).list_customers() if c.number in sent]
    assert Counter(c.number for c in listed) == Counter(numbers)
    assert {c.number: c.ledger_id for c in listed} == {n: c.ledger_id for n, c in created.items()}
    found = env.ledger(page_size=2).find_customers_by_number([*numbers, "CRM-C99999"])
    assert set(found) == set(numbers)
    for number, got in found.items():
        check_customer(got, number, sent[number])
        assert got.ledger_id == created[number].ledger_id
    # A run that died before saving what it created replays the same key: nothing is created twice.
    again = env.ledger().create_customers(pairs, "contract-customers")
    assert {n: c.ledger_id for n, c in again.items()} == {n: c.ledger_id for n, c in created.items()}
    assert Counter(env.customer_numbers()) == Counter(numbers)


@each_ledger
def test_invoices_are_created_in_batches_and_a_bad_one_fails_alone(vendor: str, books: OpenBooks) -> None:
    """Over more than one batch, every invoice is created once with the domain totals; two invalid ones fail alone."""
    env = books(vendor)
    led = env.ledger()
    kit = env.kit
    cid = env.customer(led)
    reqs = env.requests("batch", cid, led.max_batch + 3)
    bad_tax, bad_customer = 1, led.max_batch + 1  # one in each batch
    reqs[bad_tax] = env.request("batch-bad-tax", cid, tax_20=kit.unknown_tax_type)
    reqs[bad_customer] = env.request("batch-bad-customer", kit.unknown_customer_id)
    outcomes = env.create(led, reqs, "contract-batch")
    failed = {o.idempotency_key: o.error for o in outcomes if not o.ok}
    assert set(failed) == {reqs[bad_tax].idempotency_key, reqs[bad_customer].idempotency_key}
    assert all(failed.values())
    good = [(r, o) for r, o in zip(reqs, outcomes, strict=True) if o.ok]
    ids = {r.invoice.reference: check_created(o, r) for r, o in good}
    assert check_once(env, [r for r, _ in good]) == ids
    rows = {str(row["Reference"]): row for row in env.invoices()}
    for req, _ in good:
        row = rows[req.invoice.reference]
        assert Decimal(str(row["SubTotal"])) == req.invoice.subtotal, req.invoice.reference
        assert Decimal(str(row["Total"])) == req.invoice.total, req.invoice.reference
        assert row["Status"] == "AUTHORISED"


@each_ledger
def test_an_unanswered_create_is_resolved_without_a_duplicate(vendor: str, books: OpenBooks) -> None:
    """A create whose answer is lost is replayed (idempotent ledgers) or found by reference; never created twice.

    Ledgers with idempotent creates (Xero, QuickBooks) resend the write with the same key and complete, or raise
    AmbiguousWriteError; the same requests and key again give the same ids and create nothing. Pennylane has no
    idempotency key: the create raises AmbiguousWriteError, the invoice is found by reference once the declared
    settle time has passed, and the second call creates only the invoices that were never sent.
    """
    env = books(vendor)
    led = env.ledger()
    cid = env.customer(led)
    reqs = env.requests("unanswered", cid, 3)
    key = "contract-unanswered"
    plan = NextWriteDropped(env.sandbox)
    env.sandbox.faults = plan
    first: list[CreateOutcome] | None = None
    try:
        first = led.create_invoices(reqs, key)
    except AmbiguousWriteError as exc:
        check_clean(exc, env.secrets())
    assert plan.fired
    assert plan.injected == {"drop_after_commit": 1}
    assert not env.sandbox.faults.enabled
    committed = {ref: str(rows[0]["InvoiceID"]) for ref, rows in env.live().items()}
    assert committed  # the dropped write was applied
    assert all(len(rows) == 1 for rows in env.live().values())
    if first is not None:
        assert led.idempotent_creates, "only a ledger with idempotent creates may complete an unanswered create"
        assert {r.invoice.reference: check_created(o, r) for r, o in zip(reqs, first, strict=True)} == committed
    if not led.idempotent_creates:
        assert first is None, "a ledger without idempotent creates must report an unanswered create as ambiguous"
        assert led.lookup_settle_s > 0
        env.settle(led)
        found = env.ledger().find_invoices_by_reference([r.invoice.reference for r in reqs])
        sent = {r.invoice.reference: r for r in reqs}
        assert {ref: check_invoice(inv, sent[ref]) for ref, inv in found.items()} == committed
    before = len(env.invoices())
    again = env.ledger().create_invoices(reqs, key)
    ids = {r.invoice.reference: check_created(o, r) for r, o in zip(reqs, again, strict=True)}
    assert len(env.invoices()) - before == len(reqs) - len(committed)
    assert {ref: ids[ref] for ref in committed} == committed
    assert check_once(env, reqs) == ids


@each_ledger
def test_lookup_by_reference_returns_exactly_the_known_ones(vendor: str, books: OpenBooks) -> None:
    """Over 62 known references mixed with unknown ones, find_invoices_by_reference returns exactly the known."""
    env = books(vendor)
    led = env.ledger()
    cid = env.customer(led)
    reqs = env.requests("lookup", cid, 62)
    ids = {r.invoice.reference: check_created(o, r)
           for r, o in zip(reqs, env.create(led, reqs, "contract-lookup"), strict=True)}
    env.settle(led)
    refs = list(ids)
    unknown = [f"LB-contract:missing-{i:03d}" for i in range(6)]
    asked = [*refs[:30], *unknown[:3], refs[0], *refs[30:], *unknown[3:]]
    found = env.ledger().find_invoices_by_reference(asked)
    assert set(found) == set(refs)
    sent = {r.invoice.reference: r for r in reqs}
    for ref, invoice in found.items():
        assert check_invoice(invoice, sent[ref]) == ids[ref]
        assert invoice.status == "authorised"
    assert env.ledger().find_invoices_by_reference(unknown) == {}


@each_ledger
def test_changes_since_a_time_are_the_new_and_paid_invoices_and_the_payment(vendor: str, books: OpenBooks) -> None:
    """list_invoices(T) gives the invoices created or paid after T, not the others; list_payments(T) the payment."""
    env = books(vendor)
    led = env.ledger()
    cid = env.customer(led)
    old = env.requests("old", cid, 3)
    old_ids = [check_created(o, r) for r, o in zip(old, env.create(led, old, "contract-old"), strict=True)]
    everything = list(env.ledger().list_invoices(None))
    assert Counter(i.reference for i in everything) == Counter(r.invoice.reference for r in old)
    sent = {r.invoice.reference: r for r in old}
    for invoice in everything:
        check_invoice(invoice, sent[invoice.reference])
    env.clock.advance(120)
    since = env.now()
    env.clock.advance(60)
    new = env.requests("new", cid, 2)
    new_ids = [check_created(o, r) for r, o in zip(new, env.create(led, new, "contract-new"), strict=True)]
    paid_id = old_ids[0]
    payment_id = env.kit.pay(env.sandbox, paid_id, PAID)
    changed = list(env.ledger().list_invoices(since))
    assert Counter(i.ledger_id for i in changed) == Counter([*new_ids, paid_id])
    assert {i.reference for i in changed} == {new[0].invoice.reference, new[1].invoice.reference,
                                              old[0].invoice.reference}
    sent.update({r.invoice.reference: r for r in new})
    for invoice in changed:
        check_invoice(invoice, sent[invoice.reference])
    [paid] = [i for i in changed if i.ledger_id == paid_id]
    assert paid.amount_paid == PAID
    assert paid.amount_due == old[0].invoice.total - PAID
    payments = list(env.ledger().list_payments(since))
    assert [(p.ledger_id, p.invoice_ledger_id, p.amount, p.currency) for p in payments] == [
        (payment_id, paid_id, PAID, "EUR")]
    assert isinstance(payments[0].amount, Decimal)
    assert payment_id in {p.ledger_id for p in env.ledger().list_payments(None)}
    assert len(list(env.ledger().list_invoices(None))) == len(old) + len(new)


@each_ledger
def test_429_and_5xx_on_reads_are_retried_and_results_stay_complete(vendor: str, books: OpenBooks) -> None:
    """Under seeded 429 and 503 faults on reads, listing and lookups still return everything; retries are counted."""
    env = books(vendor)
    led = env.ledger()
    cid = env.customer(led)
    reqs = env.requests("faults", cid, 12)
    for r, o in zip(reqs, env.create(led, reqs, "contract-faults"), strict=True):
        check_created(o, r)
    env.settle(led)
    refs = [r.invoice.reference for r in reqs]
    plan = FaultPlan(FAULTS, seed=SEED)
    env.sandbox.faults = plan
    reader = env.ledger(page_size=5)  # several pages: a retried page must be neither skipped nor read twice
    assert Counter(i.reference for i in reader.list_invoices(None)) == Counter(refs)
    assert set(reader.find_invoices_by_reference(refs)) == set(refs)
    injected = plan.injected
    assert injected.get("429", 0) > 0
    assert injected.get("503", 0) > 0
    assert reader.stats.retries > 0
    assert reader.stats.retries >= sum(injected.values())
    assert reader.stats.rate_limited >= injected.get("429", 0)


@each_ledger
def test_an_expired_access_token_is_refreshed_once_and_the_rotation_kept(vendor: str, books: OpenBooks) -> None:
    """OAuth ledgers refresh once when the access token expires mid-listing and keep the rotated refresh token.

    Xero and QuickBooks (always OAuth) and Pennylane (its OAuth app option): the listing completes after exactly
    one call to the sandbox's token endpoint, the token store then holds the new (rotated) refresh token, and a new
    instance on the same store makes no token call, although its configured refresh token is used up. A ledger with
    no OAuth flow instead gets its static token revoked mid-listing: an AuthError whose text carries no token.
    """
    kit = kit_for(vendor)
    endpoint = kit.token_endpoint
    if endpoint is None:
        env = books(vendor)
        led = env.ledger(page_size=2)
        cid = env.customer(led)
        env.create(led, env.requests("static", cid, 5), "contract-static")
        stream = led.list_invoices(None)
        next(stream)
        kit.revoke(env.sandbox)
        with pytest.raises(AuthError) as caught:
            list(stream)
        check_clean(caught.value, env.secrets())
        return
    env = books(vendor, oauth=True)
    initial = env.block["refresh_token"]
    led = env.ledger(page_size=2)
    cid = env.customer(led)
    reqs = env.requests("oauth", cid, 5)
    env.create(led, reqs, "contract-oauth")
    assert led.stats.by_endpoint.get(endpoint, 0) == 1  # the first access token
    assert kit.token_calls(env.sandbox) == 1
    [connection] = env.tokens.connections  # one token set, under the connector's connection name
    before = env.tokens.load(connection)
    assert before is not None
    stream = led.list_invoices(None)
    listed = [next(stream)]
    kit.expire_access(env.sandbox)
    listed += list(stream)
    assert Counter(i.reference for i in listed) == Counter(r.invoice.reference for r in reqs)
    assert kit.token_calls(env.sandbox) == 2
    assert led.stats.by_endpoint.get(endpoint, 0) == 2
    stored = env.tokens.load(connection)
    assert stored is not None
    assert stored["access_token"] != before["access_token"]
    if kit.rotates_refresh_tokens:
        assert stored["refresh_token"] not in {initial, before["refresh_token"]}
    else:
        assert stored["refresh_token"] == initial
    # The configured refresh token was used up by the first refresh (rotating ledgers): a new instance with the same
    # configuration takes the stored chain, not the configured token (a different configured token would replace it).
    later = env.ledger()
    refs = [r.invoice.reference for r in reqs[:2]]
    assert set(later.find_invoices_by_reference(refs)) == set(refs)
    assert later.stats.by_endpoint.get(endpoint, 0) == 0
    assert kit.token_calls(env.sandbox) == 2


@each_ledger
def test_a_revoked_credential_mid_listing_is_an_auth_error_without_secrets(vendor: str, books: OpenBooks) -> None:
    """The default credential revoked mid-listing ends the listing with an AuthError that carries no credential.

    Pennylane's company API token is revoked; Xero and QuickBooks (OAuth only) have their grant revoked and their
    access tokens expired, so the refresh the connector attempts is refused.
    """
    kit = kit_for(vendor)
    env = books(vendor)
    led = env.ledger(page_size=2)
    cid = env.customer(led)
    env.create(led, env.requests("revoked", cid, 5), "contract-revoked")
    stream = led.list_invoices(None)
    next(stream)
    kit.revoke(env.sandbox)
    with pytest.raises(AuthError) as caught:
        list(stream)
    assert caught.value.vendor == vendor
    check_clean(caught.value, env.secrets())


@each_ledger
def test_bad_credentials_are_an_auth_error_and_no_vendor_exception_escapes(vendor: str, books: OpenBooks) -> None:
    """A refused credential is an AuthError, no vendor type in its chain, no credential in it or in a rejection."""
    kit = kit_for(vendor)
    env = books(vendor)
    bad = kit.bad_credentials()
    with pytest.raises(AuthError) as refused:
        env.ledger(**bad).find_invoices_by_reference(["LB-contract:anything"])
    assert refused.value.vendor == vendor
    check_clean(refused.value, env.secrets(bad))
    led = env.ledger()
    cid = env.customer(led)
    [rejected] = led.create_invoices([env.request("rejected", cid, tax_20=kit.unknown_tax_type)], "contract-rejected")
    assert not rejected.ok
    assert rejected.error
    assert all(secret not in rejected.error for secret in env.secrets(bad))
    assert env.live() == {}


@each_ledger
def test_paid_and_part_paid_invoices_read_back_with_due_dates_amounts_and_a_link(vendor: str, books: OpenBooks) -> None:
    """list_invoices gives the due date, amount paid and amount due; an invoice paid in full is "paid"; the base
    currency is the company's; a home-currency invoice has no rate or 1; invoice_url is None or an https address
    naming the invoice."""
    env = books(vendor)
    led = env.ledger()
    assert led.base_currency() == env.kit.base_currency
    cid = env.customer(led)
    reqs = env.requests("settled", cid, 3)
    ids = [check_created(o, r) for r, o in zip(reqs, env.create(led, reqs, "contract-settled"), strict=True)]
    full = reqs[0].invoice.total
    env.kit.pay(env.sandbox, ids[0], full)
    env.kit.pay(env.sandbox, ids[1], PAID)
    got = {i.ledger_id: i for i in env.ledger().list_invoices(None)}
    assert set(got) == set(ids)
    expected = [("paid", full, Decimal(0)), ("authorised", PAID, reqs[1].invoice.total - PAID),
                ("authorised", Decimal(0), reqs[2].invoice.total)]
    for invoice_id, req, (status, paid, due) in zip(ids, reqs, expected, strict=True):
        invoice = got[invoice_id]
        assert invoice.status == status, req.invoice.reference
        assert (invoice.amount_paid or Decimal(0), invoice.amount_due) == (paid, due), req.invoice.reference
        assert invoice.due_date == req.invoice.due_date
        assert invoice.exchange_rate in (None, Decimal(1))
        url = led.invoice_url(invoice)
        assert url is None or (url.startswith("https://") and invoice_id in url), url


@each_ledger
def test_a_credit_note_applied_to_an_invoice_is_listed_with_its_allocation(vendor: str, books: OpenBooks) -> None:
    """A credit note applied to an invoice is listed (since a time before it) with its customer, total, date and
    allocation, and nothing left to apply; the invoice is listed as changed with its amount due lowered by it."""
    env = books(vendor)
    led = env.ledger()
    cid = env.customer(led)
    [req] = env.requests("credited", cid, 1)
    [invoice_id] = [check_created(o, r) for r, o in zip([req], env.create(led, [req], "contract-credited"),
                                                          strict=True)]
    assert list(env.ledger().list_credit_notes(None)) == []
    env.clock.advance(120)
    since = env.now()
    env.clock.advance(60)
    credit = Decimal("120.00")
    note_id = env.kit.add_credit_note(env.sandbox, invoice_id, credit, CREDITED)
    notes = {n.ledger_id: n for n in env.ledger().list_credit_notes(since)}
    assert set(notes) == {note_id}
    note = notes[note_id]
    assert note.customer_ledger_id == cid
    assert (note.currency, note.issue_date, note.total, note.remaining) == (env.kit.base_currency, CREDITED, credit,
                                                                            Decimal(0))
    assert Decimal(0) < note.subtotal <= note.total
    assert note.status in {"authorised", "paid"}
    assert isinstance(note.total, Decimal)
    assert [(a.invoice_ledger_id, a.amount, a.date) for a in note.allocations] == [(invoice_id, credit, CREDITED)]
    assert {n.ledger_id for n in env.ledger().list_credit_notes(None)} == {note_id}
    [invoice] = [i for i in env.ledger().list_invoices(since) if i.ledger_id == invoice_id]
    assert invoice.amount_due == req.invoice.total - credit
    assert invoice.status == "authorised"
    env.clock.advance(120)
    assert list(env.ledger().list_credit_notes(env.now())) == []


@each_ledger
def test_a_foreign_currency_invoice_carries_the_rate_the_ledger_recorded(vendor: str, books: OpenBooks) -> None:
    """An invoice in the foreign currency reads back with an exchange rate in home-currency units per unit of its
    currency (within the kit's bounds, so a rate read the wrong way round fails); the home one has none or 1."""
    env = books(vendor)
    kit = env.kit
    led = env.ledger()
    number, customer = book_customer_in(kit.foreign_currency)
    created = led.create_customers([(number, customer)], "contract-foreign-customer")
    assert number in created
    home = env.request("home", env.customer(led))
    invoice = Invoice(reference="LB-contract:foreign", currency=kit.foreign_currency, lines=invoice_lines(kit, 1),
                      issue_date=ISSUED, due_date=ISSUED + dt.timedelta(days=30), status="authorised")
    foreign = InvoiceRequest(idempotency_key="intent-foreign", invoice=invoice,
                             customer_ledger_id=created[number].ledger_id)
    ids = [check_created(o, r) for r, o in zip([home, foreign], env.create(led, [home, foreign], "contract-foreign"),
                                                strict=True)]
    got = {i.ledger_id: i for i in env.ledger().list_invoices(None)}
    assert got[ids[0]].exchange_rate in (None, Decimal(1))
    rate = got[ids[1]].exchange_rate
    low, high = kit.foreign_rate_bounds
    assert rate is not None
    assert low < rate < high, rate


@each_ledger
def test_expenses_are_the_lines_of_the_asked_accounts_within_the_dates(vendor: str, books: OpenBooks) -> None:
    """list_expenses gives the purchase lines of the accounts asked, dated within [start, end] (both ends in), net
    of tax, in the base currency; lines of another account or outside the dates are left out."""
    env = books(vendor)
    kit = env.kit
    led = env.ledger()
    mapped, other = kit.expense_accounts
    start, end = dt.date(2026, 1, 1), dt.date(2026, 1, 31)
    kit.add_expense(env.sandbox, mapped, dt.date(2026, 1, 12), Decimal("1250.40"), "Campagne de recherche – janvier")
    kit.add_expense(env.sandbox, other, dt.date(2026, 1, 14), Decimal("310.00"), "Déplacement client")
    kit.add_expense(env.sandbox, mapped, dt.date(2025, 12, 31), Decimal("999.00"), "Campagne de recherche – décembre")
    kit.add_expense(env.sandbox, mapped, dt.date(2026, 2, 1), Decimal("888.00"), "Campagne de recherche – février")
    kit.add_expense(env.sandbox, mapped, end, Decimal("75.25"), "Campagne de recherche – fin de mois")
    lines = list(env.ledger().list_expenses([mapped], start, end))
    assert sorted((ln.date, ln.account_code, ln.net, ln.currency) for ln in lines) == [
        (dt.date(2026, 1, 12), mapped, Decimal("1250.40"), kit.base_currency),
        (end, mapped, Decimal("75.25"), kit.base_currency),
    ]
    assert len({ln.ledger_id for ln in lines}) == 2
    assert all(ln.exchange_rate in (None, Decimal(1)) for ln in lines)
    both = list(env.ledger().list_expenses([mapped, other], start, end))
    assert sorted(ln.net for ln in both) == [Decimal("75.25"), Decimal("310.00"), Decimal("1250.40")]
    assert list(led.list_expenses([mapped], dt.date(2026, 3, 1), dt.date(2026, 3, 31))) == []

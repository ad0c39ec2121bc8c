"""What XeroLedger sends and what the Xero sandbox answers validate against Xero's OpenAPI spec."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict

from connectors.domain import Address, Customer, Invoice, InvoiceLine
from connectors.interfaces import InvoiceRequest
from connectors.xero import XeroLedger, wire
from connectors.xero.sandbox import API_PREFIX, DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, XeroSandbox
from connectors.xero.settings import XeroSettings
from connectors.xero.testing import ManualClock, MemoryTokenStore

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
SPEC = SHARED / "specs" / "xero" / "xero_accounting.yaml"
SPEC_HOST = "https://api.xero.com"

# openapi-core does not check OAuth2 security schemes and says so with a warning; the bearer token is the
# sandbox's business (tests/unit/test_xero_sandbox.py covers it).
pytestmark = pytest.mark.filterwarnings("ignore:Unsupported scheme type:UserWarning")


@pytest.fixture(scope="session")
def spec() -> OpenAPI:
    # The published spec has a few examples of the wrong type; validating the spec itself is not our job.
    return OpenAPI.from_file_path(str(SPEC), config=Config(spec_validator_cls=None))


class SpecRequest:
    """An httpx request seen through openapi-core's Request protocol, on Xero's production host."""

    def __init__(self, request: httpx.Request) -> None:
        self._request = request
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(request.url.query.decode(), keep_blank_values=True)),
            header=Headers(list(request.headers.items())),
        )

    @property
    def host_url(self) -> str:
        return SPEC_HOST

    @property
    def path(self) -> str:
        return self._request.url.path

    @property
    def method(self) -> str:
        return self._request.method.lower()

    @property
    def body(self) -> bytes | None:
        content = self._request.content
        return content or None

    @property
    def content_type(self) -> str:
        return str(self._request.headers.get("content-type", "")).lower()


class SpecResponse:
    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def status_code(self) -> int:
        return self._response.status_code

    @property
    def content_type(self) -> str:
        return str(self._response.headers.get("content-type", "")).lower()

    @property
    def headers(self) -> Headers:
        return Headers(list(self._response.headers.items()))

    @property
    def data(self) -> bytes:
        return self._response.content


class Recorder:
    """A transport in front of the sandbox that keeps every API exchange."""

    def __init__(self, sandbox: XeroSandbox) -> None:
        self.sandbox = sandbox
        self.exchanges: list[tuple[httpx.Request, httpx.Response]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        response = self.sandbox.handle_httpx(request)
        response.read()
        if request.url.path.startswith(API_PREFIX):
            self.exchanges.append((request, response))
        return response

    def operations(self) -> set[str]:
        return {f"{r.method} {r.url.path.removeprefix(API_PREFIX)}" for r, _ in self.exchanges}


def check(spec: OpenAPI, exchanges: list[tuple[httpx.Request, httpx.Response]]) -> None:
    for request, response in exchanges:
        wrapped = SpecRequest(request)
        spec.validate_request(wrapped)
        spec.validate_response(wrapped, SpecResponse(response))


@pytest.fixture
def world() -> tuple[XeroSandbox, Recorder, XeroLedger, ManualClock]:
    clock = ManualClock()
    sandbox = XeroSandbox(clock=clock, seed=21)
    recorder = Recorder(sandbox)
    settings = XeroSettings(tenant_id=sandbox.tenant_id, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET,
                            refresh_token=sandbox.issue_tokens()["refresh_token"])
    ledger = XeroLedger(settings, MemoryTokenStore(), transport=httpx.MockTransport(recorder), clock=clock.now)
    return sandbox, recorder, ledger, clock


def _invoice(ref: str, contact: str, tax_type: str = "TAX001") -> InvoiceRequest:
    lines = [InvoiceLine(description="Journée de conseil", quantity=Decimal("1.5"), unit_price=Decimal("850"),
                         discount_percent=Decimal(5), tax_rate=Decimal(20), item_code="SVC-CONSULT-DAY",
                         account_code="706", tax_type=tax_type)]
    inv = Invoice(reference=ref, currency="EUR", lines=lines, issue_date=dt.date(2026, 1, 5),
                  due_date=dt.date(2026, 2, 4))
    return InvoiceRequest(idempotency_key=f"i-{ref}", invoice=inv, customer_ledger_id=contact)


def test_adapter_calls_and_sandbox_answers_follow_the_spec(
    spec: OpenAPI, world: tuple[XeroSandbox, Recorder, XeroLedger, ManualClock]
) -> None:
    """Contacts PUT/GET, Invoices PUT/GET (with If-Modified-Since), Payments GET and TaxRates GET validate."""
    sandbox, recorder, ledger, clock = world
    customer = Customer(crm_id="C1", name="Atelier Durand", email="compta@durand.fr", vat_number="FR40303265045",
                        siret="30326504500017", currency="EUR",
                        address=Address(line1="3 quai Saint-Antoine", city="Lyon", postal_code="69002", country="FR"))
    contact = ledger.create_customers([("C1", customer)], "contacts")["C1"].ledger_id
    ledger.find_customers_by_number(["C1", 'quote"inside'])
    list(ledger.list_customers())
    outcomes = ledger.create_invoices([_invoice("LB-1", contact), _invoice("LB-2", contact, "NOPE")], "batch")
    assert [o.ok for o in outcomes] == [True, False]
    assert outcomes[0].invoice is not None
    assert outcomes[0].invoice.ledger_id
    sandbox.create_payment(outcomes[0].invoice.ledger_id, Decimal("100.00"), dt.date(2026, 1, 20))
    ledger.find_invoices_by_reference(["LB-1", "LB-2"])
    since = dt.datetime.fromtimestamp(clock.now() - 60, tz=dt.UTC)
    assert len(list(ledger.list_invoices(since))) == 1
    assert len(list(ledger.list_payments(since))) == 1
    assert {"PUT /Contacts", "GET /Contacts", "PUT /Invoices", "GET /Invoices", "GET /Payments",
            "GET /TaxRates"} <= recorder.operations()
    check(spec, recorder.exchanges)


def test_reference_data_and_validation_errors_follow_the_spec(
    spec: OpenAPI, world: tuple[XeroSandbox, Recorder, XeroLedger, ManualClock]
) -> None:
    """Items, Accounts, Currencies, TaxRates, Organisation, a 400 ValidationException and by-id reads validate."""
    sandbox, recorder, _ledger, _clock = world
    token = sandbox.issue_tokens()["access_token"]
    http = httpx.Client(transport=httpx.MockTransport(recorder), base_url=SPEC_HOST + API_PREFIX,
                        headers={"Authorization": f"Bearer {token}", "xero-tenant-id": sandbox.tenant_id,
                                 "Accept": "application/json"})
    for path in ("/Items", "/Accounts", "/Currencies", "/TaxRates", "/Organisation"):
        assert http.get(path).status_code == 200
    contact = wire.loads(http.put("/Contacts", content=wire.dumps({"Contacts": [{"Name": "Lefèvre SA"}]}),
                                  headers={"Content-Type": "application/json"}).content)["Contacts"][0]
    line = {"Description": "x", "Quantity": 1, "UnitAmount": 10, "AccountCode": "000"}
    bad: dict[str, Any] = {"Invoices": [{"Type": "ACCREC", "Contact": {"ContactID": contact["ContactID"]},
                                         "Status": "AUTHORISED", "LineItems": [line]}]}
    refused = http.put("/Invoices", params={"summarizeErrors": "true"}, content=wire.dumps(bad),
                       headers={"Content-Type": "application/json", "Idempotency-Key": "k-400"})
    assert refused.status_code == 400
    assert wire.loads(refused.content)["Type"] == "ValidationException"
    good = dict(bad["Invoices"][0], LineItems=[dict(bad["Invoices"][0]["LineItems"][0], AccountCode="707")])
    created = wire.loads(http.put("/Invoices", content=wire.dumps({"Invoices": [good]}),
                                  headers={"Content-Type": "application/json"}).content)["Invoices"][0]
    assert http.get(f"/Invoices/{created['InvoiceID']}").status_code == 200
    assert http.get(f"/Contacts/{contact['ContactID']}").status_code == 200
    paid: dict[str, Any] = {"Invoice": {"InvoiceID": created["InvoiceID"]}, "Account": {"Code": "512"},
                            "Date": "2026-01-21", "Amount": Decimal("5.00")}
    assert http.put("/Payments", content=wire.dumps({"Payments": [paid]}),
                    headers={"Content-Type": "application/json"}).status_code == 200
    check(spec, recorder.exchanges)


def test_connections_follow_the_identity_spec() -> None:
    """GET /Connections (and its lower-case alias) answers the identity spec's Connection array."""
    identity = OpenAPI.from_file_path(str(SHARED / "specs" / "xero" / "xero-identity.yaml"),
                                      config=Config(spec_validator_cls=None))
    sandbox = XeroSandbox(tenant_id="3f2b8a6c-1d4e-4f5a-9b7c-2e8d1a0f6c3b")
    token = sandbox.issue_tokens()["access_token"]
    http = httpx.Client(transport=sandbox.transport(), headers={"Authorization": f"Bearer {token}"})
    for path in ("/Connections", "/connections"):
        response = http.get(SPEC_HOST + path)
        assert response.json()[0]["tenantId"] == sandbox.tenant_id
        request = SpecRequest(httpx.Request("GET", SPEC_HOST + "/Connections", headers=response.request.headers))
        identity.validate_request(request)
        identity.validate_response(request, SpecResponse(response))

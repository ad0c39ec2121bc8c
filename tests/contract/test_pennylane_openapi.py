"""The Pennylane sandbox answers the operations of Pennylane's Company API v2 description with bodies of the same shape.

Pennylane's OpenAPI description is read at its mirror (bastien-aster/pennylane-mcp, docs/pennylane-openapi.json;
see shared/specs/SOURCES.md) and is not kept here. The shapes below are JSON schemas written from a reading of
it, one per operationId. In the description every response object lists all its properties as required and
sets ``additionalProperties: false``; ``nullable: true`` becomes a ``null`` alternative here. Long enums (the
currency and VAT codes) are reduced to their pattern.

- ``getCustomerInvoices``, ``getCustomerInvoice``, ``postCustomerInvoices`` (201), ``finalizeCustomerInvoice``:
  the customer invoice object; the list adds ``items``/``has_more``/``next_cursor`` and, with
  ``include=invoice_lines``, ``included.invoice_lines`` keyed by invoice id (``items``/``has_more``/``next_url``);
- ``getCustomerInvoiceInvoiceLines``: the invoice line object; ``getCustomerInvoicePayments``: the payment;
- ``getCustomers`` and ``getCustomer`` (company or individual, with ``customer_type``), ``postCompanyCustomer``,
  ``postIndividualCustomer`` and ``getCompanyCustomer`` (the same without ``customer_type``);
- ``getProducts``, ``getProduct``, ``postProducts``: the product object;
- ``getCustomerInvoicesChanges``, ``getCustomerChanges``, ``getProductChanges``: the change object;
- errors: 400 is one of ``{error, status}``, ``{message}``, ``{message, code}``, ``{message, field, code}``,
  ``{message, payload, code}``, ``{message, field, payload, code}``; 401/403/404/409/422 are ``{error, status}``.

Two shapes come from Pennylane's guides instead: the errors guide answers a missing required field with a 422
``{"error": "unprocessable_entity", "message", "details"}`` (the description has no such 422), and the rate-limiting
guide gives the 429 as plain text with ``retry-after`` and ``ratelimit-limit``/``-remaining``/``-reset`` on
every answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any

import httpx
import pytest

from connectors.pennylane.sandbox import DEMO_API_TOKEN, PennylaneSandbox
from connectors.xero.testing import ManualClock

API = "https://app.pennylane.com/api/external/v2"

STR = {"type": "string"}
STR_OR_NULL = {"type": ["string", "null"]}
INT = {"type": "integer"}
INT_OR_NULL = {"type": ["integer", "null"]}
BOOL = {"type": "boolean"}
MONEY = {"type": "string", "pattern": r"^-?\d+(\.\d+)?$"}
MONEY_OR_NULL = {"anyOf": [MONEY, {"type": "null"}]}
DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"}
DATE_OR_NULL = {"anyOf": [DATE, {"type": "null"}]}
DATETIME = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"}
DATETIME_OR_NULL = {"anyOf": [DATETIME, {"type": "null"}]}
CURRENCY = {"type": "string", "pattern": r"^[A-Z]{3}$"}
VAT_CODE = {"type": "string", "pattern": r"^([A-Z]{2}_\d+(_\w+)?|exempt|intracom_\d+|crossborder|extracom|mixed|"
                                         r"DE_\w+)$"}
LANGUAGE = {"enum": ["fr_FR", "en_GB", "de_DE"]}
URL = {"type": "string", "pattern": r"^https?://"}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """A closed object: every property required (unless told), nothing else allowed."""
    return {"type": "object", "properties": properties, "required": required if required is not None
            else list(properties), "additionalProperties": False}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


LINK = obj({"url": URL})
DISCOUNT = obj({"type": {"enum": ["absolute", "relative"]}, "value": STR})
INVOICE_STATUS = {"enum": ["archived", "incomplete", "cancelled", "paid", "partially_paid", "partially_cancelled",
                           "upcoming", "late", "draft", "credit_note", "proforma", "shipping_order",
                           "purchasing_order", "estimate_pending", "estimate_accepted", "estimate_invoiced",
                           "estimate_denied"]}

# getCustomerInvoice / getCustomerInvoices items / postCustomerInvoices 201 / finalizeCustomerInvoice 200.
CUSTOMER_INVOICE = obj({
    "id": INT, "label": STR_OR_NULL, "invoice_number": STR, "currency": CURRENCY, "amount": MONEY,
    "currency_amount": MONEY, "currency_amount_before_tax": MONEY, "exchange_rate": MONEY, "date": DATE_OR_NULL,
    "deadline": DATE_OR_NULL, "currency_tax": MONEY, "tax": MONEY, "language": LANGUAGE, "paid": BOOL,
    "status": INVOICE_STATUS, "discount": DISCOUNT, "ledger_entry": obj({"id": INT}),
    "public_file_url": STR_OR_NULL, "filename": STR_OR_NULL, "remaining_amount_with_tax": MONEY_OR_NULL,
    "remaining_amount_without_tax": MONEY_OR_NULL, "draft": BOOL, "special_mention": STR_OR_NULL,
    "customer": nullable(obj({"id": INT, "url": URL})), "invoice_line_sections": LINK, "invoice_lines": LINK,
    "custom_header_fields": LINK, "categories": LINK, "pdf_invoice_free_text": STR, "pdf_invoice_subject": STR,
    "pdf_description": STR_OR_NULL, "billing_subscription": nullable(obj({"id": INT})),
    "credited_invoice": nullable(obj({"id": INT, "url": URL})), "customer_invoice_template": nullable(obj({"id": INT})),
    "transaction_reference": nullable(obj({"banking_provider": STR, "provider_field_name": STR,
                                           "provider_field_value": STR})),
    "payments": LINK, "matched_transactions": LINK, "appendices": LINK, "quote": nullable(obj({"id": INT})),
    "external_reference": STR,
    "e_invoicing": nullable(obj({"status": {"enum": ["accepted", "approved", "collected", "in_dispute",
                                                     "partially_collected", "refused", "rejected", "sent",
                                                     "submitted"]}, "reason": STR_OR_NULL})),
    "archived_at": DATETIME_OR_NULL, "created_at": DATETIME, "updated_at": DATETIME,
})

# getCustomerInvoiceInvoiceLines items (and included.invoice_lines of getCustomerInvoices).
INVOICE_LINE = obj({
    "id": INT, "label": STR, "unit": STR_OR_NULL, "quantity": MONEY, "amount": MONEY, "currency_amount": MONEY,
    "description": STR, "product": nullable(obj({"id": INT, "url": URL})), "vat_rate": VAT_CODE,
    "currency_amount_before_tax": MONEY, "currency_tax": MONEY, "tax": MONEY, "raw_currency_unit_price": MONEY,
    "discount": DISCOUNT, "section_rank": INT_OR_NULL,
    "imputation_dates": nullable(obj({"start_date": DATE, "end_date": DATE})), "created_at": DATETIME,
    "updated_at": DATETIME,
})

# getCustomerInvoicePayments items.
PAYMENT = obj({
    "id": INT, "label": STR, "currency": {"anyOf": [CURRENCY, {"type": "null"}]}, "currency_amount": MONEY,
    "status": {"enum": ["initiated", "pending", "emitted", "found", "not_found", "aborted", "error", "refunded",
                        "prepared", "pending_customer_approval", "pending_submission", "submitted", "confirmed",
                        "paid_out", "cancelled", "customer_approval_denied", "failed", "charged_back",
                        "resubmission_requested", "draft"]},
    "created_at": DATETIME, "updated_at": DATETIME,
})

ADDRESS = obj({"address": STR, "postal_code": STR, "city": STR, "country_alpha2": STR})
_CUSTOMER_COMMON: dict[str, Any] = {
    "id": INT, "name": STR, "billing_iban": STR_OR_NULL,
    "payment_conditions": {"enum": ["upon_receipt", "custom", "7_days", "15_days", "30_days", "30_days_end_of_month",
                                    "45_days", "45_days_end_of_month", "60_days"]},
    "recipient": STR, "phone": STR, "reference": STR_OR_NULL, "notes": STR_OR_NULL,
    "ledger_account": nullable(obj({"id": INT})), "emails": {"type": "array", "items": STR},
    "billing_address": ADDRESS, "delivery_address": ADDRESS, "created_at": DATETIME, "updated_at": DATETIME,
    "external_reference": STR, "billing_language": LANGUAGE, "mandates": LINK, "pro_account_mandates": LINK,
    "contacts": LINK,
}
# postCompanyCustomer 201 / getCompanyCustomer; postIndividualCustomer 201 / getIndividualCustomer.
COMPANY_CUSTOMER = obj({**_CUSTOMER_COMMON, "vat_number": STR, "reg_no": STR})
INDIVIDUAL_CUSTOMER = obj({**_CUSTOMER_COMMON, "first_name": STR, "last_name": STR})
# getCustomers items / getCustomer: one of the two, with customer_type.
LISTED_CUSTOMER = {"oneOf": [
    obj({**_CUSTOMER_COMMON, "vat_number": STR, "reg_no": STR, "customer_type": {"enum": ["company"]}}),
    obj({**_CUSTOMER_COMMON, "first_name": STR, "last_name": STR, "customer_type": {"enum": ["individual"]}}),
]}

# getProducts items / getProduct / postProducts 201.
PRODUCT = obj({
    "id": INT, "label": STR, "description": STR, "external_reference": STR, "price_before_tax": MONEY,
    "vat_rate": VAT_CODE, "price": MONEY, "unit": STR, "currency": CURRENCY, "reference": STR_OR_NULL,
    "ledger_account": nullable(obj({"id": INT})), "archived_at": DATETIME_OR_NULL, "created_at": DATETIME,
    "updated_at": DATETIME,
})

# getCustomerInvoicesChanges / getCustomerChanges / getProductChanges.
CHANGE = obj({"id": INT, "operation": {"enum": ["insert", "update", "delete"]}, "processed_at": DATETIME,
              "updated_at": DATETIME, "created_at": DATETIME})


def listing(item: dict[str, Any], *, closed: bool = True) -> dict[str, Any]:
    schema = obj({"items": {"type": "array", "items": item}, "has_more": BOOL, "next_cursor": STR_OR_NULL})
    if not closed:
        schema["additionalProperties"] = True
    return schema


INCLUDED_LINES = obj({"invoice_lines": {"type": "object", "additionalProperties": obj({
    "items": {"type": "array", "items": INVOICE_LINE}, "has_more": BOOL, "next_url": STR_OR_NULL})}})

# Error bodies of the description, and the errors guide's 422.
ERROR_STATUS = obj({"error": STR, "status": INT})
BAD_REQUEST = {"anyOf": [
    ERROR_STATUS, obj({"message": STR}), obj({"message": STR, "code": STR}),
    obj({"message": STR, "field": STR, "code": STR}), obj({"message": STR, "payload": STR, "code": STR}),
    obj({"message": STR, "field": STR, "payload": STR, "code": STR}),
]}
GUIDE_422 = obj({"error": {"enum": ["unprocessable_entity"]}, "message": STR, "details": {"type": "object"}})

_TYPES: dict[str, Any] = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}


def problems(value: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """Where ``value`` breaks ``schema`` (the subset of JSON Schema the expectations above use)."""
    for key in ("anyOf", "oneOf"):
        if key in schema:
            passing = [s for s in schema[key] if not problems(value, s, where)]
            if not passing or (key == "oneOf" and len(passing) > 1):
                return [f"{where}: matches {len(passing)} of the {key} alternatives"]
            return []
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = False
        for kind in kinds:
            if kind == "integer":
                ok = ok or (isinstance(value, int) and not isinstance(value, bool))
            elif kind == "number":
                ok = ok or (isinstance(value, int | float) and not isinstance(value, bool))
            else:
                ok = ok or isinstance(value, _TYPES[kind])
        if not ok:
            return [f"{where}: {value!r} is not {schema['type']}"]
    out: list[str] = []
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties", {})
        out += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        extra = schema.get("additionalProperties", True)
        for k, v in value.items():
            if k in props:
                out += problems(v, props[k], f"{where}.{k}")
            elif extra is False:
                out.append(f"{where}: unexpected {k!r}")
            elif isinstance(extra, dict):
                out += problems(v, extra, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += problems(v, schema["items"], f"{where}[{i}]")
    return out


def check(resp: httpx.Response, schema: Mapping[str, Any], status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    body = resp.json()
    found = problems(body, schema)
    assert not found, found[:10]
    for header in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"):
        assert resp.headers.get(header, "").replace(".", "").isdigit(), header
    return body


@pytest.fixture
def sandbox() -> PennylaneSandbox:
    return PennylaneSandbox(clock=ManualClock(), seed=5, requests_per_5s=10_000, reference_lookup_delay_s=0)


@pytest.fixture
def api(sandbox: PennylaneSandbox) -> Iterator[httpx.Client]:
    with httpx.Client(transport=sandbox.transport(), base_url=API,
                      headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"}) as client:
        yield client


_ADDRESS = {"address": "8 rue de la paix", "postal_code": "75002", "city": "Paris", "country_alpha2": "FR"}


def _invoice_body(customer_id: int, ref: str, *, draft: bool) -> dict[str, Any]:
    return {"date": "2026-01-10", "deadline": "2026-02-09", "customer_id": customer_id, "currency": "EUR",
            "draft": draft, "external_reference": ref, "invoice_lines": [
                {"label": "Conseil", "raw_currency_unit_price": "33.333334", "unit": "piece", "vat_rate": "FR_200",
                 "quantity": 12, "discount": {"type": "relative", "value": "10"}},
                {"product_id": 0, "quantity": 2}]}


@pytest.fixture
def book(sandbox: PennylaneSandbox, api: httpx.Client) -> dict[str, Any]:
    """A company customer, a finalized invoice with a payment, and a draft."""
    company = check(api.post("/company_customers", json={"name": "Dupont SARL", "reg_no": "303265045",
                                                          "vat_number": "FR40303265045", "external_reference": "C1",
                                                          "emails": ["compta@dupont.fr"], "billing_address": _ADDRESS}),
                    COMPANY_CUSTOMER, 201)
    product_id = check(api.get("/products", params={"limit": "1"}), listing(PRODUCT))["items"][0]["id"]
    bodies = [_invoice_body(company["id"], ref, draft=draft) for ref, draft in (("R1", False), ("R2", True))]
    for body in bodies:
        body["invoice_lines"][1]["product_id"] = product_id
    final = check(api.post("/customer_invoices", json=bodies[0]), CUSTOMER_INVOICE, 201)
    draft = check(api.post("/customer_invoices", json=bodies[1]), CUSTOMER_INVOICE, 201)
    sandbox.create_payment(final["id"], Decimal("50"))
    return {"customer": company, "final": final, "draft": draft}


def test_the_expectations_reject_other_shapes(book: dict[str, Any]) -> None:
    """The checker catches a missing key, an extra key, a wrong type and a number where a string is due."""
    good = dict(book["final"])
    assert problems(good, CUSTOMER_INVOICE) == []
    assert problems({k: v for k, v in good.items() if k != "external_reference"}, CUSTOMER_INVOICE)
    assert problems({**good, "lines": []}, CUSTOMER_INVOICE)
    assert problems({**good, "amount": 230.32}, CUSTOMER_INVOICE)
    assert problems({**good, "invoice_lines": []}, CUSTOMER_INVOICE)
    assert problems({**good, "status": "open"}, CUSTOMER_INVOICE)


def test_customer_invoices_match_get_customer_invoices(api: httpx.Client, book: dict[str, Any]) -> None:
    """getCustomerInvoices, with include=invoice_lines, and getCustomerInvoice."""
    schema = listing(CUSTOMER_INVOICE, closed=False)
    schema["properties"]["included"] = INCLUDED_LINES
    body = check(api.get("/customer_invoices", params={"include": "invoice_lines"}), schema)
    assert set(body["included"]["invoice_lines"]) == {str(book["final"]["id"]), str(book["draft"]["id"])}
    assert problems(check(api.get("/customer_invoices"), listing(CUSTOMER_INVOICE)), schema) == []
    single = check(api.get(f"/customer_invoices/{book['final']['id']}"), CUSTOMER_INVOICE)
    assert single["status"] == "partially_paid"


def test_finalize_matches_finalize_customer_invoice(api: httpx.Client, book: dict[str, Any]) -> None:
    """finalizeCustomerInvoice answers the customer invoice."""
    final = check(api.put(f"/customer_invoices/{book['draft']['id']}/finalize"), CUSTOMER_INVOICE)
    assert final["invoice_number"]


def test_lines_and_payments_match_their_operations(api: httpx.Client, book: dict[str, Any]) -> None:
    """getCustomerInvoiceInvoiceLines and getCustomerInvoicePayments."""
    lines = check(api.get(f"/customer_invoices/{book['final']['id']}/invoice_lines"), listing(INVOICE_LINE))
    assert len(lines["items"]) == 2
    payments = check(api.get(f"/customer_invoices/{book['final']['id']}/payments"), listing(PAYMENT))
    assert len(payments["items"]) == 1


def test_customers_match_their_operations(api: httpx.Client, book: dict[str, Any]) -> None:
    """getCustomers, getCustomer, getCompanyCustomer, postIndividualCustomer, getIndividualCustomer."""
    person = check(api.post("/individual_customers", json={"first_name": "Jeanne", "last_name": "Martin",
                                                           "billing_address": _ADDRESS}), INDIVIDUAL_CUSTOMER, 201)
    listed = check(api.get("/customers"), listing(LISTED_CUSTOMER))
    assert len(listed["items"]) == 2
    check(api.get(f"/customers/{person['id']}"), LISTED_CUSTOMER)
    check(api.get(f"/company_customers/{book['customer']['id']}"), COMPANY_CUSTOMER)
    check(api.get(f"/individual_customers/{person['id']}"), INDIVIDUAL_CUSTOMER)


def test_products_match_their_operations(api: httpx.Client) -> None:
    """getProducts, getProduct, postProducts."""
    created = check(api.post("/products", json={"label": "Audit", "price_before_tax": "1200", "vat_rate": "FR_200",
                                                "unit": "jour", "external_reference": "AUDIT"}), PRODUCT, 201)
    assert created["price"] == "1440.00"
    check(api.get(f"/products/{created['id']}"), PRODUCT)
    check(api.get("/products", params={"limit": "100"}), listing(PRODUCT))


def test_changelogs_match_their_operations(api: httpx.Client, book: dict[str, Any]) -> None:
    """getCustomerInvoicesChanges, getCustomerChanges, getProductChanges."""
    api.post("/products", json={"label": "Audit", "price_before_tax": "1200", "vat_rate": "FR_200"})
    for resource in ("customer_invoices", "customers", "products"):
        body = check(api.get(f"/changelogs/{resource}", params={"limit": "1000"}), listing(CHANGE))
        assert body["items"]


def test_error_bodies_match_the_description_and_the_guides(sandbox: PennylaneSandbox, api: httpx.Client,
                                                           book: dict[str, Any]) -> None:
    """400/401/404/409/422 bodies of the description, the guide's 422 and the rate-limiting guide's 429."""
    body = _invoice_body(book["customer"]["id"], "E1", draft=False)
    body["invoice_lines"] = body["invoice_lines"][:1]
    body["invoice_lines"][0]["vat_rate"] = "TVA20"
    assert not problems(api.post("/customer_invoices", json=body).json(), BAD_REQUEST)
    assert api.get("/customer_invoices", params={"cursor": "x"}).status_code == 400
    assert not problems(api.get("/customer_invoices", params={"cursor": "x"}).json(), BAD_REQUEST)
    assert not problems(api.get("/customer_invoices/1").json(), ERROR_STATUS)
    conflict = api.post("/company_customers", json={"name": "X", "external_reference": "C1",
                                                    "billing_address": _ADDRESS})
    assert conflict.status_code == 409
    assert not problems(conflict.json(), ERROR_STATUS)
    unknown = api.post("/customer_invoices", json=_invoice_body(1, "E2", draft=False))
    assert unknown.status_code == 422
    assert not problems(unknown.json(), ERROR_STATUS)
    missing = dict(_invoice_body(book["customer"]["id"], "E3", draft=False))
    del missing["deadline"]
    answer = api.post("/customer_invoices", json=missing)
    assert answer.status_code == 422
    assert not problems(answer.json(), GUIDE_422)
    with httpx.Client(transport=sandbox.transport(), base_url=API,
                      headers={"Authorization": "Bearer nope"}) as stranger:
        denied = stranger.get("/customers")
    assert denied.status_code == 401
    assert not problems(denied.json(), ERROR_STATUS)
    tight = PennylaneSandbox(clock=ManualClock(), requests_per_5s=1)
    with httpx.Client(transport=tight.transport(), base_url=API,
                      headers={"Authorization": f"Bearer {DEMO_API_TOKEN}"}) as client:
        client.get("/customers")
        limited = client.get("/customers")
    assert limited.status_code == 429
    assert re.fullmatch(r"Rate limit exceeded\. Please retry in \d+ seconds\.", limited.text)
    assert limited.headers["retry-after"].isdigit()
    assert limited.headers["ratelimit-remaining"] == "0"

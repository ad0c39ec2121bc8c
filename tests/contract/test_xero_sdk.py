"""The official xero-python SDK works unchanged against the Xero sandbox served on a socket."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from xero_python.accounting import (
    AccountingApi,
    Contact,
    Contacts,
    CurrencyCode,
    Invoice,
    Invoices,
    LineAmountTypes,
    LineItem,
)
from xero_python.api_client import ApiClient, Configuration
from xero_python.api_client.oauth2 import OAuth2Token, TokenApi

from connectors.sandboxkit import SandboxServer, serve
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, XeroSandbox


@pytest.fixture
def served() -> Iterator[tuple[XeroSandbox, SandboxServer]]:
    sandbox = XeroSandbox(seed=31)  # real clock: the SDK reads time.time() for token expiry
    server = serve(sandbox)
    try:
        yield sandbox, server
    finally:
        server.stop()


class Sdk:
    """An AccountingApi wired to the sandbox, with the token set kept in ``self.token``."""

    def __init__(self, sandbox: XeroSandbox, server: SandboxServer) -> None:
        config = Configuration()
        config.oauth2_token = OAuth2Token(client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET)
        issued = sandbox.issue_tokens()
        self.token: dict[str, Any] = {**issued, "scope": issued["scope"].split(), "expires_at": time.time() + 1800}
        self.client = ApiClient(config, pool_threads=1, oauth2_token_getter=lambda: self.token,
                                oauth2_token_saver=self._save)
        self.api = AccountingApi(self.client, base_url=server.url + "/api.xro/2.0")
        self.tenant = sandbox.tenant_id

    def _save(self, token: dict[str, Any]) -> None:
        self.token = token


@pytest.fixture
def sdk(served: tuple[XeroSandbox, SandboxServer], monkeypatch: pytest.MonkeyPatch) -> Sdk:
    sandbox, server = served
    monkeypatch.setattr(TokenApi, "refresh_token_url", server.url + "/connect/token")
    return Sdk(sandbox, server)


def _invoice(contact_id: str, ref: str) -> Invoice:
    return Invoice(
        type="ACCREC", contact=Contact(contact_id=contact_id), date=dt.date(2026, 3, 2), due_date=dt.date(2026, 4, 1),
        reference=ref, status="AUTHORISED", line_amount_types=LineAmountTypes.EXCLUSIVE, currency_code=CurrencyCode.EUR,
        line_items=[LineItem(description="Journée de conseil", quantity=2.0, unit_amount=850.0, account_code="706",
                             tax_type="TAX001")],
    )


def test_sdk_creates_and_reads_contacts(sdk: Sdk, served: tuple[XeroSandbox, SandboxServer]) -> None:
    """create_contacts (summarizeErrors=False, Idempotency-Key) and get_contacts (where, paging) work."""
    sandbox, _server = served
    created = sdk.api.create_contacts(sdk.tenant, Contacts(contacts=[
        Contact(name="Boulangerie Martin", contact_number="C-1", email_address="compta@martin.fr"),
        Contact(name="Garage Petit", contact_number="C-2"),
    ]), summarize_errors=False, idempotency_key="sdk-contacts-1")
    assert [c.contact_number for c in created.contacts] == ["C-1", "C-2"]
    assert all(c.contact_id for c in created.contacts)
    found = sdk.api.get_contacts(sdk.tenant, where='ContactNumber=="C-2"')
    assert [c.name for c in found.contacts] == ["Garage Petit"]
    page = sdk.api.get_contacts(sdk.tenant, page=1, page_size=1, order="Name ASC")
    assert page.pagination.item_count == 2
    assert page.pagination.page_count == 2
    assert [c.name for c in page.contacts] == ["Boulangerie Martin"]
    assert len(sandbox.contacts()) == 2


def test_sdk_creates_invoices_and_pages_through_them(sdk: Sdk, served: tuple[XeroSandbox, SandboxServer]) -> None:
    """create_invoices and paged get_invoices (with If-Modified-Since) round-trip through the SDK models."""
    sandbox, _server = served
    contact = sdk.api.create_contacts(sdk.tenant, Contacts(contacts=[Contact(name="Librairie Roux")])).contacts[0]
    before = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    created = sdk.api.create_invoices(
        sdk.tenant, Invoices(invoices=[_invoice(contact.contact_id, f"SDK-{i}") for i in range(3)]),
        summarize_errors=False, idempotency_key="sdk-invoices-1",
    )
    first = created.invoices[0]
    assert first.invoice_number == "INV-0001"
    assert first.total == 2040.0
    assert first.date == dt.date(2026, 3, 2)
    assert first.status == "AUTHORISED"
    assert first.currency_code == CurrencyCode.EUR
    pages = [sdk.api.get_invoices(sdk.tenant, page=n, page_size=2, if_modified_since=before) for n in (1, 2)]
    assert [len(p.invoices) for p in pages] == [2, 1]
    assert pages[0].pagination.page_count == 2
    assert pages[1].invoices[0].line_items[0].line_amount == 1700.0
    assert [i["Reference"] for i in sandbox.invoices()] == ["SDK-0", "SDK-1", "SDK-2"]


def test_sdk_refreshes_its_token_through_the_sandbox(sdk: Sdk, served: tuple[XeroSandbox, SandboxServer]) -> None:
    """An expired token set is refreshed by the SDK at /connect/token; the old refresh token is then dead."""
    sandbox, server = served
    old_refresh = sdk.token["refresh_token"]
    sdk.token["expires_at"] = time.time() - 5
    currencies = sdk.api.get_currencies(sdk.tenant)
    assert [c.code for c in currencies.currencies] == [CurrencyCode.EUR, CurrencyCode.USD]
    assert sandbox.refresh_calls == 1
    assert sdk.token["refresh_token"] != old_refresh
    reused = httpx.post(server.url + "/connect/token", data={"grant_type": "refresh_token",
                                                             "refresh_token": old_refresh},
                        auth=(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET), timeout=10)
    assert reused.status_code == 400
    assert reused.json() == {"error": "invalid_grant"}

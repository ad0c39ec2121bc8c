"""One kit per ledger connector: what the shared contract suite needs to drive that vendor's sandbox.

The suite in ``test_ledger_contract.py`` is vendor-neutral; everything it cannot say in the terms of
:class:`~connectors.interfaces.Ledger` lives here: how to build the sandbox and the settings block that points the
connector at it (with the static credential or the OAuth app), the company's tax types for 20 % and 5.5 %, which
tax type and customer id do not exist, where the sandbox lists its customers and which field carries the external
number, the user actions a test performs in the ledger (recording a payment, a credit note allocated to an invoice,
a purchase booked to an expense account), the company's base currency and expense accounts, and how to expire or
revoke a credential.

A new ledger connector registered under ``ledgerbridge.ledger`` gets a subclass of :class:`LedgerKit` added to
:data:`KITS`; until then the contract suite fails for it.
"""

from __future__ import annotations

import abc
import datetime as dt
from decimal import Decimal
from typing import Any, ClassVar, TypeVar

from connectors.pennylane.sandbox import DEMO_CLIENT_ID as PENNYLANE_CLIENT_ID
from connectors.pennylane.sandbox import DEMO_CLIENT_SECRET as PENNYLANE_CLIENT_SECRET
from connectors.pennylane.sandbox import PennylaneSandbox
from connectors.quickbooks import wire as qbo_wire
from connectors.quickbooks.sandbox import QuickBooksSandbox
from connectors.sandboxkit import Clock, SandboxApp
from connectors.xero.sandbox import XeroSandbox
from sync.sandboxes import build_sandbox, ledger_sandbox_settings
from tests.contract.crm_kits import SCALE, StepClock

__all__ = ["KITS", "SCALE", "SEED", "LedgerKit", "StepClock"]

SEED = 7

S = TypeVar("S", bound=SandboxApp)


def _as(sb: SandboxApp, kind: type[S]) -> S:
    if not isinstance(sb, kind):
        raise TypeError(f"expected a {kind.__name__}, got {type(sb).__name__}")
    return sb


def _step(sb: SandboxApp) -> StepClock:
    clock = sb.clock
    if not isinstance(clock, StepClock):
        raise TypeError("the sandbox must run on a StepClock to move its time")
    return clock


class LedgerKit(abc.ABC):
    """How the contract suite drives one ledger connector and its sandbox."""

    #: The connector's name in the ``ledgerbridge.ledger`` entry-point group.
    vendor: ClassVar[str]
    #: The company's tax types (what ``InvoiceLine.tax_type`` carries) for 20 % and 5.5 %.
    tax_20: ClassVar[str]
    tax_55: ClassVar[str]
    #: A well-formed tax type the company does not have.
    unknown_tax_type: ClassVar[str]
    #: A well-formed customer (contact) id that does not exist in the sandbox.
    unknown_customer_id: ClassVar[str]
    #: The sandbox's admin listing of every customer.
    customers_path: ClassVar[str] = "/_sandbox/customers"
    #: ``ApiStats.by_endpoint`` name of the OAuth token call, or None when the connector has no refresh flow.
    token_endpoint: ClassVar[str | None] = None
    #: Whether the vendor hands out a new refresh token on every refresh.
    rotates_refresh_tokens: ClassVar[bool] = False
    #: Whether the default settings block already uses the OAuth flow (no static credential exists).
    oauth_only: ClassVar[bool] = False
    #: The company's home currency, and a currency it also invoices in (the sandbox records a rate for it).
    base_currency: ClassVar[str] = "EUR"
    foreign_currency: ClassVar[str] = "USD"
    #: Bounds of what one unit of the foreign currency is worth in the home currency on the sandbox's invoices: the
    #: sandboxes quote the dollar near the seed book's 1.08 per euro, so a rate read the wrong way round falls out.
    foreign_rate_bounds: ClassVar[tuple[Decimal, Decimal]] = (Decimal("0.85"), Decimal("1.00"))
    #: Two expense accounts of the company (what ``ExpenseLine.account_code`` carries): purchases are booked to
    #: the first, and ``list_expenses`` for the first alone must leave the second out.
    expense_accounts: ClassVar[tuple[str, str]]

    # -- sandbox and settings ------------------------------------------------------------------------------
    def build(self, *, clock: Clock, faults: str | None = None) -> SandboxApp:
        """A fresh sandbox of the seeded organisation (items from the book's catalogue, French VAT rates)."""
        return build_sandbox(self.vendor, seed=SEED, faults=faults, clock=clock)

    def settings(self, sb: SandboxApp, url: str, *, oauth: bool = False) -> dict[str, Any]:
        """The ``ledger:`` block pointing the connector at ``sb`` served at ``url``; ``oauth`` picks the OAuth app."""
        if oauth and self.token_endpoint is None:
            raise NotImplementedError(f"{self.vendor} has no OAuth refresh flow")
        return ledger_sandbox_settings(self.vendor, url, time_scale=SCALE)

    # -- inspection ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def number_of(self, row: dict[str, Any]) -> str | None:
        """The external number a customer row of :attr:`customers_path` carries (None when it has none)."""

    @abc.abstractmethod
    def token_calls(self, sb: SandboxApp) -> int:
        """Calls that reached the sandbox's OAuth token endpoint so far (0 for a connector without OAuth)."""

    # -- user actions in the ledger --------------------------------------------------------------------------
    @abc.abstractmethod
    def pay(self, sb: SandboxApp, invoice_id: str, amount: Decimal) -> str:
        """Record a payment of ``amount`` against an invoice, as a person would; returns the payment's id."""

    @abc.abstractmethod
    def add_credit_note(self, sb: SandboxApp, invoice_id: str, amount: Decimal, day: dt.date) -> str:
        """Issue a sales credit note of ``amount`` (tax included) dated ``day`` for the customer and currency of an
        open invoice and apply all of it to that invoice on ``day``, as a person would (through the sandbox's API or
        its admin); returns the credit note's id (``CreditNote.ledger_id``)."""

    @abc.abstractmethod
    def add_expense(self, sb: SandboxApp, account_code: str, day: dt.date, net: Decimal, description: str) -> str:
        """Book an approved purchase (a supplier bill, an expense) in the base currency dated ``day``, with one line
        of ``net`` before tax on ``account_code``, as a person would; returns the purchase document's id."""

    # -- credentials -----------------------------------------------------------------------------------------
    def expire_access(self, sb: SandboxApp) -> None:
        """Make every access token the sandbox issued invalid (refresh tokens stay valid)."""
        raise NotImplementedError(f"{self.vendor} has no OAuth refresh flow")

    @abc.abstractmethod
    def revoke(self, sb: SandboxApp) -> None:
        """Revoke the credential of the default :meth:`settings` (the static token, or every OAuth grant)."""

    @abc.abstractmethod
    def bad_credentials(self) -> dict[str, Any]:
        """Settings overrides with a credential the vendor refuses."""


class XeroKit(LedgerKit):
    """Xero: OAuth2 only, single-use refresh tokens; an Idempotency-Key on every write."""

    vendor = "xero"
    tax_20 = "TAX001"
    tax_55 = "TAX003"
    unknown_tax_type = "TAX999"
    unknown_customer_id = "5f0c1e2d-3b4a-4c5d-8e6f-0a1b2c3d4e5f"
    customers_path = "/_sandbox/contacts"
    token_endpoint = "POST /connect/token"
    rotates_refresh_tokens = True
    oauth_only = True
    expense_accounts = ("6231", "6251")

    def number_of(self, row: dict[str, Any]) -> str | None:
        number = row.get("ContactNumber")
        return str(number) if number else None

    def token_calls(self, sb: SandboxApp) -> int:
        return _as(sb, XeroSandbox).refresh_calls

    def pay(self, sb: SandboxApp, invoice_id: str, amount: Decimal) -> str:
        return str(_as(sb, XeroSandbox).create_payment(invoice_id, amount)["PaymentID"])

    def add_credit_note(self, sb: SandboxApp, invoice_id: str, amount: Decimal, day: dt.date) -> str:
        return str(_as(sb, XeroSandbox).create_credit_note(invoice_id, amount, day)["CreditNoteID"])

    def add_expense(self, sb: SandboxApp, account_code: str, day: dt.date, net: Decimal, description: str) -> str:
        return str(_as(sb, XeroSandbox).create_bill(account_code, day, net, description)["InvoiceID"])

    def expire_access(self, sb: SandboxApp) -> None:
        _as(sb, XeroSandbox).expire_access_tokens()

    def revoke(self, sb: SandboxApp) -> None:
        xero = _as(sb, XeroSandbox)
        xero.revoke_refresh_tokens()  # the user disconnected the app
        xero.expire_access_tokens()

    def bad_credentials(self) -> dict[str, Any]:
        return {"refresh_token": "contract-wrong-xero-refresh-token"}


class QuickBooksKit(LedgerKit):
    """QuickBooks Online: OAuth2 only, rotating refresh tokens; a requestid on every write."""

    vendor = "quickbooks"
    tax_20 = "2"
    tax_55 = "4"
    unknown_tax_type = "99"
    unknown_customer_id = "999999"
    token_endpoint = "POST /oauth2/v1/tokens/bearer"
    rotates_refresh_tokens = True
    oauth_only = True
    expense_accounts = ("6231", "6226")

    def number_of(self, row: dict[str, Any]) -> str | None:
        return qbo_wire.note_value(row.get("Notes"), qbo_wire.NUMBER_TAG)

    def token_calls(self, sb: SandboxApp) -> int:
        return _as(sb, QuickBooksSandbox).refresh_calls

    def pay(self, sb: SandboxApp, invoice_id: str, amount: Decimal) -> str:
        return str(_as(sb, QuickBooksSandbox).create_payment(invoice_id, amount)["Id"])

    def add_credit_note(self, sb: SandboxApp, invoice_id: str, amount: Decimal, day: dt.date) -> str:
        # A credit memo, applied to the invoice by a payment of no money that links both.
        return str(_as(sb, QuickBooksSandbox).credit_invoice(invoice_id, gross=amount, day=day)["Id"])

    def add_expense(self, sb: SandboxApp, account_code: str, day: dt.date, net: Decimal, description: str) -> str:
        return str(_as(sb, QuickBooksSandbox).add_expense(account_code, day, net, description=description)["Id"])

    def expire_access(self, sb: SandboxApp) -> None:
        _as(sb, QuickBooksSandbox).expire_access_tokens()

    def revoke(self, sb: SandboxApp) -> None:
        qbo = _as(sb, QuickBooksSandbox)
        qbo.revoke_refresh_tokens()
        qbo.expire_access_tokens()

    def bad_credentials(self) -> dict[str, Any]:
        return {"refresh_token": "AB11-contract-wrong-quickbooks-refresh-token"}


class PennylaneKit(LedgerKit):
    """Pennylane: a company API token, or an OAuth app (rotating refresh tokens); no idempotency key on creates."""

    vendor = "pennylane"
    tax_20 = "FR_200"
    tax_55 = "FR_55"
    unknown_tax_type = "FR_999"
    unknown_customer_id = "999999"
    token_endpoint = "POST /oauth/oauth/token"
    rotates_refresh_tokens = True
    expense_accounts = ("6231", "6226")

    def settings(self, sb: SandboxApp, url: str, *, oauth: bool = False) -> dict[str, Any]:
        block = ledger_sandbox_settings(self.vendor, url, time_scale=SCALE)
        if oauth:
            del block["api_token"]
            block.update(client_id=PENNYLANE_CLIENT_ID, client_secret=PENNYLANE_CLIENT_SECRET,
                         refresh_token=_as(sb, PennylaneSandbox).issue_tokens()["refresh_token"])
        return block

    def number_of(self, row: dict[str, Any]) -> str | None:
        number = row.get("external_reference")
        return str(number) if number else None

    def token_calls(self, sb: SandboxApp) -> int:
        return int(_as(sb, PennylaneSandbox).stats()["oauth_refreshes"])

    def pay(self, sb: SandboxApp, invoice_id: str, amount: Decimal) -> str:
        return str(_as(sb, PennylaneSandbox).create_payment(int(invoice_id), amount)["id"])

    def add_credit_note(self, sb: SandboxApp, invoice_id: str, amount: Decimal, day: dt.date) -> str:
        # A credit note (negative amounts) created for the invoice, which it credits (credited_invoice).
        return str(_as(sb, PennylaneSandbox).credit_invoice(int(invoice_id), amount, day)["id"])

    def add_expense(self, sb: SandboxApp, account_code: str, day: dt.date, net: Decimal, description: str) -> str:
        # A supplier invoice, whose line the accountant books to the expense account.
        return str(_as(sb, PennylaneSandbox).add_supplier_invoice(account_code, day, net, description)["id"])

    def expire_access(self, sb: SandboxApp) -> None:
        # OAuth access tokens live a day on the sandbox clock: two days later every one issued is expired.
        _step(sb).advance(2 * _as(sb, PennylaneSandbox).access_token_ttl_s)

    def revoke(self, sb: SandboxApp) -> None:
        _as(sb, PennylaneSandbox).api_tokens = frozenset()

    def bad_credentials(self) -> dict[str, Any]:
        return {"api_token": "pl-contract-wrong-token"}


KITS: dict[str, LedgerKit] = {kit.vendor: kit for kit in (XeroKit(), QuickBooksKit(), PennylaneKit())}

"""The ``ledger:`` block of a pipeline whose ledger is QuickBooks Online."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from config.schema import LedgerSettings

__all__ = ["QuickBooksSettings"]


class QuickBooksSettings(LedgerSettings):
    """QuickBooks Online connection settings (one company, the "realm").

    ``refresh_token`` is only the first refresh token, from the consent flow: Intuit may hand out a new one on
    any refresh and the current one lives in the state store. ``time_scale`` divides the rate window and the
    throttle wait; it is meant for sandboxes running on a compressed clock and stays 1.0 against Intuit.

    ``tax_types`` (rate in percent -> TaxCode Id) names the company's tax codes: an invoice line's ``tax_type``
    is sent as its ``TaxCodeRef`` (the sandbox's: 20 -> "2", 10 -> "3", 5.5 -> "4", 2.1 -> "5").

    ``doc_numbers``: ``reference`` (default) writes a deterministic ``DocNumber`` derived from the invoice
    reference, so that a lookup by reference is one query and a duplicate create is refused by QuickBooks
    (code 6140); ``ledger`` leaves ``DocNumber`` to QuickBooks (for companies whose invoice numbers must
    stay one unbroken sequence), and a lookup by reference then reads every invoice.
    """

    type: Literal["quickbooks"] = "quickbooks"
    base_url: str = Field(default="https://quickbooks.api.intuit.com",
                          description="API host; the API is under /v3/company/<realm_id>")
    token_url: str = Field(default="https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer",
                           description="OAuth2 token endpoint")
    realm_id: str = Field(min_length=1, pattern=r"^\d+$", description="Company id (realmId) from the consent flow")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr | None = Field(
        default=None, description="Initial refresh token; used only while the state store holds none"
    )
    connection: str | None = Field(
        default=None, description="Name of the token set in the state store (default: quickbooks:<realm_id>)"
    )
    requests_per_minute: int = Field(default=500, gt=0)
    concurrency: int = Field(default=10, gt=0)
    time_scale: float = Field(default=1.0, gt=0)
    minor_version: int = Field(default=75, ge=75, description="minorversion sent on every call")
    refresh_margin_s: float = Field(default=300.0, ge=0, description="Refresh this long before expiry")
    throttle_wait_s: float = Field(default=60.0, gt=0, description="Wait after a 429 that names no Retry-After")
    page_size: int = Field(default=1000, ge=1, le=1000, description="MAXRESULTS of list queries")
    write_workers: int = Field(default=4, ge=1, le=10, description="Invoices created in parallel")
    doc_numbers: Literal["reference", "ledger"] = "reference"
    default_item: str | None = Field(
        default=None, description="Item (Name or Sku) for invoice lines that carry no item code"
    )
    use_cdc: bool = Field(default=True, description="Read recent changes through change data capture")
    app_url: str = Field(default="https://app.qbo.intuit.com",
                         description="QuickBooks web app where a person opens an invoice (sandbox companies: "
                                     "https://app.sandbox.qbo.intuit.com)")

    @property
    def api_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/v3/company/{self.realm_id}"

    @property
    def connection_name(self) -> str:
        return self.connection or f"quickbooks:{self.realm_id}"

"""Settings of the HubSpot connector (the pipeline's ``crm:`` block when ``type: hubspot``)."""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from config.schema import ConnectorSettings

__all__ = ["HUBSPOT_API", "HubSpotSettings"]

HUBSPOT_API = "https://api.hubapi.com"


class HubSpotSettings(ConnectorSettings):
    """A HubSpot portal reached with a private-app access token.

    Customer fields HubSpot has no standard property for (VAT number, SIREN, SIRET, billing e-mail and
    currency, the VAT rate of a line item) are read from the properties named here; set one to ``null`` when
    the portal has no such property.
    """

    type: Literal["hubspot"]
    access_token: SecretStr = Field(description="Private app access token (scopes: crm.objects.deals.read/write, "
                                    "crm.objects.companies.read/write, crm.objects.line_items.read, "
                                    "crm.objects.quotes.read, crm.schemas.deals.write, crm.schemas.companies.write)")
    base_url: str | None = Field(default=HUBSPOT_API, description="API host")
    default_currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$",
                                  description="Currency of deals whose deal_currency_code is empty")

    vat_number_property: str | None = Field(default="vat_number", description="Company property: intra-EU VAT number")
    siren_property: str | None = Field(default="siren", description="Company property: SIREN (9 digits)")
    siret_property: str | None = Field(default="siret", description="Company property: SIRET (14 digits)")
    email_property: str | None = Field(default="billing_email", description="Company property: billing e-mail")
    currency_property: str | None = Field(default="billing_currency", description="Company property: currency")
    tax_rate_property: str | None = Field(default="tax_rate_percent",
                                          description="Line item property: VAT rate in percent (e.g. 20, 5.5)")
    tax_rate_groups: dict[str, Decimal] = Field(
        default_factory=dict,
        description="hs_tax_rate_group_id -> rate in percent, for lines whose rate property is empty",
    )

    quote_accepted_statuses: tuple[str, ...] = Field(
        default=("ACCEPTED",),
        description="Quote hs_status values meaning the customer accepted the quote (CPQ quotes move to ACCEPTED)",
    )
    quote_esign_completed_is_accepted: bool = Field(
        default=True,
        description="Also treat a published legacy quote whose e-signatures are all collected as accepted",
    )
    field_group: str = Field(default="ledgerbridge", pattern=r"^[a-z][a-z0-9_]*$",
                             description="Property group the finance fields written back are created in")
    field_group_label: str = "Finance (LedgerBridge)"

    requests_per_10s: int = Field(default=100, ge=1, description="The portal's limit per rolling 10 seconds")
    searches_per_s: int = Field(default=5, ge=1, description="The search API's limit per second")
    rate_limit_margin: float = Field(default=0.1, ge=0, lt=1,
                                     description="Share of each limit left unused, for other apps on the portal")
    time_scale: float = Field(default=1.0, gt=0, description="Divides the rate windows; only for sandboxes running "
                              "a compressed clock")
    search_result_cap: int = Field(default=10_000, ge=2, description="Results one search query can page through")
    batch_size: int = Field(default=100, ge=1, le=100, description="Records per batch read or update")
    max_attempts: int = Field(default=8, ge=1, le=20, description="Attempts per call on transient failures")
    client_secret: SecretStr | None = Field(
        default=None, description="The app's client secret: checks the X-HubSpot-Signature-v3 of the webhooks "
        "HubSpot sends to /webhooks/<pipeline>/hubspot (webhooks are refused while it is unset)")

    @field_validator("quote_accepted_statuses")
    @classmethod
    def _upper(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s.strip().upper() for s in v if s.strip())

    @field_validator("base_url")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else v

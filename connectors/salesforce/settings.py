"""Settings of the Salesforce connector (the pipeline's ``crm:`` block when ``type: salesforce``)."""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from config.schema import ConnectorSettings

__all__ = ["SALESFORCE_LOGIN_URL", "SalesforceSettings"]

SALESFORCE_LOGIN_URL = "https://login.salesforce.com"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return f"{parts.scheme}://{parts.netloc}"


class SalesforceSettings(ConnectorSettings):
    """One Salesforce org reached through a connected app.

    Authentication is either the OAuth 2.0 refresh-token flow (``auth: refresh_token``, the default: the
    refresh token from the consent flow, kept and rotated in the state store) or the username-password flow
    (``auth: password``, for integration users; the password is followed by the user's security token unless
    the connected app's IP range trusts the host).

    ``instance_url`` is the org's My Domain URL (``https://acme.my.salesforce.com``); without it the instance
    URL the token endpoint returns is used. ``base_url`` is accepted as a synonym. Plain ``http://`` URLs are
    refused unless ``allow_http`` is set, which exists only to reach a local sandbox (simple-salesforce always
    speaks https; with ``allow_http`` the connector sends those requests to the http origin instead).

    Account fields Salesforce has no standard field for (VAT number, SIREN, SIRET, billing e-mail) and the
    line tax rate are read from the custom fields named here; set one to ``null`` when the org has no such
    field. ``currency_field`` names the currency of opportunities (``CurrencyIsoCode`` in multi-currency
    orgs; ``null`` for a single-currency org, whose deals are in ``default_currency``).
    """

    type: Literal["salesforce"]
    instance_url: str | None = Field(default=None, description="My Domain URL, e.g. https://acme.my.salesforce.com")
    login_url: str = Field(default=SALESFORCE_LOGIN_URL,
                           description="Host of /services/oauth2/token: login.salesforce.com, test.salesforce.com "
                           "for sandbox orgs, or the My Domain URL")
    allow_http: bool = Field(default=False, description="Accept http:// URLs; only for a local sandbox")
    api_version: str = Field(default="62.0", pattern=r"^\d{2,3}\.0$", description="REST API version, e.g. 62.0")

    auth: Literal["refresh_token", "password"] = "refresh_token"
    client_id: str = Field(min_length=1, description="Consumer key of the connected app")
    client_secret: SecretStr | None = Field(default=None, description="Consumer secret of the connected app")
    refresh_token: SecretStr | None = Field(
        default=None, description="Initial refresh token (auth: refresh_token); used only while the state store "
        "holds none, since a connected app with refresh-token rotation replaces it on every refresh")
    username: str | None = Field(default=None, description="Integration user (auth: password)")
    password: SecretStr | None = Field(default=None, description="Password of the integration user (auth: password)")
    security_token: SecretStr | None = Field(default=None, description="Security token appended to the password")
    connection: str | None = Field(
        default=None, description="Name of the token set in the state store (default: salesforce:<client_id>, "
        "plus :<username> with auth: password)")

    default_currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$",
                                  description="Currency of opportunities without a currency field value")
    currency_field: str | None = Field(default="CurrencyIsoCode", description="Opportunity field: currency code")
    customer_currency_field: str | None = Field(default="CurrencyIsoCode", description="Account field: currency")
    vat_number_field: str | None = Field(default="VAT_Number__c", description="Account field: intra-EU VAT number")
    siren_field: str | None = Field(default="SIREN__c", description="Account field: SIREN (9 digits)")
    siret_field: str | None = Field(default="SIRET__c", description="Account field: SIRET (14 digits)")
    email_field: str | None = Field(default="Billing_Email__c", description="Account field: billing e-mail")
    line_tax_rate_field: str | None = Field(
        default="Tax_Rate__c", description="OpportunityLineItem field: VAT rate in percent (e.g. 20, 5.5)")
    quote_line_tax_rate_field: str | None = Field(
        default="Tax_Rate__c", description="QuoteLineItem field: VAT rate in percent")
    product_tax_rate_field: str | None = Field(
        default=None, description="Product2 field read when a line has no rate of its own")
    quotes_enabled: bool = Field(
        default=True, description="Quotes are enabled in the org (Opportunity.SyncedQuoteId exists); with false, "
        "lines always come from the opportunity's products")
    quote_accepted_statuses: tuple[str, ...] = Field(
        default=("Accepted",), description="Quote Status values meaning the customer accepted the quote")

    field_permission_set_id: str | None = Field(
        default=None, pattern=r"^0PS[A-Za-z0-9]{12}(?:[A-Za-z0-9]{3})?$",
        description="Permission set assigned to the integration user: fields created by the connector get read "
        "and edit access through it (a new custom field is otherwise invisible to the API user)")

    daily_api_share: float = Field(
        default=0.9, gt=0, le=1, description="Share of the org's daily API allocation this connector may use up "
        "to (as Sforce-Limit-Info reports it); at that point the pipeline stops until usage falls")
    slow_down_share: float = Field(
        default=0.8, gt=0, le=1, description="Usage share from which calls are spaced by slow_down_pause_s")
    slow_down_pause_s: float = Field(default=1.0, ge=0, description="Pause between calls once usage passes "
                                     "slow_down_share, leaving room for the org's other integrations")
    requests_per_second: float = Field(default=20.0, gt=0, description="Client-side pacing of REST calls")
    concurrency: int = Field(default=10, ge=1, le=25, description="Calls in flight at most (the org allows 25 "
                             "long-running calls)")
    time_scale: float = Field(default=1.0, gt=0, description="Divides pacing windows and pauses; only for "
                              "sandboxes running a compressed clock")
    query_batch_size: int = Field(default=2000, ge=200, le=2000, description="Sforce-Query-Options batchSize")
    max_attempts: int = Field(default=8, ge=1, le=20, description="Attempts per call on transient failures")
    deleted_overlap_s: float = Field(default=120.0, ge=0, description="How far before the cursor the delete log "
                                     "is read again (its times are truncated to the minute)")

    @field_validator("instance_url", "base_url", "login_url")
    @classmethod
    def _strip(cls, v: str | None) -> str | None:
        return v.strip().rstrip("/") if v else v

    @field_validator("currency_field", "customer_currency_field", "vat_number_field", "siren_field", "siret_field",
                     "email_field", "line_tax_rate_field", "quote_line_tax_rate_field", "product_tax_rate_field")
    @classmethod
    def _api_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,79}", v):
            raise ValueError(f"{v!r} is not a Salesforce field API name")
        return v

    @field_validator("quote_accepted_statuses")
    @classmethod
    def _statuses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s.strip() for s in v if s.strip())

    @model_validator(mode="after")
    def _check(self) -> SalesforceSettings:
        if self.instance_url and self.base_url and _origin(self.instance_url) != _origin(self.base_url):
            raise ValueError("instance_url and base_url name different hosts; give only instance_url")
        for name, url in (("instance_url", self.api_origin), ("login_url", self.login_url)):
            if url is None:
                continue
            origin = _origin(url)
            if origin.startswith("http://") and not self.allow_http:
                raise ValueError(f"{name} is http://; Salesforce is only reached over https "
                                 "(allow_http: true is for a local sandbox)")
        if self.auth == "refresh_token" and self.password is not None and self.refresh_token is None:
            raise ValueError("a password is given but auth is refresh_token; set auth: password")
        if self.auth == "password" and (not self.username or self.password is None):
            raise ValueError("auth: password needs username and password")
        if self.slow_down_share > self.daily_api_share:
            raise ValueError("slow_down_share must not exceed daily_api_share")
        return self

    @property
    def api_origin(self) -> str | None:
        """The configured instance origin (scheme://host[:port]), or None to use the token response's."""
        url = self.instance_url or self.base_url
        return _origin(url) if url else None

    @property
    def token_url(self) -> str:
        return _origin(self.login_url) + "/services/oauth2/token"

    @property
    def connection_name(self) -> str:
        if self.connection:
            return self.connection
        suffix = f":{self.username}" if self.auth == "password" and self.username else ""
        return f"salesforce:{self.client_id}{suffix}"

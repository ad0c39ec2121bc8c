"""Settings of the Pipedrive connector (the pipeline's ``crm:`` block when ``type: pipedrive``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from config.schema import ConnectorSettings

__all__ = ["PIPEDRIVE_API", "PIPEDRIVE_TOKEN_URL", "PipedriveSettings"]

PIPEDRIVE_API = "https://api.pipedrive.com"
PIPEDRIVE_TOKEN_URL = "https://oauth.pipedrive.com/oauth/token"


ActivityKind = Literal["call", "meeting", "email", "task"]


def _default_activity_types() -> dict[str, ActivityKind]:
    return {"call": "call", "meeting": "meeting", "email": "email", "task": "task"}


class PipedriveSettings(ConnectorSettings):
    """A Pipedrive company reached with a personal API token or an OAuth2 app.

    Exactly one way to authenticate: ``api_token`` (sent in the ``x-api-token`` header, never in the URL),
    or ``client_id`` + ``client_secret`` with a first ``refresh_token`` from the consent flow (the current
    token set then lives in the state store). With OAuth, ``base_url`` is the ``api_domain`` the token
    endpoint returned (``https://<company>.pipedrive.com``).

    Pipedrive has no standard organization field for the VAT number, SIREN, SIRET, billing e-mail, currency or
    acquisition channel: they are custom fields, whose keys are 40-character hashes that differ in every company.
    Name them here by their label (as shown in Pipedrive) or by their key; the connector resolves labels to
    keys through ``organizationFields`` and ``dealFields``. Set one to ``null`` when the company has no such
    field.
    """

    type: Literal["pipedrive"]
    base_url: str = Field(default=PIPEDRIVE_API, description="API host; the API is under /api/v2 (and /v1)")

    api_token: SecretStr | None = Field(default=None, description="Personal API token (Settings > Personal "
                                        "preferences > API)")
    client_id: str | None = Field(default=None, description="OAuth app client id")
    client_secret: SecretStr | None = Field(default=None, description="OAuth app client secret")
    refresh_token: SecretStr | None = Field(
        default=None, description="Initial OAuth refresh token; used only while the state store holds none")
    token_url: str = Field(default=PIPEDRIVE_TOKEN_URL, description="OAuth2 token endpoint")
    connection: str | None = Field(
        default=None, description="Name of the token set in the state store (default: pipedrive:<client_id>)")
    refresh_margin_s: float = Field(default=300.0, ge=0, description="Refresh the access token this long before "
                                    "it expires")

    default_currency: str = Field(default="EUR", pattern=r"^[A-Z]{3}$",
                                  description="Currency of deals and organizations that carry none")
    vat_number_field: str | None = Field(default="VAT number", description="Organization field (label or key): "
                                         "intra-EU VAT number")
    siren_field: str | None = Field(default="SIREN", description="Organization field (label or key): SIREN")
    siret_field: str | None = Field(default="SIRET", description="Organization field (label or key): SIRET")
    email_field: str | None = Field(default="Billing email", description="Organization field (label or key): "
                                    "billing e-mail")
    currency_field: str | None = Field(default="Billing currency", description="Organization field (label or "
                                       "key): billing currency")
    acquisition_source_field: str | None = Field(
        default="Acquisition source",
        description="Deal field (label or key) holding the acquisition channel; a built-in such as 'origin' or "
                    "'channel' works too. Option fields are read as their label, lower-cased")
    customer_acquisition_source_field: str | None = Field(
        default="Acquisition source",
        description="Organization field (label or key) holding the channel that acquired the customer; option "
                    "fields are read as their label, lower-cased")
    activity_types: dict[str, ActivityKind] = Field(
        default_factory=_default_activity_types,
        description="Activity type (its key_string, e.g. call, lunch) -> the kind it counts as in activity counts; "
                    "types not listed are not counted")
    activity_scan_threshold: int = Field(
        default=25, ge=0, description="Above this many deals, activity counts page through every activity of the "
        "company (10 tokens per 500) instead of one list call per deal (10 tokens each)")
    email_from_person: bool = Field(default=True, description="Use the deal's contact person's primary e-mail "
                                    "when the organization has no billing e-mail")
    field_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Write-back field name -> Pipedrive field key, for fields created outside LedgerBridge")

    include_deleted: bool = Field(default=True, description="Also pull deals deleted in the last 30 days "
                                  "(status=deleted), so an invoiced deal that is deleted gets flagged")
    include_archived: bool = Field(default=True, description="Also pull archived deals (GET /deals/archived, "
                                   "20 tokens a page), so an invoiced deal that is archived gets flagged")

    burst_limit: int = Field(default=20, ge=1, description="Requests per 2-second window for this token "
                             "(api_token: 20 Essential, 40 Advanced, 80 Professional, 120 Enterprise)")
    rate_limit_margin: float = Field(default=0.1, ge=0, lt=1,
                                     description="Share of the burst limit left unused, for other apps")
    daily_token_allowance: int | None = Field(
        default=None, ge=1, description="API tokens this connector may spend per UTC day (a share of the "
        "company's daily budget); reaching it stops the pipeline. None: only Pipedrive's own limit applies")
    list_limit: int = Field(default=500, ge=1, le=500, description="Records per list call (a list call costs the "
                            "same tokens whatever its size, so the maximum is the cheapest)")
    time_scale: float = Field(default=1.0, gt=0, description="Divides the rate windows; only for sandboxes running "
                              "a compressed clock")
    max_attempts: int = Field(default=8, ge=1, le=20, description="Attempts per call on transient failures")
    webhook_user: SecretStr | None = Field(
        default=None, description="HTTP Basic user name set on the Pipedrive webhook (http_auth_user); "
        "webhooks to /webhooks/<pipeline>/pipedrive are refused while it or webhook_password is unset")
    webhook_password: SecretStr | None = Field(
        default=None, description="HTTP Basic password set on the Pipedrive webhook (http_auth_password)")

    @field_validator("base_url", "token_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> PipedriveSettings:
        oauth = any(v is not None for v in (self.client_id, self.client_secret, self.refresh_token))
        if self.api_token is not None and oauth:
            raise ValueError("set either api_token or the OAuth client (client_id, client_secret), not both")
        if self.api_token is None:
            if not oauth:
                raise ValueError("api_token (or an OAuth client: client_id, client_secret) is required")
            if not self.client_id or self.client_secret is None:
                raise ValueError("OAuth needs both client_id and client_secret")
        return self

    @model_validator(mode="after")
    def _webhook_pair(self) -> PipedriveSettings:
        if (self.webhook_user is None) != (self.webhook_password is None):
            raise ValueError("set both webhook_user and webhook_password (the webhook's HTTP Basic credentials), "
                             "or neither")
        return self

    @property
    def uses_oauth(self) -> bool:
        return self.api_token is None

    @property
    def connection_name(self) -> str:
        return self.connection or f"pipedrive:{self.client_id}"

"""The ``ledger:`` block of a pipeline whose ledger is Pennylane (Company API v2)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from config.schema import LedgerSettings

__all__ = ["PENNYLANE_HOST", "PennylaneSettings"]

PENNYLANE_HOST = "https://app.pennylane.com"


class PennylaneSettings(LedgerSettings):
    """A Pennylane company reached with a company API token or an OAuth2 app.

    Exactly one way to authenticate: ``api_token`` (a company developer token, sent as a bearer token), or
    ``client_id`` + ``client_secret`` with a first ``refresh_token`` from the consent flow (the current token
    set then lives in the state store).

    Pennylane has no idempotency key on creates. Every invoice carries its LedgerBridge reference in
    ``external_reference`` and is looked up by it before it is created; ``lookup_settle_s`` says how long after
    an unanswered create a lookup that finds nothing can be trusted (the filter may lag behind the write).
    ``time_scale`` divides the rate window and the settle time; it is meant for sandboxes running on a
    compressed clock and stays 1.0 against Pennylane.
    """

    type: Literal["pennylane"] = "pennylane"
    base_url: str = Field(default=PENNYLANE_HOST, description="API host; the API is under /api/external/v2")

    api_token: SecretStr | None = Field(default=None, description="Company API token (Settings > Connectivity > "
                                        "Developers)")
    client_id: str | None = Field(default=None, description="OAuth app client id")
    client_secret: SecretStr | None = Field(default=None, description="OAuth app client secret")
    refresh_token: SecretStr | None = Field(
        default=None, description="Initial OAuth refresh token; used only while the state store holds none")
    token_url: str | None = Field(default=None, description="OAuth2 token endpoint (default: "
                                  "<base_url>/oauth/oauth/token)")
    connection: str | None = Field(
        default=None, description="Name of the token set in the state store (default: pennylane:<client_id>)")
    refresh_margin_s: float = Field(default=300.0, ge=0, description="Refresh the access token this long before "
                                    "it expires")

    requests_per_5s: int = Field(default=25, ge=1, description="Requests per 5-second window for this token "
                                 "(Pennylane allows 25, OAuth tokens included)")
    lookup_settle_s: float = Field(
        default=120.0, ge=0,
        description="Seconds after an unanswered create before a lookup by external_reference that finds nothing "
                    "is trusted; until then the deal stays pending and nothing is created for it")
    use_2026_api_changes: bool | None = Field(
        default=True, description="Value of the X-Use-2026-API-Changes header (None: header not sent). The new "
                                  "behaviour is the only one from 2026-07-01")
    line_unit: str = Field(default="piece", min_length=1, description="Unit written on every invoice line")
    include_lines: bool = Field(
        default=True, description="Read invoice lines with include=invoice_lines on lists (experimental at "
                                  "Pennylane); False reads each invoice's invoice_lines sub-resource")
    page_size: int = Field(default=100, ge=1, le=100, description="Records per page on list calls")
    changelog_page_size: int = Field(default=1000, ge=1, le=1000, description="Changes per changelog page")
    time_scale: float = Field(default=1.0, gt=0, description="Divides the rate window and lookup_settle_s; only "
                              "for sandboxes running a compressed clock")
    max_attempts: int = Field(default=8, ge=1, le=20, description="Attempts per read on 429/500/503")

    @field_validator("base_url")
    @classmethod
    def _strip(cls, v: str) -> str:
        return v.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> PennylaneSettings:
        oauth = any(v is not None for v in (self.client_id, self.client_secret, self.refresh_token))
        if self.api_token is not None and oauth:
            raise ValueError("set either api_token or the OAuth client (client_id, client_secret), not both")
        if self.api_token is None:
            if not oauth:
                raise ValueError("api_token (or an OAuth client: client_id, client_secret) is required")
            if not self.client_id or self.client_secret is None:
                raise ValueError("OAuth needs both client_id and client_secret")
        return self

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/external/v2"

    @property
    def oauth_token_url(self) -> str:
        return (self.token_url or f"{self.base_url}/oauth/oauth/token").rstrip("/")

    @property
    def uses_oauth(self) -> bool:
        return self.api_token is None

    @property
    def connection_name(self) -> str:
        return self.connection or f"pennylane:{self.client_id}"

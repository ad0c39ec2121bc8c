"""The ``ledger:`` block of a pipeline whose ledger is Xero."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr

from config.schema import LedgerSettings

__all__ = ["XeroSettings"]


class XeroSettings(LedgerSettings):
    """Xero connection settings.

    ``refresh_token`` is only the first refresh token, from the consent flow: Xero rotates it on every
    refresh and the current one lives in the state store. ``time_scale`` divides the rate windows; it is
    meant for sandboxes running on a compressed clock and stays 1.0 against Xero.
    """

    type: Literal["xero"] = "xero"
    base_url: str = Field(default="https://api.xero.com", description="API host; the API is under /api.xro/2.0")
    token_url: str = Field(default="https://identity.xero.com/connect/token", description="OAuth2 token endpoint")
    tenant_id: str = Field(min_length=1, description="Organisation (tenant) id, from GET /connections")
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    refresh_token: SecretStr | None = Field(
        default=None, description="Initial refresh token; used only while the state store holds none"
    )
    connection: str | None = Field(
        default=None, description="Name of the token set in the state store (default: xero:<tenant_id>)"
    )
    calls_per_minute: int = Field(default=60, gt=0)
    calls_per_day: int = Field(default=5000, gt=0)
    concurrency: int = Field(default=5, gt=0)
    time_scale: float = Field(default=1.0, gt=0)
    refresh_margin_s: float = Field(default=300.0, ge=0, description="Refresh this long before expiry")
    page_size: int = Field(default=1000, ge=1, le=1000, description="Records per page on list calls")
    webhook_key: SecretStr | None = Field(
        default=None, description="The webhook key Xero shows for the app's webhook: checks the "
        "x-xero-signature of the webhooks Xero sends to /webhooks/<pipeline>/xero (refused while unset)")

    @property
    def api_url(self) -> str:
        return self.base_url.rstrip("/") + "/api.xro/2.0"

    @property
    def connection_name(self) -> str:
        return self.connection or f"xero:{self.tenant_id}"

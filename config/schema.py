"""The YAML configuration schema.

One file holds the state-store URL, logging, and one or more named pipelines. A pipeline is one CRM
account feeding one ledger organisation, with its own item, tax, customer and invoice policies.

The ``crm:`` and ``ledger:`` blocks are validated by the settings model of the connector named by their
``type`` (see :class:`ConnectorSettings`), so a connector installed from another package brings its own
schema.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

__all__ = [
    "AppConfig",
    "ConnectorBlock",
    "ConnectorSettings",
    "CustomerPolicy",
    "InvoicePolicy",
    "ItemMapping",
    "ItemTarget",
    "LedgerSettings",
    "LoggingConfig",
    "MetricsConfig",
    "Pipeline",
    "Schedule",
    "StateConfig",
    "TaxMapping",
]

OnUnmapped = Literal["fail", "default", "skip"]
MatchKey = Literal["link", "number", "vat_number", "domain", "email", "name"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ConnectorSettings(_Strict):
    """Base of every connector's settings model. ``type`` names the connector (its entry point)."""

    type: str
    base_url: str | None = Field(default=None, description="API host; defaults to the vendor's production URL")
    timeout_s: float = Field(default=30.0, gt=0, le=300)


class LedgerSettings(ConnectorSettings):
    """Base of every ledger connector's settings: what is particular to one ledger's chart of taxes."""

    tax_types: dict[Decimal, str] = Field(
        default_factory=dict,
        description="Tax rate in percent -> this ledger's tax type or code. Entries here take precedence over "
        "the pipeline's taxes.map, so one pipeline can move between ledgers by changing only its ledger block",
    )


class ConnectorBlock(BaseModel):
    """A ``crm:`` or ``ledger:`` block before its connector validates it: ``type`` plus free keys."""

    model_config = ConfigDict(extra="allow", frozen=True)
    type: str


class StateConfig(_Strict):
    url: str = Field(
        default="sqlite:///ledgerbridge.db",
        description="SQLAlchemy URL: sqlite:///path.db (default) or postgresql+psycopg://user@host/db",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Fernet key that encrypts stored OAuth tokens. Without it, a key file is created "
        "beside a SQLite database (mode 0600); PostgreSQL requires it.",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
            raise ValueError("state.url must be a sqlite:/// or postgresql+psycopg:// URL")
        if v.startswith("postgres:"):
            v = "postgresql+psycopg:" + v.removeprefix("postgres:")
        if v.startswith("postgresql:"):
            v = "postgresql+psycopg:" + v.removeprefix("postgresql:")
        return v


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = Field(
        default="auto", description="auto = console on a terminal, JSON otherwise"
    )


class ItemTarget(_Strict):
    item_code: str | None = Field(default=None, description="Ledger item code")
    account_code: str | None = Field(default=None, description="Ledger revenue account code")


class ItemMapping(_Strict):
    """How CRM product SKUs become ledger items and revenue accounts."""

    on_unmapped: OnUnmapped = Field(
        default="fail",
        description="fail: flag the deal; default: use `default`; skip: invoice the line with no item code",
    )
    default: ItemTarget | None = None
    map: dict[str, ItemTarget] = Field(default_factory=dict, description="SKU -> ledger item and account")

    @model_validator(mode="after")
    def _default_needed(self) -> ItemMapping:
        if self.on_unmapped == "default" and self.default is None:
            raise ValueError("on_unmapped is 'default' but no default is given")
        return self


class TaxMapping(_Strict):
    """How tax rates (percent) become ledger tax types."""

    on_unmapped: OnUnmapped = "fail"
    default: str | None = Field(default=None, description="Ledger tax type used when a rate is unmapped")
    map: dict[Decimal, str] = Field(default_factory=dict, description="rate in percent -> ledger tax type")
    missing_rate: Decimal | None = Field(
        default=None, description="Rate assumed for lines that carry no tax rate (None: treat as unmapped)"
    )

    @model_validator(mode="after")
    def _default_needed(self) -> TaxMapping:
        if self.on_unmapped == "default" and self.default is None:
            raise ValueError("on_unmapped is 'default' but no default is given")
        return self


class CustomerPolicy(_Strict):
    match: list[MatchKey] = Field(
        default_factory=lambda: list[MatchKey](["link", "number", "vat_number", "domain", "email", "name"]),
        description="Matching order; the first key that finds exactly one ledger customer wins",
    )
    create_missing: bool = True


class InvoicePolicy(_Strict):
    status: Literal["draft", "submitted", "authorised"] = "authorised"
    due_days: int = Field(default=30, ge=0, le=365)
    issue_date: Literal["close_date", "today"] = "close_date"
    reference_prefix: str = Field(default="LB", pattern=r"^[A-Za-z0-9]{1,8}$")
    currencies: list[str] | None = Field(
        default=None, description="Currencies the ledger accepts; deals in others are flagged (None: any)"
    )
    on_change_after_invoice: Literal["flag", "ignore"] = Field(
        default="flag", description="What to do when a deal changes after it was invoiced"
    )
    require_lines: bool = Field(default=True, description="Flag won deals without line items")
    amount_tolerance: Decimal = Field(
        default=Decimal("0.01"), ge=0, description="Largest accepted gap between deal amount and lines"
    )


class Schedule(_Strict):
    """When the daemon runs one of the pipeline's jobs (deal sync, ledger pull, metrics)."""

    interval_minutes: int = Field(default=15, ge=1, le=1440)
    cron: str | None = Field(
        default=None,
        description="Crontab expression (UTC): 5 fields, or 6 with a leading seconds field; overrides "
        "interval_minutes",
    )


class SpendSource(_Strict):
    """Where acquisition spend comes from: a CSV and/or ledger expense accounts mapped to channels."""

    csv: str | None = Field(
        default=None,
        description="CSV with a header row: date (YYYY-MM-DD), channel, campaign, amount, currency; relative "
        "paths are read from the config file's directory. A channel named `overhead` (or listed in "
        "overhead_channels) is sales and marketing cost no channel owns: only blended CAC spreads it",
    )
    expense_accounts: dict[str, str] = Field(
        default_factory=dict,
        description="Ledger expense account code -> channel (or `overhead`); the monthly totals of those "
        "accounts are added to the CSV's spend",
    )
    overhead_channels: list[str] = Field(default_factory=lambda: ["overhead"])
    lag_months: int = Field(
        default=0, ge=0, le=3, description="Customers won in month m are matched with spend of month m - lag"
    )


class MetricsFields(_Strict):
    """Names of the CRM fields metrics are written to, by metric. Omitted metrics keep their default name."""

    customer: dict[str, str] = Field(default_factory=dict, description="metric -> CRM customer field name")
    deal: dict[str, str] = Field(default_factory=dict, description="deal status value -> CRM deal field name")


class MetricsConfig(_Strict):
    """How a pipeline's finance metrics are computed and written back to the CRM."""

    enabled: bool = True
    currency: str | None = Field(
        default=None, pattern=r"^[A-Z]{3}$",
        description="Home currency of the metrics; defaults to the ledger organisation's base currency",
    )
    fx_rates: dict[str, Decimal] = Field(
        default_factory=dict,
        description="Currency -> home-currency units per unit, used only for documents on which the ledger "
        "records no exchange rate",
    )
    time_unit: Literal["day", "week", "month"] = Field(
        default="week", description="Time unit of the purchase models (BG/NBD, MBG/NBD, Pareto/NBD)"
    )
    churn_model: Literal["mbgnbd", "paretonbd"] = Field(
        default="mbgnbd", description="Model whose P(alive) gives the churn probability (BG/NBD is 1 for one-time "
        "buyers, so it is not offered)",
    )
    horizon_months: int = Field(default=12, ge=1, le=120, description="Horizon of predictive CLV and revenue at risk")
    discount_rate_annual: Decimal = Field(default=Decimal("0.10"), ge=0, lt=1)
    gross_margin: Decimal | None = Field(
        default=None, gt=0, le=1, description="Applied to revenue in CLV and CAC payback when given"
    )
    trailing_months: int = Field(default=12, ge=1, le=60, description="Window of days-to-pay and beyond-terms")
    min_repeat_customers: int = Field(
        default=20, ge=1, description="Fewer repeat buyers than this and the predictive models are not fitted"
    )
    spend: SpendSource = Field(default_factory=SpendSource)
    activity_costs: dict[str, Decimal] = Field(
        default_factory=dict, description="Cost of one sales activity by kind (call, meeting, email, task)"
    )
    write_back: bool = True
    fields: MetricsFields = Field(default_factory=MetricsFields)
    schedule: Schedule = Field(default_factory=lambda: Schedule(interval_minutes=360))


class Pipeline(_Strict):
    crm: ConnectorBlock
    ledger: ConnectorBlock
    items: ItemMapping = Field(default_factory=ItemMapping)
    taxes: TaxMapping = Field(default_factory=TaxMapping)
    customers: CustomerPolicy = Field(default_factory=CustomerPolicy)
    invoice: InvoicePolicy = Field(default_factory=InvoicePolicy)
    page_size: int = Field(default=100, ge=1, le=200, description="Deals per pulled page")
    schedule: Schedule = Field(default_factory=Schedule)
    ledger_schedule: Schedule = Field(
        default_factory=lambda: Schedule(interval_minutes=60),
        description="When the daemon pulls the ledger's invoices, credit notes and payments",
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    enabled: bool = True


class AppConfig(_Strict):
    state: StateConfig = Field(default_factory=StateConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    pipelines: dict[str, Pipeline] = Field(min_length=1)

    @field_validator("pipelines")
    @classmethod
    def _names(cls, v: dict[str, Pipeline]) -> dict[str, Pipeline]:
        import re

        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", name):
                raise ValueError(f"pipeline name {name!r}: use 1-40 of a-z 0-9 _ -, starting with a letter or digit")
        return v

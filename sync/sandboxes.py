"""Builds the vendor sandboxes for ``ledgerbridge sandbox serve``, the demo, the tests and the benchmarks."""

from __future__ import annotations

import datetime as dt
from typing import Any

from connectors.sandboxkit import Clock, SandboxApp

__all__ = ["CRM_SANDBOXES", "LEDGER_SANDBOXES", "SANDBOX_VENDORS", "build_sandbox", "crm_sandbox_settings",
           "ledger_sandbox_settings"]

SANDBOX_VENDORS = ("hubspot", "salesforce", "pipedrive", "xero", "quickbooks", "pennylane")
CRM_SANDBOXES = ("hubspot", "salesforce", "pipedrive")
LEDGER_SANDBOXES = ("xero", "quickbooks", "pennylane")
DEMO_XERO_REFRESH_TOKEN = "demo-refresh-token"


def build_sandbox(
    vendor: str,
    *,
    seed: int = 0,
    deals: int = 600,
    companies: int | None = None,
    faults: str | None = None,
    time_scale: float = 1.0,
    won_share: float = 0.45,
    lines_per_deal: int | None = None,
    clock: Clock | None = None,
    history_years: int = 0,
    today: dt.date | None = None,
) -> SandboxApp:
    """A sandbox of ``vendor``; CRM sandboxes are loaded with a generated book of ``deals`` deals.

    With ``history_years``, a ledger sandbox is loaded with that many years of invoices, payments, credit
    notes and expenses of the same book's companies up to ``today`` (default: the current UTC date).
    """
    clock = clock or Clock(scale=time_scale)
    if history_years and vendor in LEDGER_SANDBOXES:
        from connectors.seedbook import generate_book
        from connectors.seedhistory import generate_history

        ledger = build_sandbox(vendor, seed=seed, deals=0, faults=faults, clock=clock)
        book = generate_book(seed, companies=companies if companies is not None else max(deals // 2, 1),
                             deals=deals, won_share=won_share, lines_per_deal=lines_per_deal)
        day = today or dt.datetime.now(dt.UTC).date()
        ledger.load_history(book, generate_history(book, seed=seed, today=day, years=history_years))  # type: ignore[attr-defined]
        return ledger
    if vendor in CRM_SANDBOXES:
        from connectors.seedbook import generate_book

        crm = _crm_sandbox(vendor, seed=seed, faults=faults, clock=clock)
        if deals:
            n_companies = companies if companies is not None else max(deals // 2, 1)
            crm.load_book(generate_book(seed, companies=n_companies, deals=deals, won_share=won_share,
                                        lines_per_deal=lines_per_deal))
        built: SandboxApp = crm
        return built
    if vendor == "xero":
        from connectors.xero.sandbox import XeroSandbox

        # The refresh token the demo config and the README examples start from; it is single-use like
        # every Xero refresh token, and `POST /_sandbox/authorize` issues fresh ones.
        return XeroSandbox(seed=seed, faults=faults, clock=clock, initial_refresh_token=DEMO_XERO_REFRESH_TOKEN)
    if vendor == "quickbooks":
        from connectors.quickbooks.sandbox import DEMO_REFRESH_TOKEN, QuickBooksSandbox

        return QuickBooksSandbox(seed=seed, faults=faults, clock=clock, initial_refresh_token=DEMO_REFRESH_TOKEN)
    if vendor == "pennylane":
        from connectors.pennylane.sandbox import PennylaneSandbox

        return PennylaneSandbox(seed=seed, faults=faults, clock=clock)
    raise ValueError(f"unknown sandbox {vendor!r}; available: {', '.join(SANDBOX_VENDORS)}")


def _crm_sandbox(vendor: str, *, seed: int, faults: str | None, clock: Clock) -> Any:
    if vendor == "hubspot":
        from connectors.hubspot.sandbox import HubSpotSandbox

        return HubSpotSandbox(seed=seed, faults=faults, clock=clock)
    if vendor == "salesforce":
        from connectors.salesforce.sandbox import SalesforceSandbox

        return SalesforceSandbox(seed=seed, faults=faults, clock=clock)
    from connectors.pipedrive.sandbox import PipedriveSandbox

    return PipedriveSandbox(seed=seed, faults=faults, clock=clock)


def crm_sandbox_settings(vendor: str, url: str, *, time_scale: float = 1.0) -> dict[str, Any]:
    """The ``crm:`` block that points a CRM connector at its sandbox served at ``url``."""
    if vendor == "hubspot":
        return {"type": "hubspot", "base_url": url, "access_token": "demo-hubspot-token", "time_scale": time_scale}
    if vendor == "pipedrive":
        return {"type": "pipedrive", "base_url": url, "api_token": "demo-pipedrive-token", "time_scale": time_scale}
    if vendor == "salesforce":
        from connectors.salesforce.sandbox import sandbox_settings

        block: dict[str, Any] = sandbox_settings(url, time_scale=time_scale)
        return block
    raise ValueError(f"unknown CRM sandbox {vendor!r}; available: {', '.join(CRM_SANDBOXES)}")


def ledger_sandbox_settings(vendor: str, url: str, *, refresh_token: str | None = None,
                            time_scale: float = 1.0) -> dict[str, Any]:
    """The ``ledger:`` block that points a ledger connector at its sandbox served at ``url``.

    ``refresh_token`` is one the sandbox issued (``POST /_sandbox/authorize``); without it, the sandbox's
    demo refresh token, which a fresh sandbox accepts once.
    """
    block: dict[str, Any]
    if vendor == "xero":
        from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, DEMO_TENANT_ID

        block = {"type": "xero", "base_url": url, "token_url": url + "/connect/token", "tenant_id": DEMO_TENANT_ID,
                 "client_id": DEMO_CLIENT_ID, "client_secret": DEMO_CLIENT_SECRET,
                 "refresh_token": refresh_token or DEMO_XERO_REFRESH_TOKEN, "time_scale": time_scale}
    elif vendor == "quickbooks":
        from connectors.quickbooks.sandbox import DEMO_REFRESH_TOKEN
        from connectors.quickbooks.sandbox import sandbox_settings as qbo

        block = qbo(url, time_scale=time_scale, refresh_token=refresh_token or DEMO_REFRESH_TOKEN)
    elif vendor == "pennylane":
        from connectors.pennylane.sandbox import sandbox_settings as pennylane

        block = pennylane(url, time_scale=time_scale)
    else:
        raise ValueError(f"unknown ledger sandbox {vendor!r}; available: {', '.join(LEDGER_SANDBOXES)}")
    return block

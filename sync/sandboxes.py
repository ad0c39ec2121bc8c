"""Builds the vendor sandboxes for ``ledgerbridge sandbox serve``, the demo, the tests and the benchmarks."""

from __future__ import annotations

from connectors.sandboxkit import Clock, SandboxApp

__all__ = ["SANDBOX_VENDORS", "build_sandbox"]

SANDBOX_VENDORS = ("hubspot", "xero")
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
) -> SandboxApp:
    """A sandbox of ``vendor``; CRM sandboxes are loaded with a generated book of ``deals`` deals."""
    clock = clock or Clock(scale=time_scale)
    if vendor == "hubspot":
        from connectors.hubspot.sandbox import HubSpotSandbox
        from connectors.seedbook import generate_book

        sandbox = HubSpotSandbox(seed=seed, faults=faults, clock=clock)
        if deals:
            n_companies = companies if companies is not None else max(deals // 2, 1)
            sandbox.load_book(generate_book(seed, companies=n_companies, deals=deals, won_share=won_share,
                                            lines_per_deal=lines_per_deal))
        return sandbox
    if vendor == "xero":
        from connectors.xero.sandbox import XeroSandbox

        # The refresh token the demo config and the README examples start from; it is single-use like
        # every Xero refresh token, and `POST /_sandbox/authorize` issues fresh ones.
        return XeroSandbox(seed=seed, faults=faults, clock=clock, initial_refresh_token=DEMO_XERO_REFRESH_TOKEN)
    raise ValueError(f"unknown sandbox {vendor!r}; available: {', '.join(SANDBOX_VENDORS)}")

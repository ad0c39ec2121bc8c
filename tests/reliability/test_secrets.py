"""No token or secret reaches a log line, an error message or the state database in clear."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connectors.hubspot.sandbox import _BOOK_STAGE, HubSpotSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from tests.harness import run_cli, write_config

HS_CANARY = "pat-eu1-CANARYhubspot0a1b2c3d4e5f60718293a4b5c6d7e8f9"
XERO_SECRET_CANARY = "CANARYxeroClientSecret9f8e7d6c5b4a39281706"
XERO_REFRESH_CANARY = "CANARYxeroRefresh0123456789abcdefABCDEF"


@pytest.fixture
def vendors() -> Iterator[tuple[HubSpotSandbox, XeroSandbox, SandboxServer, SandboxServer]]:
    hs = HubSpotSandbox(seed=3, access_tokens=(HS_CANARY,))
    hs.load_book(generate_book(3, companies=20, deals=40, won_share=0.6))
    xero = XeroSandbox(seed=3, client_secret=XERO_SECRET_CANARY, initial_refresh_token=XERO_REFRESH_CANARY)
    s1, s2 = serve(hs), serve(xero)
    try:
        yield hs, xero, s1, s2
    finally:
        s1.stop()
        s2.stop()


def _issued_tokens(xero: XeroSandbox) -> list[str]:
    """Every access and refresh token the Xero sandbox handed out (they are secrets too)."""
    with xero.lock:
        return [*xero._refresh, *xero._access]


def _assert_clean(text: str, canaries: list[str]) -> None:
    for c in canaries:
        assert c not in text, f"secret {c[:12]}... leaked"


def test_sync_with_canary_tokens_leaks_nothing(vendors: tuple[HubSpotSandbox, XeroSandbox, SandboxServer,
                                                                SandboxServer], tmp_path: Path) -> None:
    """A debug-logged sync, then failing runs, print no secret; the state database holds none in clear."""
    hs, xero, hs_server, xero_server = vendors
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path / "lb.yaml", hubspot_url=hs_server.url, xero_url=xero_server.url,
                       refresh_token=XERO_REFRESH_CANARY, state_url=f"sqlite:///{db}", log_level="debug")
    env = {"HUBSPOT_TOKEN": HS_CANARY, "XERO_CLIENT_SECRET": XERO_SECRET_CANARY}
    ok = run_cli("run", "--once", "-c", str(cfg), env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert len(xero.invoices()) > 0
    outputs = [ok.stdout + ok.stderr]

    # The HubSpot token is revoked: the run fails with an auth error that names no token.
    hs.access_tokens = ("another-token",)
    hs.touch("deals", hs.object_ids("deals")[:3])
    bad_crm = run_cli("run", "--once", "-c", str(cfg), env=env)
    assert bad_crm.returncode == 1
    assert "401" in bad_crm.stdout + bad_crm.stderr or "auth" in (bad_crm.stdout + bad_crm.stderr).lower()
    outputs.append(bad_crm.stdout + bad_crm.stderr)

    # The Xero refresh tokens are revoked and a deal is won, so the ledger is needed: the run fails
    # asking for re-authorisation.
    hs.access_tokens = (HS_CANARY,)
    open_deal = next(d for d in hs.deals_snapshot() if d.get("hs_is_closed") == "false")
    hs.modify_deal(open_deal["hs_object_id"], dealstage=_BOOK_STAGE[open_deal["pipeline"]]["won"])
    xero.revoke_refresh_tokens()
    xero.expire_access_tokens()
    bad_ledger = run_cli("run", "--once", "-c", str(cfg), env=env)
    assert bad_ledger.returncode == 1
    assert "re-authorise" in bad_ledger.stdout + bad_ledger.stderr
    outputs.append(bad_ledger.stdout + bad_ledger.stderr)

    # validate and status print nothing secret either.
    outputs.append(run_cli("validate", "-c", str(cfg), env=env).stdout)
    outputs.append(run_cli("status", "--json", "-c", str(cfg), env=env).stdout)

    canaries = [HS_CANARY, XERO_SECRET_CANARY, XERO_REFRESH_CANARY, *_issued_tokens(xero)]
    assert len(canaries) > 3
    for text in outputs:
        _assert_clean(text, canaries)
    for f in tmp_path.iterdir():
        if f.name.startswith("state.db") and not f.name.endswith(".key"):
            _assert_clean(f.read_bytes().decode("latin-1"), canaries)

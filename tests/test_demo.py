"""The demo: a full sync on the embedded sandboxes, and a second run that creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hubspot import HubSpot

from connectors.sandboxkit import serve
from sync.sandboxes import build_sandbox
from tests.harness import run_cli

pytestmark = pytest.mark.slow


def test_demo_creates_invoices_then_nothing_on_second_run(tmp_path: Path) -> None:
    """`ledgerbridge demo` invoices every won deal; run again on the same state it creates 0."""
    first = run_cli("demo", "--dir", str(tmp_path / "demo"), "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    one = json.loads(first.stdout)
    counts = one["pipelines"]["acme-fr"]["counts"]
    assert counts["created"] > 100
    assert counts["created"] == counts["won"]
    assert counts.get("flagged", 0) == 0
    assert one["ledger_invoices"] == counts["created"]
    assert set(one["ledger_totals"]) == {"EUR", "USD"}

    metrics = one["metrics"]["acme-fr"]
    assert metrics["status"] == "ok"
    assert metrics["customers_written"] > 0
    assert metrics["deals_written"] > 0
    assert one["ledger_history_invoices"] > 1000  # years of history behind the synced deals
    assert all(metrics["top"][k] for k in ("clv_predicted", "revenue_at_risk"))

    # The finance fields are on the HubSpot records, as HubSpot's own SDK reads them.
    hub = build_sandbox("hubspot", deals=0)
    (snapshot,) = (tmp_path / "demo").glob("sandbox-hubspot-*.bin")
    assert hub.load(snapshot)
    server = serve(hub)
    try:
        client = HubSpot(access_token="demo-hubspot-token", host=server.url)
        companies = client.crm.companies.basic_api.get_page(limit=100, properties=[
            "ledgerbridge_clv_historical", "ledgerbridge_cac_blended", "ledgerbridge_days_to_pay_weighted",
            "ledgerbridge_balance_due", "ledgerbridge_revenue_at_risk"]).results
        filled = [c for c in companies if c.properties.get("ledgerbridge_clv_historical")]
        assert len(filled) > 50
        for key in ("ledgerbridge_cac_blended", "ledgerbridge_days_to_pay_weighted", "ledgerbridge_balance_due",
                    "ledgerbridge_revenue_at_risk"):
            assert any(c.properties.get(key) for c in filled), key
        deals = client.crm.deals.basic_api.get_page(limit=100, properties=[
            "ledgerbridge_invoice_status", "ledgerbridge_invoice_number", "hs_is_closed_won"]).results
        won = [d for d in deals if d.properties.get("hs_is_closed_won") == "true"]
        assert won
        assert all(d.properties.get("ledgerbridge_invoice_status") in ("authorised", "paid") for d in won)
    finally:
        server.stop()

    second = run_cli("demo", "--dir", str(tmp_path / "demo"), "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    two = json.loads(second.stdout)
    assert two["pipelines"]["acme-fr"]["counts"].get("created", 0) == 0
    assert two["ledger_invoices"] == one["ledger_invoices"]
    assert two["metrics"]["acme-fr"]["customers_written"] == 0
    assert two["metrics"]["acme-fr"]["deals_written"] == 0


@pytest.mark.parametrize(("crm", "pipeline"),
                         [("salesforce", "acme-fr-salesforce"), ("pipedrive", "acme-fr-pipedrive")])
def test_demo_runs_the_same_book_from_another_crm(tmp_path: Path, crm: str, pipeline: str) -> None:
    """`ledgerbridge demo --crm X` invoices the same won deals for the same totals as from HubSpot."""
    hubspot = run_cli("demo", "--dir", str(tmp_path / "hs"), "--json")
    other = run_cli("demo", "--crm", crm, "--dir", str(tmp_path / crm), "--json")
    assert hubspot.returncode == 0, hubspot.stderr[-3000:]
    assert other.returncode == 0, other.stderr[-3000:]
    one, two = json.loads(hubspot.stdout), json.loads(other.stdout)
    assert two["pipelines"][pipeline]["counts"]["created"] == one["pipelines"]["acme-fr"]["counts"]["created"]
    assert two["ledger_totals"] == one["ledger_totals"]

"""Metrics end to end: ledger history + a sync + payments, then `ledgerbridge metrics` writes finance fields
to HubSpot, a second run writes nothing, and one new payment changes only what it touches."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from hubspot import HubSpot

from connectors.sandboxkit import serve
from sync.sandboxes import build_sandbox
from sync.state import StateStore
from tests.harness import run_cli, write_config

SEED = 11
DEALS = 160
COMPANIES = 60
TODAY = dt.datetime.now(dt.UTC).date()


@dataclass
class World:
    hubspot: Any
    xero: Any
    hubspot_url: str
    xero_url: str
    config: Path
    db: Path


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    hub = build_sandbox("hubspot", seed=SEED, deals=DEALS, companies=COMPANIES, time_scale=50)
    xero = build_sandbox("xero", seed=SEED, deals=DEALS, companies=COMPANIES, time_scale=50, history_years=2,
                         today=TODAY)
    hs, xs = serve(hub), serve(xero)
    db = tmp_path / "state.db"
    cfg = write_config(tmp_path / "cfg.yaml", refresh_token="demo-refresh-token", state_url=f"sqlite:///{db}",
                       xero_url=xs.url, hubspot_url=hs.url, time_scale=50,
                       extra="    metrics:\n      fx_rates: {USD: \"0.92\"}\n")
    try:
        yield World(hub, xero, hs.url, xs.url, cfg, db)
    finally:
        hs.stop()
        xs.stop()


def _metrics(world: World, *extra: str) -> dict[str, Any]:
    res = run_cli("metrics", "-c", str(world.config), "--json", *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    out: dict[str, Any] = json.loads(res.stdout)["main"]
    return out


def _hubspot_writes(sandbox: Any) -> int:
    return sum(1 for r in list(sandbox.request_log) if r["write"] and "/batch/update" in r["path"])


def test_metrics_written_to_hubspot_then_nothing_then_only_what_a_payment_changed(world: World) -> None:
    run = run_cli("run", "--once", "-c", str(world.config), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    created = json.loads(run.stdout)["main"]["counts"]["created"]
    assert created > 20
    world.xero.settle(TODAY)

    first = _metrics(world)
    assert first["status"] == "ok", first["error"]
    wb = first["write_back"]
    assert wb["customers"]["values_written"] > 0
    assert wb["customers"]["records_failed"] == 0
    assert wb["deals"]["records_changed"] >= created  # every invoiced deal gets its invoice status
    company = first["metrics"]["company"]
    assert company["dso_countback"] is not None

    # The CRM shows it, read with HubSpot's own SDK.
    client = HubSpot(access_token="demo-hubspot-token", host=world.hubspot_url)
    store = StateStore.open(f"sqlite:///{world.db}")
    try:
        deal_links = store.links("main", "deal")
        customer_links = store.links("main", "customer")
    finally:
        store.close()
    deal_id = sorted(deal_links)[0]
    deal = client.crm.deals.basic_api.get_by_id(deal_id, properties=[
        "ledgerbridge_invoice_number", "ledgerbridge_invoice_status", "ledgerbridge_amount_invoiced",
        "ledgerbridge_balance_due", "ledgerbridge_last_synced_at"])
    props = deal.properties
    assert props["ledgerbridge_invoice_number"] == deal_links[deal_id].ledger_number
    assert props["ledgerbridge_invoice_status"] in ("authorised", "paid")
    xero_invoices = {i["InvoiceID"]: i for i in httpx.get(world.xero_url + "/_sandbox/invoices", timeout=30).json()}
    inv = xero_invoices[deal_links[deal_id].ledger_id]
    assert Decimal(props["ledgerbridge_amount_invoiced"]) == Decimal(str(inv["Total"]))
    assert Decimal(props["ledgerbridge_balance_due"]) == Decimal(str(inv["AmountDue"]))

    # A company's balance due is the sum of what its ledger contact owes, converted to EUR.
    company_id, link = next((cid, lk) for cid, lk in sorted(customer_links.items())
                            if any(i.get("ContactID") == lk.ledger_id and Decimal(str(i["AmountDue"])) > 0
                                   and i.get("CurrencyCode", "EUR") == "EUR" for i in xero_invoices.values()))
    owed = sum((Decimal(str(i["AmountDue"])) for i in xero_invoices.values()
                if i.get("ContactID") == link.ledger_id and i.get("Status") == "AUTHORISED"
                and dt.date.fromisoformat(str(i["Date"])[:10]) <= TODAY), Decimal(0))
    comp = client.crm.companies.basic_api.get_by_id(company_id, properties=[
        "ledgerbridge_balance_due", "ledgerbridge_clv_historical", "ledgerbridge_days_to_pay_weighted",
        "ledgerbridge_revenue_at_risk", "ledgerbridge_cac_blended"])
    assert Decimal(comp.properties["ledgerbridge_balance_due"]) == owed
    assert Decimal(comp.properties["ledgerbridge_clv_historical"]) > 0

    # Nothing changed: nothing written, not one update call.
    writes_before = _hubspot_writes(world.hubspot)
    second = _metrics(world)
    assert second["write_back"]["customers"]["values_written"] == 0
    assert second["write_back"]["deals"]["values_written"] == 0
    assert _hubspot_writes(world.hubspot) == writes_before

    # One payment against one open invoice of a synced deal: only that deal and its customer change.
    open_deal, open_link = next((d, lk) for d, lk in sorted(deal_links.items())
                                if Decimal(str(xero_invoices[lk.ledger_id]["AmountDue"])) > 0)
    due = Decimal(str(xero_invoices[open_link.ledger_id]["AmountDue"]))
    part = (due / 2).quantize(Decimal("0.01"))
    r = httpx.post(world.xero_url + "/_sandbox/payments", json={
        "invoice_id": open_link.ledger_id, "amount": str(part), "date": TODAY.isoformat()}, timeout=10)
    assert r.status_code < 300, r.text
    dry = _metrics(world, "--dry-run")
    assert dry["write_back"]["deals"]["records_changed"] == 1
    assert dry["write_back"]["deals"]["values_written"] == 0
    third = _metrics(world)
    assert third["write_back"]["deals"]["records_changed"] == 1
    assert third["write_back"]["customers"]["records_changed"] == 1
    deal = client.crm.deals.basic_api.get_by_id(open_deal, properties=["ledgerbridge_balance_due",
                                                                       "ledgerbridge_amount_paid"])
    assert Decimal(deal.properties["ledgerbridge_balance_due"]) == due - part


def test_a_stop_request_ends_the_metrics_run_at_a_safe_point_and_the_next_run_writes_everything(
        world: World) -> None:
    """Asked to stop once the ledger pull is stored, the run ends partial before computing and writes nothing;
    the next run computes and writes."""
    from config.loader import load_config
    from sync.runtime import open_runtime

    run = run_cli("run", "--once", "-c", str(world.config), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    with open_runtime(load_config(world.config), configure_logs=False) as rt:
        def pulled() -> bool:
            return rt.store.get_cursor("main", "ledger_payments") is not None

        writes_before = _hubspot_writes(world.hubspot)
        stopped = rt.run_job("main", "metrics", stop=pulled)
        assert stopped.status == "partial"
        assert "stopped for shutdown before the computation" in (stopped.error or "")
        assert stopped.counts["values_written"] == 0
        assert _hubspot_writes(world.hubspot) == writes_before
        assert pulled()  # the pull it did is kept

        done = rt.run_job("main", "metrics", stop=lambda: False)
        assert done.status == "ok", done.error
        assert done.counts["values_written"] > 0

"""The demo: a full sync on the embedded sandboxes, and a second run that creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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

    second = run_cli("demo", "--dir", str(tmp_path / "demo"), "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    two = json.loads(second.stdout)
    assert two["pipelines"]["acme-fr"]["counts"].get("created", 0) == 0
    assert two["ledger_invoices"] == one["ledger_invoices"]


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

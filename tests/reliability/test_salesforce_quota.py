"""A Salesforce org whose daily API allocation runs out stops the pipeline cleanly, and resumes later."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from connectors.salesforce.sandbox import SalesforceSandbox
from connectors.sandboxkit import serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from sync.state import StateStore
from tests.harness import crm_block, run_cli, write_config

DEALS = 300


def _config(tmp: Path, sf_url: str, xero: XeroSandbox, xero_url: str) -> Path:
    block = crm_block("salesforce", sf_url) + "      query_batch_size: 200\n      daily_api_share: 1.0\n" \
        "      slow_down_share: 1.0\n"
    return write_config(tmp / "lb.yaml", xero_url=xero_url, refresh_token=xero.issue_tokens()["refresh_token"],
                        state_url=f"sqlite:///{tmp / 'state.db'}", crm_block=block, extra="    page_size: 50\n")


def test_daily_limit_exhaustion_stops_with_a_one_line_reason_and_nothing_half_written(tmp_path: Path) -> None:
    """403 REQUEST_LIMIT_EXCEEDED mid-sync: exit 1, one line naming the limit, state consistent; later run finishes."""
    sf = SalesforceSandbox(seed=9)
    sf.load_book(generate_book(9, companies=60, deals=DEALS, won_share=1.0))
    xero = XeroSandbox(seed=9)
    sf_server, xero_server = serve(sf), serve(xero)
    try:
        # Leave room for the first query pages only: the allocation runs out in the middle of the sync.
        used, _ = sf.api_usage()
        sf._daily.limit = used + 8  # a full first query batch (200 deals) and its lines, then no more
        cfg = _config(tmp_path, sf_server.url, xero, xero_server.url)
        res = run_cli("run", "--once", "-c", str(cfg))
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr
        reason = [ln for ln in res.stderr.splitlines() if "DailyApiRequests" in ln and not ln.startswith("{")]
        assert len(reason) == 1, res.stderr[-2000:]
        assert "daily API request limit" in reason[0]
        created = xero.invoices()
        assert 0 < len(created) < DEALS

        # Nothing half-written: every invoice in Xero is linked, no write is left open, no duplicate.
        store = StateStore.open(f"sqlite:///{tmp_path / 'state.db'}")
        try:
            links = store.links("main", "deal")
            assert {f"LB-main:{crm_id}" for crm_id in links} == {i["Reference"] for i in created}
            assert store.open_intents("main", "invoice") == []
            runs = store.recent_runs(5, "main")
            assert runs[0].status == "failed"
            assert "DailyApiRequests" in (runs[0].error or "")
        finally:
            store.close()

        # The allocation resets: the next run finishes the job, exactly once.
        sf._daily.limit = 100_000
        again = run_cli("run", "--once", "--json", "-c", str(cfg))
        assert again.returncode == 0, again.stderr[-2000:]
        counts = json.loads(again.stdout)["main"]["counts"]
        assert counts["created"] == DEALS - len(created)
        refs = Counter(i["Reference"] for i in xero.invoices())
        assert len(refs) == DEALS
        assert set(refs.values()) == {1}
    finally:
        sf_server.stop()
        xero_server.stop()

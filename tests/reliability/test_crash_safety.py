"""Crash safety: SIGKILLed runs, ambiguous writes and a lost state database never duplicate an invoice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from sync.sandboxes import CRM_SANDBOXES, LEDGER_SANDBOXES
from tests.harness import REPO, cli, crm_block, run_cli, sandbox_process, write_config

pytestmark = pytest.mark.slow

DEALS = 500


def _verify_exactly_once(hs_deals: list[dict[str, str]], invoices: list[dict[str, str]], prefix: str) -> None:
    won = {d["id"]: d for d in hs_deals if d["won"]}
    assert len(won) == DEALS
    live = [i for i in invoices if i["Status"] not in ("DELETED", "VOIDED")]
    refs = Counter(i["Reference"] for i in live)
    dupes = {r: n for r, n in refs.items() if n > 1}
    assert not dupes, f"duplicate invoices: {dupes}"
    assert set(refs) == {f"{prefix}{deal_id}" for deal_id in won}
    # Every invoice carries exactly its deal's amount (ex-tax), and so do the per-currency totals.
    by_ref = {i["Reference"]: i for i in live}
    per_currency_deals: dict[str, Decimal] = {}
    per_currency_invoices: dict[str, Decimal] = {}
    for deal_id, d in won.items():
        inv = by_ref[f"{prefix}{deal_id}"]
        assert inv["CurrencyCode"] == d["currency"]
        assert Decimal(inv["SubTotal"]) == Decimal(d["amount"]), (deal_id, inv["SubTotal"], d["amount"])
        per_currency_deals[d["currency"]] = per_currency_deals.get(d["currency"], Decimal(0)) + Decimal(d["amount"])
        per_currency_invoices[d["currency"]] = (
            per_currency_invoices.get(d["currency"], Decimal(0)) + Decimal(inv["SubTotal"])
        )
    assert per_currency_deals == per_currency_invoices


def _dropped(books: Any) -> int:
    injected: dict[str, int] = books.get("/_sandbox/stats")["faults_injected"]
    return injected.get("drop_after_commit", 0)


def _wait_for_ledger_traffic(books: Any, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Return once the run has sent the ledger a request (or ended, or ``timeout`` passed).

    Starting a process takes a few seconds on a busy machine; a kill timer started at launch would mostly
    kill runs that never reached the ledger. The sandbox counts every request, this poll's own included."""
    last = books.get("/_sandbox/stats")["calls"]
    end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
        seen = books.get("/_sandbox/stats")["calls"]
        if seen - last > 1:
            return
        last = seen


def _crash_loop(tmp_path: Path, crm: str, ledger: str) -> None:
    """SIGKILL `run --once` at random moments until 20 kills landed mid-sync, then run to quiescence."""
    seed = int(os.environ.get("LEDGERBRIDGE_CRASH_SEED", "20261126"))
    rng = random.Random(seed)
    # Every request is slowed down (latency is listed last so that it never hides the other faults), and
    # pages are small, so the sync spans many runs; each kill timer starts once the run talks to the ledger, so
    # each SIGKILL lands in the middle of real work.
    with sandbox_process(crm, "--deals", str(DEALS), "--won-share", "1", "--seed", str(seed),
                         "--faults", "429=0.02,503=0.02,latency=1:0.05", "--time-scale", "10") as hs, \
         sandbox_process(ledger, "--seed", str(seed), "--time-scale", "10",
                         "--faults", "drop_after_commit=0.2,503=0.03,429=0.02,latency=1:0.15") as books:
        token = books.post("/_sandbox/authorize").get("refresh_token")
        cfg = write_config(tmp_path / "lb.yaml", ledger=ledger, ledger_url=books.url, refresh_token=token,
                           state_url=f"sqlite:///{tmp_path / 'state.db'}", time_scale=10,
                           extra="    page_size: 10\n", crm_block=crm_block(crm, hs.url, 10))
        kills = 0
        launches = 0
        # Under load a run may be killed before it reaches the ledger every time: keep going until the
        # storm has also dropped answers to ledger writes.
        while (kills < 20 or not _dropped(books)) and launches < 150:
            launches += 1
            proc = subprocess.Popen(cli("run", "--once", "-c", str(cfg)), cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for_ledger_traffic(books, proc)
            try:
                proc.wait(timeout=rng.uniform(0.0, 1.5))
            except subprocess.TimeoutExpired:
                in_progress = len(books.get("/_sandbox/invoices")) < DEALS
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += in_progress
            if len(books.get("/_sandbox/invoices")) >= DEALS:
                break  # the sync is complete: no later kill could land mid-sync
        assert kills >= 20, f"only {kills} runs were killed while the sync was in progress"
        # The storm passes: the ledger stops dropping answers, both vendors answer at once. Restart to
        # quiescence: a run that creates nothing and ends clean (a ledger without idempotency keys may hold an
        # unanswered create for a few runs, until its lookup can be trusted).
        books.put("/_sandbox/faults", {"spec": ""})
        hs.put("/_sandbox/faults", {"spec": ""})
        for _ in range(30):
            res = run_cli("run", "--once", "--json", "-c", str(cfg))
            if res.returncode == 0 and '"awaiting_lookup"' not in res.stdout:
                break
            time.sleep(0.5)
        assert res.returncode == 0, res.stdout + res.stderr
        _verify_exactly_once(hs.get("/_sandbox/deals"), books.get("/_sandbox/invoices"), "LB-main:")
        stats = books.get("/_sandbox/stats")
        assert stats["faults_injected"].get("drop_after_commit", 0) > 0


@pytest.mark.parametrize("crm", CRM_SANDBOXES)
def test_sigkill_at_random_moments_with_ambiguous_writes_invoices_each_won_deal_once(tmp_path: Path, crm: str) -> None:
    """20+ SIGKILLs of `run --once` during a 500-deal sync into Xero with dropped-after-commit writes."""
    _crash_loop(tmp_path, crm, "xero")


@pytest.mark.parametrize("ledger", [lg for lg in LEDGER_SANDBOXES if lg != "xero"])
def test_sigkill_at_random_moments_into_each_ledger_invoices_each_won_deal_once(tmp_path: Path, ledger: str) -> None:
    """The same crash test from HubSpot into QuickBooks Online and Pennylane: one invoice per won deal."""
    _crash_loop(tmp_path, "hubspot", ledger)


@pytest.mark.parametrize("ledger", LEDGER_SANDBOXES)
def test_lost_state_database_is_rebuilt_from_ledger_references(tmp_path: Path, ledger: str) -> None:
    """Deleting the state database and running again adopts the invoices already in the ledger."""
    with sandbox_process("hubspot", "--deals", str(DEALS), "--won-share", "1", "--seed", "5",
                         "--time-scale", "10") as hs, \
         sandbox_process(ledger, "--seed", "5", "--time-scale", "10") as xero:
        token = xero.post("/_sandbox/authorize").get("refresh_token")
        db = tmp_path / "state.db"
        cfg = write_config(tmp_path / "lb.yaml", hubspot_url=hs.url, ledger=ledger, ledger_url=xero.url,
                           refresh_token=token, state_url=f"sqlite:///{db}", time_scale=10)
        first = run_cli("run", "--once", "--json", "-c", str(cfg))
        assert first.returncode == 0, first.stderr
        before = xero.get("/_sandbox/invoices")
        assert len(before) == DEALS
        for f in tmp_path.iterdir():
            if f.name.startswith("state.db"):
                f.unlink()
        # The rotated refresh token lived in the lost database: the connection is re-authorised.
        token = xero.post("/_sandbox/authorize").get("refresh_token")
        write_config(cfg, hubspot_url=hs.url, ledger=ledger, ledger_url=xero.url, refresh_token=token,
                     state_url=f"sqlite:///{db}", time_scale=10)
        second = run_cli("run", "--once", "--json", "-c", str(cfg))
        assert second.returncode == 0, second.stderr
        import json

        counts = json.loads(second.stdout)["main"]["counts"]
        assert counts.get("created", 0) == 0
        assert counts["adopted"] == DEALS
        after = xero.get("/_sandbox/invoices")
        assert len(after) == DEALS
        _verify_exactly_once(hs.get("/_sandbox/deals"), after, "LB-main:")

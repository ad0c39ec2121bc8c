"""Benchmark: sync N won deals from a CRM sandbox into the Xero sandbox under the vendors' limits.

The two sandboxes run as separate processes (``ledgerbridge sandbox serve``), as the real vendors are
remote, and enforce the documented limits (HubSpot: 100 requests per 10 s, 5 searches per second;
Salesforce: the daily allocation; Pipedrive: a burst window of 2 s and a daily token budget; Xero: 60
calls per minute, 5 concurrent, 5,000 per day) on a clock compressed by ``--time-scale`` (virtual seconds
per real second). The sync runs in this process. The script prints the calls made to each vendor, the
wall time, and the minimum wall time the limits allow for that many calls, on the same compressed clock,
so the ratio wall / bound says how close the sync runs to the vendor's ceiling.

    python bench/sync_bench.py --crm hubspot --deals 10000 --companies 2000 --lines 3 --time-scale 20
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from config.schema import Pipeline
from connectors.registry import connector_class
from connectors.seedbook import PRODUCTS
from sync.engine import PipelineRunner
from sync.logging import configure_logging
from sync.sandboxes import CRM_SANDBOXES, LEDGER_SANDBOXES, crm_sandbox_settings, ledger_sandbox_settings
from sync.state import StateStore

TAX_TYPES = {
    "xero": {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"},
    "quickbooks": {"20": "2", "10": "3", "5.5": "4", "2.1": "5"},
    "pennylane": {"20": "FR_200", "10": "FR_100", "5.5": "FR_55", "2.1": "FR_21"},
}
XERO_MIN, XERO_DAY = 60, 5000
QBO_MIN = 500
PENNYLANE_5S = 25
HUBSPOT_10S, HUBSPOT_SEARCH_S = 100, 5
SALESFORCE_DAY = 100_000
PIPEDRIVE_BURST_2S = 80  # the sandbox's burst window, as on Pipedrive's higher plans


def min_seconds(calls: int, limit: int, window: float) -> float:
    """Least time N calls need under a sliding window of ``limit`` calls per ``window`` seconds."""
    return max(math.ceil(calls / limit) - 1, 0) * window


def start_sandbox(vendor: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "sync.cli", "sandbox", "serve", vendor, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"{vendor} sandbox did not start")
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--crm", choices=CRM_SANDBOXES, default="hubspot")
    ap.add_argument("--ledger", choices=LEDGER_SANDBOXES, default="xero")
    ap.add_argument("--deals", type=int, default=10_000)
    ap.add_argument("--companies", type=int, default=2_000)
    ap.add_argument("--lines", type=int, default=3)
    ap.add_argument("--time-scale", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    scale = args.time_scale
    configure_logging("warning", "json")

    t0 = time.monotonic()
    hs_proc, hs_url = start_sandbox(args.crm, "--deals", str(args.deals), "--companies", str(args.companies),
                                    "--lines", str(args.lines), "--won-share", "1", "--seed", str(args.seed),
                                    "--time-scale", str(scale))
    xero_proc, xero_url = start_sandbox(args.ledger, "--seed", str(args.seed), "--time-scale", str(scale))
    setup_s = time.monotonic() - t0
    try:
        refresh = httpx.post(xero_url + "/_sandbox/authorize", timeout=30).json().get("refresh_token")
        with tempfile.TemporaryDirectory() as tmp:
            store = StateStore.open(f"sqlite:///{Path(tmp) / 'bench.db'}")
            tokens = store.token_store()
            crm_settings = crm_sandbox_settings(args.crm, hs_url, time_scale=scale)
            if args.crm == "pipedrive":
                crm_settings["burst_limit"] = PIPEDRIVE_BURST_2S
            crm = connector_class("crm", args.crm).from_config(crm_settings, tokens)
            ledger_block = {**ledger_sandbox_settings(args.ledger, xero_url, refresh_token=refresh, time_scale=scale),
                            "tax_types": TAX_TYPES[args.ledger]}
            ledger = connector_class("ledger", args.ledger).from_config(ledger_block, tokens)
            pipeline = Pipeline.model_validate({
                "crm": {"type": "hubspot"}, "ledger": {"type": "xero"},
                "items": {"on_unmapped": "fail",
                          "map": {p.sku: {"item_code": p.sku, "account_code": "706"} for p in PRODUCTS}},
                "taxes": {"map": TAX_TYPES[args.ledger]},
                "page_size": 200,
            })
            runner = PipelineRunner("bench", pipeline, crm, ledger, store)
            start = time.monotonic()
            result = runner.run()
            wall = time.monotonic() - start
            store.close()
        xero_stats = httpx.get(xero_url + "/_sandbox/stats", timeout=30).json()
    finally:
        for p in (hs_proc, xero_proc):
            p.terminate()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    hs_calls, xero_calls = crm.stats.calls, ledger.stats.calls
    searches = sum(n for ep, n in crm.stats.by_endpoint.items() if "search" in ep)
    if args.ledger == "xero":
        xero_bound = max(min_seconds(xero_calls, XERO_MIN, 60), min_seconds(xero_calls, XERO_DAY, 86400)) / scale
        limits = "60/min, 5,000/day"
    elif args.ledger == "quickbooks":
        xero_bound = min_seconds(xero_calls, QBO_MIN, 60) / scale
        limits = "500/min"
    else:
        xero_bound = min_seconds(xero_calls, PENNYLANE_5S, 5) / scale
        limits = "25 per 5 s"
    ledger_name = {"xero": "Xero", "quickbooks": "QuickBooks", "pennylane": "Pennylane"}[args.ledger]
    if args.crm == "hubspot":
        hs_bound = max(min_seconds(hs_calls, HUBSPOT_10S, 10), min_seconds(searches, HUBSPOT_SEARCH_S, 1)) / scale
    elif args.crm == "salesforce":
        hs_bound = min_seconds(hs_calls, SALESFORCE_DAY, 86400) / scale
    else:
        hs_bound = min_seconds(hs_calls, PIPEDRIVE_BURST_2S, 2) / scale
    crm_name = {"hubspot": "HubSpot", "salesforce": "Salesforce", "pipedrive": "Pipedrive"}[args.crm]
    out = {
        "crm": args.crm, "ledger": args.ledger, "deals": args.deals, "companies": args.companies,
        "lines_per_deal": args.lines,
        "status": result.status, "created": result.counts.get("created", 0),
        "customers_created": result.counts.get("customers_created", 0),
        "crm_calls": hs_calls, "crm_calls_by_endpoint": crm.stats.by_endpoint, "xero_calls": xero_calls,
        "ledger_calls_by_endpoint": ledger.stats.by_endpoint,
        "wall_s": round(wall, 2), "time_scale": scale,
        "xero_min_wall_s": round(xero_bound, 2), "crm_min_wall_s": round(hs_bound, 2),
        "wall_over_xero_bound": round(wall / xero_bound, 3) if xero_bound else None,
        "sandbox_setup_s": round(setup_s, 2),
        "rate_limited_responses": {args.crm: crm.stats.rate_limited, args.ledger: ledger.stats.rate_limited},
        "ledger_sandbox": xero_stats,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"synced {out['created']} of {args.deals} won deals ({args.lines} lines each, {args.companies} companies)"
          f" -> status {result.status}")
    print(f"{crm_name} calls: {hs_calls}   {ledger_name} calls: {xero_calls} "
          f"{dict(sorted(ledger.stats.by_endpoint.items()))}")
    print(f"wall time: {wall:.2f} s on a clock compressed x{scale:g}")
    print(f"minimum wall time the {ledger_name} limits allow for {xero_calls} calls: {xero_bound:.2f} s "
          f"({limits}, same clock); wall / bound = {out['wall_over_xero_bound']}")
    print(f"minimum wall time the {crm_name} limits allow for {hs_calls} calls: {hs_bound:.2f} s")
    print(f"429 responses received: {crm_name} {crm.stats.rate_limited}, {ledger_name} {ledger.stats.rate_limited}")


if __name__ == "__main__":
    main()

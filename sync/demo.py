"""``ledgerbridge demo``: a complete sync between a simulated CRM and a simulated Xero organisation.

The CRM is HubSpot by default, or Salesforce or Pipedrive (``--crm``). Both sandboxes run in this process
on 127.0.0.1; the CRM is seeded with a generated French SME (a few hundred companies, deals across
stages, VAT at 20, 10, 5.5 and 2.1 %, mostly EUR and some USD), the same book whichever CRM. Their data and
the state database are kept in ``--dir`` (default ``.ledgerbridge/``), so a second run sees the invoices
the first one created and creates nothing. The sandboxes run on the real clock with the vendors'
documented rate limits.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import config as config_pkg
from config.loader import load_config
from connectors.errors import ConfigError
from connectors.sandboxkit import serve
from sync.runtime import open_runtime
from sync.sandboxes import build_sandbox

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = Path(config_pkg.__file__).parent / "examples" / "demo.yaml"
DEMO_COMPANIES = 300
DEMO_DEALS = 700


def _sandbox(vendor: str, seed: int, snapshot: Path) -> Any:
    if snapshot.exists():
        sb = build_sandbox(vendor, seed=seed, deals=0)
        sb.load(snapshot)
        return sb
    return build_sandbox(vendor, seed=seed, deals=DEMO_DEALS, companies=DEMO_COMPANIES)


CRM_LABELS = {"hubspot": "HubSpot", "salesforce": "Salesforce", "pipedrive": "Pipedrive"}
DEMO_PIPELINES = {"hubspot": "acme-fr", "salesforce": "acme-fr-salesforce", "pipedrive": "acme-fr-pipedrive"}


def run_demo(*, seed: int, workdir: Path, fresh: bool, as_json: bool, console: Console,
             crm: str = "hubspot") -> int:
    if crm not in DEMO_PIPELINES:
        Console(stderr=True).print(f"demo: unknown CRM {crm!r}; choose one of {', '.join(DEMO_PIPELINES)}",
                                   markup=False)
        return 2
    started = time.monotonic()
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    snaps = {v: workdir / f"sandbox-{v}-{seed}.bin" for v in (crm, "xero")}
    crm_sandbox = _sandbox(crm, seed, snaps[crm])
    xero = _sandbox("xero", seed, snaps["xero"])
    hs_server = serve(crm_sandbox)
    xero_server = serve(xero)
    env = dict(os.environ)
    env.update(
        LEDGERBRIDGE_DEMO_DIR=str(workdir),
        LEDGERBRIDGE_DEMO_CRM_URL=hs_server.url,
        LEDGERBRIDGE_DEMO_XERO_URL=xero_server.url,
    )
    try:
        try:
            loaded = load_config(DEMO_CONFIG, env=env)
        except ConfigError as exc:
            Console(stderr=True).print(str(exc), markup=False)
            return 2
        won_total = sum(1 for d in httpx.get(hs_server.url + "/_sandbox/deals", timeout=30).json() if d["won"])
        quiet = as_json or not sys.stdout.isatty()
        results: dict[str, Any] = {}
        with open_runtime(loaded) as rt:
            for name in rt.pipeline_names(DEMO_PIPELINES[crm]):
                with rt.runner(name) as runner, Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet, transient=False,
                ) as progress:
                    task = progress.add_task(f"{name}: invoicing won deals", total=won_total)

                    def tick(_what: str, created: int, _task: Any = task, _p: Progress = progress) -> None:
                        _p.update(_task, completed=created)

                    runner.progress = tick
                    res = runner.run()
                    progress.update(task, completed=won_total)
                results[name] = res
        totals = _ledger_totals(xero)
        elapsed = time.monotonic() - started
        code = max((r.exit_code for r in results.values()), default=0)
        summary = {
            "pipelines": {
                n: {"status": r.status, "counts": dict(r.counts), "api_calls": r.api_calls, "error": r.error}
                for n, r in results.items()
            },
            "ledger_invoices": totals["count"],
            "ledger_totals": totals["totals"],
            "seconds": round(elapsed, 2),
            "state_dir": str(workdir),
        }
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        else:
            _print_summary(console, results, totals, elapsed, workdir, CRM_LABELS[crm])
        return code
    finally:
        crm_sandbox.save(snaps[crm])
        xero.save(snaps["xero"])
        hs_server.stop()
        xero_server.stop()


def _ledger_totals(xero: Any) -> dict[str, Any]:
    totals: dict[str, Decimal] = {}
    count = 0
    for inv in xero.invoices():
        count += 1
        cur = inv.get("CurrencyCode", "EUR")
        totals[cur] = totals.get(cur, Decimal(0)) + Decimal(str(inv.get("Total", "0")))
    return {"count": count, "totals": {k: str(v) for k, v in sorted(totals.items())}}


def _print_summary(console: Console, results: dict[str, Any], totals: dict[str, Any], elapsed: float,
                   workdir: Path, crm_label: str) -> None:
    for name, res in results.items():
        t = Table(title=f"LedgerBridge demo: pipeline {name} ({res.status})")
        t.add_column("what")
        t.add_column("count", justify="right")
        labels = [
            ("pulled", f"deals pulled from {crm_label}"),
            ("won", "won deals"),
            ("created", "invoices created in Xero"),
            ("already_invoiced", "already invoiced (skipped)"),
            ("customers_created", "Xero contacts created"),
            ("customers_matched", "Xero contacts matched"),
            ("adopted", "invoices adopted from Xero references"),
            ("flagged", "deals flagged for attention"),
            ("failed", "invoices rejected by Xero"),
        ]
        for key, label in labels:
            t.add_row(label, str(res.counts.get(key, 0)))
        for vendor, calls in res.api_calls.items():
            t.add_row(f"{vendor} API calls", str(calls))
        console.print(t)
        if res.error:
            console.print(f"[red]{name}: {res.error}[/red]")
    console.print(
        f"Xero now holds {totals['count']} invoices; totals: "
        + ", ".join(f"{v} {k}" for k, v in totals["totals"].items())
    )
    console.print(f"{crm_label} and Xero were simulated on 127.0.0.1 by LedgerBridge's sandboxes, on the real "
                  "clock, with the vendors' documented rate limits.")
    console.print(f"Done in {elapsed:.1f} s. State and simulated vendors are kept in {workdir}; "
                  "run the demo again and it creates nothing.")

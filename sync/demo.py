"""``ledgerbridge demo``: a complete sync between a simulated CRM and a simulated ledger, then the metrics.

The ledger is Xero by default, or QuickBooks Online or Pennylane (``--ledger``, from HubSpot).

The CRM is HubSpot by default, or Salesforce or Pipedrive (``--crm``). Both sandboxes run in this process
on 127.0.0.1; the CRM is seeded with a generated French SME (a few hundred companies, deals across
stages, VAT at 20, 10, 5.5 and 2.1 %, mostly EUR and some USD), the same book whichever CRM, and the
ledger with three years of that book's invoices, payments (some late, some never), credit notes and
expenses, with some customers gone. The demo syncs the won deals, lets customers pay the new invoices as
they usually do up to today, then runs the metrics: the CRM's companies get CLV, CAC, DSO, balance due and
revenue at risk, its deals their invoice status, and the summary shows the top customers by CLV and by
revenue at risk. Data and state are kept in ``--dir`` (default ``.ledgerbridge/``), so a second run
creates nothing and writes nothing. The sandboxes run on the real clock with the vendors' documented rate
limits.
"""

from __future__ import annotations

import datetime as dt
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
from metrics.present import customer_names, top_tables
from metrics.run import MetricsReport, summary_rows
from sync.runtime import open_runtime
from sync.sandboxes import build_sandbox

__all__ = ["DEMO_CONFIG", "run_demo"]

DEMO_CONFIG = Path(config_pkg.__file__).parent / "examples" / "demo.yaml"
DEMO_COMPANIES = 300
DEMO_DEALS = 700
#: Years of ledger history (invoices, payments, credit notes) the demo ledger starts with.
DEMO_HISTORY_YEARS = 3


def _sandbox(vendor: str, seed: int, snapshot: Path, time_scale: float = 1.0) -> Any:
    if snapshot.exists():
        sb = build_sandbox(vendor, seed=seed, deals=0, time_scale=time_scale)
        sb.load(snapshot)
        return sb
    return build_sandbox(vendor, seed=seed, deals=DEMO_DEALS, companies=DEMO_COMPANIES, time_scale=time_scale,
                         history_years=DEMO_HISTORY_YEARS)


CRM_LABELS = {"hubspot": "HubSpot", "salesforce": "Salesforce", "pipedrive": "Pipedrive"}
LEDGER_LABELS = {"xero": "Xero", "quickbooks": "QuickBooks Online", "pennylane": "Pennylane"}
#: QuickBooks (one request per invoice, 500 a minute) and Pennylane (25 requests per 5 s, a lookup before
#: each create) would take minutes on the real clock; their demo sandboxes run on a compressed clock.
LEDGER_TIME_SCALE = {"xero": 1.0, "quickbooks": 10.0, "pennylane": 10.0}
#: Pipedrive has no batch update: the write-back of finance fields is one request per record under its
#: token budget, minutes on the real clock, so its demo sandbox runs on a compressed clock too.
CRM_TIME_SCALE = {"hubspot": 1.0, "salesforce": 1.0, "pipedrive": 10.0}
#: (CRM, ledger) -> the pipeline of config/examples/demo.yaml that connects them.
DEMO_PIPELINES = {
    ("hubspot", "xero"): "acme-fr",
    ("salesforce", "xero"): "acme-fr-salesforce",
    ("pipedrive", "xero"): "acme-fr-pipedrive",
    ("hubspot", "quickbooks"): "acme-fr-quickbooks",
    ("hubspot", "pennylane"): "acme-fr-pennylane",
}


def run_demo(*, seed: int, workdir: Path, fresh: bool, as_json: bool, console: Console,
             crm: str = "hubspot", ledger: str = "xero") -> int:
    if (crm, ledger) not in DEMO_PIPELINES:
        pairs = ", ".join(f"--crm {c} --ledger {lg}" for c, lg in DEMO_PIPELINES)
        Console(stderr=True).print(f"demo: no demo pipeline for --crm {crm} --ledger {ledger}; the demo offers "
                                   f"{pairs}", markup=False)
        return 2
    started = time.monotonic()
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    snaps = {v: workdir / f"sandbox-{v}-{seed}.bin" for v in (crm, ledger)}
    crm_scale = CRM_TIME_SCALE[crm]
    crm_sandbox = _sandbox(crm, seed, snaps[crm], crm_scale)
    time_scale = LEDGER_TIME_SCALE[ledger]
    xero = _sandbox(ledger, seed, snaps[ledger], time_scale)
    hs_server = serve(crm_sandbox)
    xero_server = serve(xero)
    env = dict(os.environ)
    env.update(
        LEDGERBRIDGE_DEMO_DIR=str(workdir),
        LEDGERBRIDGE_DEMO_CRM_URL=hs_server.url,
        LEDGERBRIDGE_DEMO_LEDGER_URL=xero_server.url,
        LEDGERBRIDGE_DEMO_TIME_SCALE=str(time_scale),
        LEDGERBRIDGE_DEMO_CRM_TIME_SCALE=str(crm_scale),
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
        metrics: dict[str, MetricsReport] = {}
        with open_runtime(loaded) as rt:
            for name in rt.pipeline_names(DEMO_PIPELINES[(crm, ledger)]):
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
            # Customers pay the invoices just created as they usually do (some late, some never), up to today.
            xero.settle(dt.datetime.now(dt.UTC).date())
            for name in results:
                metrics[name] = rt.metrics(name)
            names = {n: customer_names(rt.store, n) for n in results}
        totals = _ledger_totals(xero_server.url)
        elapsed = time.monotonic() - started
        code = max([r.exit_code for r in results.values()] + [m.exit_code for m in metrics.values()], default=0)
        summary = {
            "pipelines": {
                n: {"status": r.status, "counts": dict(r.counts), "api_calls": r.api_calls, "error": r.error}
                for n, r in results.items()
            },
            "ledger_invoices": totals["count"],
            "ledger_history_invoices": totals["history"],
            "ledger_totals": totals["totals"],
            "seconds": round(elapsed, 2),
            "ledger_clock_scale": time_scale,
            "crm_clock_scale": crm_scale,
            "state_dir": str(workdir),
            "metrics": {n: _metrics_summary(m, names[n]) for n, m in metrics.items()},
        }
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        else:
            _print_summary(console, results, totals, elapsed, workdir, CRM_LABELS[crm], LEDGER_LABELS[ledger],
                           time_scale, metrics, names, crm_scale)
        return code
    finally:
        crm_sandbox.save(snaps[crm])
        xero.save(snaps[ledger])
        hs_server.stop()
        xero_server.stop()


def _ledger_totals(url: str) -> dict[str, Any]:
    """Count and totals of the invoices the sync created (references ``LB-...``), and of the others."""
    totals: dict[str, Decimal] = {}
    count = history = 0
    for inv in httpx.get(url + "/_sandbox/invoices", timeout=30).json():
        if not str(inv.get("Reference") or "").startswith("LB-"):
            history += 1
            continue
        count += 1
        cur = inv.get("CurrencyCode", "EUR")
        totals[cur] = totals.get(cur, Decimal(0)) + Decimal(str(inv.get("Total", "0")))
    return {"count": count, "history": history, "totals": {k: str(v) for k, v in sorted(totals.items())}}


def _metrics_summary(report: MetricsReport, names: dict[str, str]) -> dict[str, Any]:
    top = {}
    for key in ("clv_predicted", "clv_historical", "revenue_at_risk"):
        top[key] = [{"customer": names.get(r["customer_id"], r["customer_id"]), key: str(r[key])}
                    for r in (summary_rows(report.result, key) if report.result else [])]
    return {"status": report.status, "error": report.error, "currency": report.currency,
            "customers_written": report.customers.values_written, "deals_written": report.deals.values_written,
            "company": report.result.to_json()["company"] if report.result else None, "top": top}


def _print_summary(console: Console, results: dict[str, Any], totals: dict[str, Any], elapsed: float,
                   workdir: Path, crm_label: str, ledger_label: str, time_scale: float,
                   metrics: dict[str, MetricsReport], names: dict[str, dict[str, str]],
                   crm_scale: float = 1.0) -> None:
    for name, res in results.items():
        t = Table(title=f"LedgerBridge demo: pipeline {name} ({res.status})")
        t.add_column("what")
        t.add_column("count", justify="right")
        labels = [
            ("pulled", f"deals pulled from {crm_label}"),
            ("won", "won deals"),
            ("created", f"invoices created in {ledger_label}"),
            ("already_invoiced", "already invoiced (skipped)"),
            ("customers_created", f"{ledger_label} customers created"),
            ("customers_matched", f"{ledger_label} customers matched"),
            ("adopted", f"invoices adopted from {ledger_label} references"),
            ("flagged", "deals flagged for attention"),
            ("failed", f"invoices rejected by {ledger_label}"),
        ]
        for key, label in labels:
            t.add_row(label, str(res.counts.get(key, 0)))
        for vendor, calls in res.api_calls.items():
            t.add_row(f"{vendor} API calls", str(calls))
        console.print(t)
        if res.error:
            console.print(f"[red]{name}: {res.error}[/red]")
    console.print(
        f"{ledger_label} now holds {totals['count']} invoices from CRM deals; totals: "
        + ", ".join(f"{v} {k}" for k, v in totals["totals"].items())
        + f" (and {totals['history']} invoices of earlier years)"
    )
    for name, report in metrics.items():
        for table in top_tables(report, names[name]):
            console.print(table)
        written = report.customers.values_written + report.deals.values_written
        console.print(f"{name}: finance metrics as of {report.as_of} ({report.status}); {written} values written to "
                      f"{crm_label} ({report.customers.records_changed} companies, {report.deals.records_changed} "
                      "deals); run the demo again and it writes none.")
        if report.error:
            console.print(f"[red]{name}: metrics: {report.error}[/red]")
    def clock(scale: float) -> str:
        return "the real clock" if scale == 1 else f"a clock compressed x{scale:g}"

    where = (f"on {clock(time_scale)}" if crm_scale == time_scale
             else f"{crm_label} on {clock(crm_scale)} and {ledger_label} on {clock(time_scale)}")
    console.print(f"{crm_label} and {ledger_label} were simulated on 127.0.0.1 by LedgerBridge's sandboxes, "
                  f"{where}, with the vendors' documented rate limits.")
    console.print(f"Done in {elapsed:.1f} s. State and simulated vendors are kept in {workdir}; "
                  "run the demo again and it creates nothing.")

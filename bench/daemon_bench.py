"""Benchmark: how 1, 2 and 3 daemon replicas on one PostgreSQL share the work of 30 pipelines.

For each replica count the script creates a fresh schema in PostgreSQL, starts a helper process that serves
one HubSpot and one Xero sandbox per pipeline (each ledger call delayed by ``--latency`` seconds, as a remote
API is), and starts the replicas (``ledgerbridge daemon``, every job on a one-second cron so that the
replicas are never short of work). It measures two phases:

- **first sync**: from the start of the replicas until every won deal of every pipeline is invoiced:
  invoices per second;
- **steady**: ``--steady`` seconds afterwards, while the replicas run the pipelines' jobs (deal sync, ledger
  pull, metrics) as often as their schedules and leases allow: finished jobs per second.

Each job still runs on one replica at a time (the leases), so more replicas help as long as the work is
waiting on APIs rather than on CPU.

    python bench/daemon_bench.py --replicas 1,2,3 --pipelines 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from connectors.seedbook import PRODUCTS
from sync.crypto import generate_key

REPO = Path(__file__).resolve().parents[1]

_SANDBOXES = r"""
import json, signal, sys, threading
from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.sandboxkit import FaultPlan, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox

pipelines, deals, latency = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
out, servers = [], []
for i in range(pipelines):
    hs = HubSpotSandbox(seed=900 + i)
    hs.load_book(generate_book(900 + i, companies=max(deals // 3, 1), deals=deals, won_share=0.5))
    xero = XeroSandbox(seed=900 + i, calls_per_minute=6000, concurrency=20)
    if latency:
        xero.faults = FaultPlan(f"latency=1:{latency}")
    servers += [serve(hs), serve(xero)]
    won = sum(1 for d in hs.deals_snapshot() if d.get("hs_is_closed_won") == "true")
    out.append({"hubspot": servers[-2].url, "xero": servers[-1].url, "won": won,
                "refresh_token": xero.issue_tokens()["refresh_token"]})
print(json.dumps(out), flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
stop.wait()
for s in servers:
    s.stop()
"""


def _config(path: Path, shops: list[dict[str, object]], state_url: str, key: str) -> None:
    items = "\n".join(f'          {p.sku}: {{item_code: {p.sku}, account_code: "706"}}' for p in PRODUCTS)
    blocks = []
    for i, shop in enumerate(shops):
        blocks.append(f"""\
  p{i:02d}:
    crm:
      type: hubspot
      base_url: {shop["hubspot"]}
      access_token: demo-hubspot-token
    ledger:
      type: xero
      base_url: {shop["xero"]}
      token_url: {shop["xero"]}/connect/token
      tenant_id: demo-tenant
      connection: xero:p{i:02d}
      client_id: demo-client
      client_secret: demo-client-secret
      refresh_token: {shop["refresh_token"]}
      calls_per_minute: 6000
      concurrency: 20
    items:
      on_unmapped: default
      default:
        account_code: "706"
      map:
{items}
    taxes:
      map: {{"20": TAX001, "10": TAX002, "5.5": TAX003, "2.1": TAX004}}
    schedule:
      cron: '* * * * * *'
    ledger_schedule:
      cron: '* * * * * *'
    metrics:
      fx_rates: {{USD: "0.92"}}
      schedule:
        cron: '* * * * * *'
""")
    path.write_text(f"""\
state:
  url: {state_url}
  secret_key: {key}
logging:
  level: warning
  format: json
pipelines:
{"".join(blocks)}""")


def _counts(conn: psycopg.Connection[tuple[object, ...]], schema: str) -> tuple[int, int]:
    """Invoices created and jobs finished so far."""
    try:
        row = conn.execute(sql.SQL(
            "SELECT coalesce(sum((counts->>'created')::int) FILTER (WHERE job = 'sync'), 0), "
            "count(*) FILTER (WHERE finished_at IS NOT NULL) FROM {}.runs").format(sql.Identifier(schema))).fetchone()
    except psycopg.errors.UndefinedTable:
        conn.rollback()
        return 0, 0
    assert row is not None
    return int(str(row[0])), int(str(row[1]))


def run(replicas: int, args: argparse.Namespace) -> dict[str, float]:
    schema = f"lb_bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(args.pg, autocommit=True)
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    helper = subprocess.Popen([sys.executable, "-c", _SANDBOXES, str(args.pipelines), str(args.deals),
                               str(args.latency)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen[str]] = []
    try:
        assert helper.stdout is not None
        shops = json.loads(helper.stdout.readline())
        won = sum(int(s["won"]) for s in shops)
        base = args.pg.replace("postgresql://", "postgresql+psycopg://", 1)
        state_url = f"{base}?options={quote(f'-csearch_path={schema}')}"
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "bench.yaml"
            _config(cfg, shops, state_url, generate_key())
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            started = time.monotonic()
            for _ in range(replicas):
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "sync.cli", "daemon", "-c", str(cfg), "--port", "0",
                     "--workers", str(args.workers)],
                    cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
            created = 0
            while created < won:
                if time.monotonic() - started > args.timeout:
                    raise SystemExit(f"{replicas} replica(s): only {created} of {won} invoices after {args.timeout} s")
                time.sleep(0.25)
                created, _ = _counts(admin, schema)
            first = time.monotonic() - started
            _, jobs_before = _counts(admin, schema)
            time.sleep(args.steady)
            _, jobs_after = _counts(admin, schema)
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        helper.send_signal(signal.SIGTERM)
        helper.wait(30)
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        admin.close()
    return {"replicas": replicas, "pipelines": args.pipelines, "invoices": won,
            "first_sync_s": round(first, 2), "invoices_per_s": round(won / first, 1),
            "steady_jobs_per_s": round((jobs_after - jobs_before) / args.steady, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="Replica counts to measure, comma-separated")
    parser.add_argument("--pipelines", type=int, default=30)
    parser.add_argument("--deals", type=int, default=40, help="Deals per pipeline (half of them won)")
    parser.add_argument("--latency", type=float, default=0.05, help="Seconds each Xero call takes")
    parser.add_argument("--workers", type=int, default=8, help="Jobs run at once by each replica")
    parser.add_argument("--steady", type=float, default=15.0, help="Seconds of the steady phase")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL server")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON")
    args = parser.parse_args()
    results = [run(int(n), args) for n in args.replicas.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| replicas | pipelines | invoices | first sync | invoices/s | steady jobs/s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['replicas']} | {r['pipelines']} | {r['invoices']} | {r['first_sync_s']} s | "
              f"{r['invoices_per_s']} | {r['steady_jobs_per_s']} |")


if __name__ == "__main__":
    main()

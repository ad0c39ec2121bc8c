"""Benchmark: latency from a deal marked won in HubSpot to its invoice in Xero, through webhooks and the daemon.

The HubSpot and Xero sandboxes run as separate processes (``ledgerbridge sandbox serve``), and so does the
daemon (``ledgerbridge daemon``), with a one-pipeline config whose HubSpot block carries the app's
``client_secret`` (so the daemon serves ``/webhooks/<pipeline>/hubspot``) and whose schedules are an hour
long: after the first scheduled runs at start, only webhooks make the deal sync run. The HubSpot book has
open deals only (``--won-share 0``, every deal with ``--lines`` line items). Once the first sync is over,
the script registers the daemon's webhook URL on the HubSpot sandbox (``POST /_sandbox/webhooks``, signed with
the client secret, deal stage changes only) and marks ``--events`` open deals won, one at a time, at
``--rate`` events per second (``PATCH /_sandbox/deals/{id}``, the stage that closes the deal as won in its
HubSpot pipeline). A background thread reads Xero's invoices every ``--poll`` seconds and notes, for every
pending deal, the first time an invoice whose reference ends with ``:<deal id>`` exists. The latency of an
event runs from just before its PATCH to that moment (so it is late by at most one poll and one read).

What the latency is made of: the sandbox sends the webhook (it gathers changes for 50 ms), the daemon
verifies and stores it, its debouncer waits until the end of the window the event falls in (2 s from the
first event of the window: an event alone in its window waits all of it, which is the floor of an isolated
event), then the deal sync runs (or runs again after the one in flight) and creates the invoice, within the
vendors' limits (HubSpot: 100 requests per 10 s; Xero: 60 calls per minute). The script prints p50, p95, max
and mean, the sync runs the daemon made and the API calls they spent during the events, the least interval
between runs Xero's 60 calls per minute allows at that many calls per run, and the daemon's exit code after
SIGTERM (0 expected). ``--time-scale`` compresses the sandboxes' rate windows (virtual seconds per real
second; the default 1 is the real clock); the debounce window and the latencies are real seconds.

    python bench/webhook_bench.py --events 200 --rate 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from connectors.seedbook import PRODUCTS
from sync.sandboxes import crm_sandbox_settings, ledger_sandbox_settings
from sync.state import StateStore
from sync.webhooks import DEFAULT_DEBOUNCE_S

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "bench"
CLIENT_SECRET = "bench-hubspot-client-secret"
TAX_TYPES = {"20": "TAX001", "10": "TAX002", "5.5": "TAX003", "2.1": "TAX004"}
XERO_MIN = 60  # calls per minute
HUBSPOT_10S = 100  # requests per 10 seconds
OPEN_SHARE = 0.6  # with --won-share 0 about 65 % of the generated deals are open, the rest lost


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


def start_sandbox(vendor: str, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``ledgerbridge sandbox serve VENDOR`` on a free port; returns the process and its URL."""
    proc = subprocess.Popen([sys.executable, "-m", "sync.cli", "sandbox", "serve", vendor, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://"):
        proc.kill()
        raise SystemExit(f"{vendor} sandbox did not start")
    return proc, url


def start_daemon(config: Path, log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """``ledgerbridge daemon -c CONFIG --port 0``; returns the process and its operations URL."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "sync.cli", "daemon", "-c", str(config), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("ops http://"):
        proc.kill()
        raise SystemExit(f"the daemon did not start: {line!r}\n{tail(log_path)}")
    return proc, line.removeprefix("ops ")


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return int(proc.returncode)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------
# The config, the deals, the daemon's metrics
# --------------------------------------------------------------------------------------------------


def write_config(path: Path, *, hubspot_url: str, xero_url: str, refresh_token: str, state_url: str,
                 time_scale: float, interval_minutes: int) -> None:
    crm = {**crm_sandbox_settings("hubspot", hubspot_url, time_scale=time_scale), "client_secret": CLIENT_SECRET}
    ledger = {**ledger_sandbox_settings("xero", xero_url, refresh_token=refresh_token, time_scale=time_scale),
              "tax_types": TAX_TYPES}
    config = {
        "state": {"url": state_url},
        "logging": {"level": "warning", "format": "json"},
        "pipelines": {PIPELINE: {
            "crm": crm,
            "ledger": ledger,
            "items": {"on_unmapped": "default", "default": {"account_code": "706"},
                      "map": {p.sku: {"item_code": p.sku, "account_code": "706"} for p in PRODUCTS}},
            "taxes": {"map": TAX_TYPES},
            "schedule": {"interval_minutes": interval_minutes},
            "ledger_schedule": {"interval_minutes": interval_minutes},
            "metrics": {"enabled": False},
        }},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def won_stages(hubspot_url: str, token: str) -> dict[str, str]:
    """Pipeline id -> the stage that closes a deal as won there (closed, probability 1), read from the API."""
    answer = httpx.get(hubspot_url + "/crm/v3/pipelines/deals", headers={"Authorization": f"Bearer {token}"},
                       timeout=30)
    answer.raise_for_status()
    stages: dict[str, str] = {}
    for pipeline in answer.json()["results"]:
        for stage in pipeline["stages"]:
            meta = stage.get("metadata") or {}
            if meta.get("isClosed") == "true" and float(meta.get("probability") or 0) == 1.0:
                stages.setdefault(pipeline["id"], stage["id"])
    return stages


def scrape(ops_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The daemon's /metrics samples by (name, labels)."""
    text = httpx.get(ops_url + "/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **match: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``match``."""
    want = set(match.items())
    return sum(v for (n, labels), v in samples.items() if n == name and want <= labels)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between order statistics."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


# --------------------------------------------------------------------------------------------------
# Watching Xero
# --------------------------------------------------------------------------------------------------


@dataclass
class Watch:
    """Deals marked won and not yet seen invoiced (deal id -> t0), and the moment each invoice was seen."""

    pending: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)
    polls: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def expect(self, deal_id: str, t0: float) -> None:
        with self.lock:
            self.pending[deal_id] = t0

    def outstanding(self) -> int:
        with self.lock:
            return len(self.pending)


def poll_invoices(xero_url: str, watch: Watch, every_s: float) -> None:
    """Read every Xero invoice each ``every_s`` seconds; note the first sighting of each pending deal's."""
    with httpx.Client(timeout=10) as client:
        while not watch.done.is_set():
            started = time.monotonic()
            try:
                invoices = client.get(xero_url + "/_sandbox/invoices").json()
            except (httpx.HTTPError, ValueError):
                with watch.lock:
                    watch.errors += 1
                invoices = []
            now = time.monotonic()
            with watch.lock:
                watch.polls += 1
                for inv in invoices:
                    if inv.get("Status") in ("DELETED", "VOIDED"):
                        continue
                    deal_id = str(inv.get("Reference") or "").rpartition(":")[2]
                    t0 = watch.pending.pop(deal_id, None)
                    if t0 is not None:
                        watch.seen[deal_id] = now
                        watch.latency[deal_id] = now - t0
            watch.done.wait(max(every_s - (time.monotonic() - started), 0.0))


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def wait_first_runs(ops_url: str, daemon: subprocess.Popen[str], log_path: Path, timeout: float) -> None:
    """Until the daemon's sync and ledger jobs have each finished their run at start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited ({daemon.returncode}) before its first sync\n{tail(log_path)}")
        try:
            samples = scrape(ops_url)
        except httpx.HTTPError:
            samples = {}
        runs = "ledgerbridge_job_runs_total"
        if total(samples, runs, pipeline=PIPELINE, job="sync") >= 1 and \
                total(samples, runs, pipeline=PIPELINE, job="ledger") >= 1:
            if total(samples, runs, pipeline=PIPELINE, job="sync", status="ok") < 1:
                raise SystemExit(f"the first sync did not finish ok\n{tail(log_path)}")
            return
        time.sleep(0.2)
    raise SystemExit(f"no first sync within {timeout:g} s\n{tail(log_path)}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    scale = args.time_scale
    deals = args.deals or math.ceil(args.events / OPEN_SHARE) + 20
    procs: list[subprocess.Popen[str]] = []
    daemon: subprocess.Popen[str] | None = None
    watch = Watch()
    poller: threading.Thread | None = None
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "daemon.log"
        try:
            t_setup = time.monotonic()
            hs_proc, hs_url = start_sandbox("hubspot", "--deals", str(deals), "--won-share", "0", "--lines",
                                            str(args.lines), "--seed", str(args.seed), "--time-scale", str(scale))
            procs.append(hs_proc)
            xero_proc, xero_url = start_sandbox("xero", "--seed", str(args.seed), "--time-scale", str(scale))
            procs.append(xero_proc)

            hs_settings = crm_sandbox_settings("hubspot", hs_url, time_scale=scale)
            stages = won_stages(hs_url, str(hs_settings["access_token"]))
            book = httpx.get(hs_url + "/_sandbox/deals", timeout=60).json()
            open_deals = [d for d in book if not d["closed"] and d["pipeline"] in stages]
            if len(open_deals) < args.events:
                raise SystemExit(f"only {len(open_deals)} open deals in a book of {deals}; raise --deals")
            chosen = open_deals[:args.events]

            refresh = httpx.post(xero_url + "/_sandbox/authorize", timeout=30).json()["refresh_token"]
            state_url = f"sqlite:///{Path(tmp) / 'state.db'}"
            cfg = Path(tmp) / "bench.yaml"
            write_config(cfg, hubspot_url=hs_url, xero_url=xero_url, refresh_token=refresh, state_url=state_url,
                         time_scale=scale, interval_minutes=args.interval)
            daemon, ops_url = start_daemon(cfg, log_path)
            wait_first_runs(ops_url, daemon, log_path, timeout=120)
            setup_s = time.monotonic() - t_setup
            before = scrape(ops_url)

            reg = httpx.post(hs_url + "/_sandbox/webhooks", timeout=10, json={
                "url": f"{ops_url}/webhooks/{PIPELINE}/hubspot", "client_secret": CLIENT_SECRET,
                "properties": ["dealstage"]})
            if reg.status_code != 200:
                raise SystemExit(f"webhook registration refused: {reg.status_code} {reg.text}")

            poller = threading.Thread(target=poll_invoices, args=(xero_url, watch, args.poll), name="xero-poll",
                                      daemon=True)
            poller.start()
            events_started_wall = time.time()
            started = time.monotonic()
            with httpx.Client(timeout=10) as client:
                for i, deal in enumerate(chosen):
                    delay = started + i / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    t0 = time.monotonic()
                    watch.expect(deal["id"], t0)
                    won = client.patch(f"{hs_url}/_sandbox/deals/{deal['id']}",
                                       json={"properties": {"dealstage": stages[deal["pipeline"]]}})
                    if won.status_code != 200:
                        raise SystemExit(f"PATCH of deal {deal['id']} refused: {won.status_code} {won.text}")
            sent_s = time.monotonic() - started
            deadline = time.monotonic() + args.timeout
            while watch.outstanding() and time.monotonic() < deadline:
                time.sleep(0.1)
            events_s = time.monotonic() - started
            watch.done.set()
            poller.join(10)

            after = scrape(ops_url)
            hooks = httpx.get(hs_url + "/_sandbox/webhooks", timeout=10).json()
            xero_stats = httpx.get(xero_url + "/_sandbox/stats", timeout=10).json()
            daemon_exit = stop(daemon, timeout=60)
        finally:
            watch.done.set()
            if daemon is not None:
                stop(daemon, timeout=60)
            for p in procs:
                stop(p)
        with StateStore.open(state_url) as store:
            runs = [r for r in store.recent_runs(limit=100_000, pipeline=PIPELINE)
                    if r.job == "sync" and r.started_at.timestamp() >= events_started_wall]
        daemon_log = tail(log_path) if daemon_exit != 0 else ""

    latencies = [watch.latency[d["id"]] for d in chosen if d["id"] in watch.latency]
    hs_calls = sum(r.api_calls.get("hubspot", 0) for r in runs)
    xero_calls = sum(r.api_calls.get("xero", 0) for r in runs)
    created = [int(r.counts.get("created", 0)) for r in runs]
    xero_per_run = xero_calls / len(runs) if runs else 0.0
    limited = "ledgerbridge_api_rate_limited_total"
    out: dict[str, Any] = {
        "events": args.events, "rate_per_s": args.rate, "time_scale": scale, "deals_in_book": deals,
        "lines_per_deal": args.lines, "poll_s": args.poll,
        "invoiced": len(latencies), "missing": args.events - len(latencies),
        "p50_s": round(percentile(latencies, 0.50), 3), "p95_s": round(percentile(latencies, 0.95), 3),
        "max_s": round(max(latencies), 3) if latencies else None,
        "mean_s": round(sum(latencies) / len(latencies), 3) if latencies else None,
        "min_s": round(min(latencies), 3) if latencies else None,
        "debounce_window_s": DEFAULT_DEBOUNCE_S,
        "sync_runs": len(runs),
        "sync_runs_by_status": {s: sum(1 for r in runs if r.status == s) for s in sorted({r.status for r in runs})},
        "metrics_sync_runs": int(total(after, "ledgerbridge_job_runs_total", pipeline=PIPELINE, job="sync")
                                 - total(before, "ledgerbridge_job_runs_total", pipeline=PIPELINE, job="sync")),
        "invoices_created": sum(created), "max_invoices_per_run": max(created, default=0),
        "hubspot_calls": hs_calls, "xero_calls": xero_calls,
        "xero_calls_per_run": round(xero_per_run, 2),
        "xero_calls_per_min": round(xero_calls / events_s * 60, 1) if events_s else None,
        "xero_limit_per_min": XERO_MIN * scale, "hubspot_limit_per_10s": HUBSPOT_10S * scale,
        "xero_min_run_interval_s": round(xero_per_run * 60 / (XERO_MIN * scale), 2),
        "rate_limited": {v: int(total(after, limited, vendor=v) - total(before, limited, vendor=v))
                         for v in ("hubspot", "xero")},
        "xero_429_served": xero_stats.get("rate_limited"),
        "webhooks": {k: hooks.get(k) for k in ("requests", "delivered_events", "failed_events", "statuses")},
        "sending_s": round(sent_s, 2), "events_phase_s": round(events_s, 2), "setup_s": round(setup_s, 2),
        "xero_polls": watch.polls, "xero_poll_errors": watch.errors,
        "daemon_exit": daemon_exit,
    }
    if daemon_log:
        out["daemon_log_tail"] = daemon_log
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200, help="Deals marked won, one event each")
    ap.add_argument("--rate", type=float, default=1.0, help="Events per second")
    ap.add_argument("--deals", type=int, default=0,
                    help="Deals in the HubSpot book (default: enough open ones for --events)")
    ap.add_argument("--lines", type=int, default=2, help="Line items per deal")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="Virtual seconds per real second of the sandboxes' rate windows (1: the real clock)")
    ap.add_argument("--interval", type=int, default=60,
                    help="Minutes between scheduled runs (long, so that webhooks drive the syncs)")
    ap.add_argument("--poll", type=float, default=0.05, help="Seconds between two reads of Xero's invoices")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="Seconds to wait for the last invoices after the last event")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="Print the results as JSON")
    args = ap.parse_args()
    if args.events < 1 or args.rate <= 0 or args.poll <= 0 or args.time_scale <= 0:
        ap.error("--events, --rate, --poll and --time-scale must be positive")

    out = run(args)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"deal won in HubSpot -> invoice in Xero, through signed webhooks and `ledgerbridge daemon`: "
              f"{args.events} events at {args.rate:g}/s, sandbox clock x{args.time_scale:g}")
        print(f"invoiced {out['invoiced']} of {args.events} ({out['missing']} missing after {args.timeout:g} s)")
        print(f"latency: p50 {out['p50_s']} s   p95 {out['p95_s']} s   max {out['max_s']} s   mean {out['mean_s']} s"
              f"   min {out['min_s']} s   (Xero read every {args.poll * 1000:g} ms)")
        print(f"floor: the debounce window, {out['debounce_window_s']:g} s from the first event of a window "
              f"(an isolated event waits all of it before its sync starts)")
        print(f"sync runs during the events: {out['sync_runs']} {out['sync_runs_by_status']} "
              f"(/metrics: {out['metrics_sync_runs']}); invoices created {out['invoices_created']}, "
              f"at most {out['max_invoices_per_run']} per run")
        print(f"API calls of those runs: HubSpot {out['hubspot_calls']}, Xero {out['xero_calls']} "
              f"({out['xero_calls_per_run']} per run, {out['xero_calls_per_min']}/min over "
              f"{out['events_phase_s']} s)")
        print(f"Xero's limit, {out['xero_limit_per_min']:g} calls/min, allows one run every "
              f"{out['xero_min_run_interval_s']} s at that many calls per run; HubSpot's, "
              f"{out['hubspot_limit_per_10s']:g} requests per 10 s")
        print(f"429 answers received: HubSpot {out['rate_limited']['hubspot']}, Xero {out['rate_limited']['xero']}")
        print(f"webhooks sent by the HubSpot sandbox: {out['webhooks']}")
        print(f"daemon exit code after SIGTERM: {out['daemon_exit']}")
    if out["daemon_exit"] != 0:
        if "daemon_log_tail" in out and not args.json:
            print(out["daemon_log_tail"], file=sys.stderr)
        raise SystemExit(f"the daemon exited {out['daemon_exit']} after SIGTERM (0 expected)")


if __name__ == "__main__":
    main()

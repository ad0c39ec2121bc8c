"""The ``ledgerbridge`` command line.

Exit codes: 0 success, 1 sync errors (a run failed or flagged deals), 2 bad input (config, arguments).
Human output is rich tables on a terminal; ``--json`` prints one JSON document for machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from connectors.errors import ConfigError

app = typer.Typer(
    name="ledgerbridge",
    help="Turn won CRM deals into ledger invoices, exactly once, and bring finance back to the CRM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Configuration helpers.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Vendor API simulators for offline work and tests.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(sandbox_app, name="sandbox")

out = Console(soft_wrap=True)
# soft_wrap: FILE:LINE:COL lines must stay whole for editors and CI, whatever the terminal width.
err = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON")]
PipelineOpt = Annotated[str | None, typer.Option("--pipeline", "-p", help="Only this pipeline")]


def _fail_input(message: str) -> typer.Exit:
    err.print(message, markup=False, highlight=False)
    return typer.Exit(2)


def _load(path: Path) -> Any:
    from config.loader import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise _fail_input(str(exc)) from None


def _dump(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


@app.command()
def validate(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Check a config file; every problem is reported as FILE:LINE:COL: key.path: message."""
    from config.loader import load_config

    try:
        loaded = load_config(config)
    except ConfigError as exc:
        if as_json:
            problems = getattr(exc, "problems", None)
            _dump({"valid": False, "problems": [p.__dict__ for p in problems] if problems else [str(exc)]})
            raise typer.Exit(2) from None
        raise _fail_input(str(exc)) from None
    names = sorted(loaded.app.pipelines)
    if as_json:
        _dump({"valid": True, "pipelines": names})
    else:
        plural = "s" if len(names) != 1 else ""
        out.print(f"{escape(str(config))}: valid ({len(names)} pipeline{plural}: {', '.join(names)})")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of the config file (for editor completion)."""
    from config.loader import config_json_schema

    _dump(config_json_schema())


def _plans_table(title: str, plans: list[Any]) -> Table:
    t = Table(title=title)
    for col in ("deal", "action", "reason", "detail", "total"):
        t.add_column(col)
    for p in plans:
        total = f"{p.invoice.total} {p.invoice.currency}" if p.invoice is not None else ""
        # Details quote CRM and vendor text (company names, error messages): never read it as markup.
        t.add_row(p.deal_id, p.action, p.reason, escape(p.detail), total)
    return t


@app.command()
def plan(config: ConfigOpt, pipeline: PipelineOpt = None, as_json: JsonOpt = False,
         show_all: Annotated[bool, typer.Option("--all", help="Also list deals that need nothing")] = False) -> None:
    """Dry run: what would be created, what would be flagged and why. Writes nothing."""
    from sync.runtime import open_runtime

    loaded = _load(config)
    code = 0
    report: dict[str, Any] = {}
    try:
        with open_runtime(loaded) as rt:
            for name in rt.pipeline_names(pipeline):
                with rt.runner(name) as runner:
                    res = runner.plan()
                shown = [p for p in res.plans if show_all or p.action in ("create", "flag")]
                report[name] = {
                    "status": res.status, "error": res.error, "counts": dict(res.counts),
                    "api_calls": res.api_calls,
                    "deals": [{"deal": p.deal_id, "action": p.action, "reason": p.reason, "detail": p.detail,
                               "total": str(p.invoice.total) if p.invoice else None,
                               "currency": p.invoice.currency if p.invoice else None} for p in shown],
                }
                if not as_json:
                    out.print(_plans_table(f"Plan for pipeline {name}", shown))
                    out.print(", ".join(f"{k}: {v}" for k, v in sorted(res.counts.items())) or "nothing to do")
                    if res.error:
                        err.print(f"{name}: {res.error}", markup=False)
                code = max(code, res.exit_code)
    except ConfigError as exc:
        raise _fail_input(str(exc)) from None
    if as_json:
        _dump(report)
    raise typer.Exit(code)


@app.command()
def run(
    config: ConfigOpt,
    once: Annotated[bool, typer.Option("--once", help="Run each pipeline once, then exit")] = False,
    pipeline: PipelineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Sync each pipeline once (``--once``); scheduling is the daemon's job."""
    if not once:
        raise _fail_input("ledgerbridge run needs --once (use `ledgerbridge daemon` to run on a schedule)")
    from sync.runtime import open_runtime

    loaded = _load(config)
    code = 0
    report: dict[str, Any] = {}
    try:
        with open_runtime(loaded) as rt:
            for name in rt.pipeline_names(pipeline):
                with rt.runner(name) as runner:
                    res = runner.run()
                report[name] = {"run_id": res.run_id, "status": res.status, "counts": dict(res.counts),
                                "api_calls": res.api_calls, "error": res.error}
                if not as_json:
                    _print_run(name, res)
                code = max(code, res.exit_code)
    except ConfigError as exc:
        raise _fail_input(str(exc)) from None
    if as_json:
        _dump(report)
    raise typer.Exit(code)


def _print_run(name: str, res: Any) -> None:
    t = Table(title=f"Run {res.run_id} of pipeline {name}: {res.status}")
    t.add_column("count")
    t.add_column("value", justify="right")
    for k, v in sorted(res.counts.items()):
        t.add_row(k, str(v))
    for vendor, calls in res.api_calls.items():
        t.add_row(f"{vendor} API calls", str(calls))
    out.print(t)
    if res.error:
        err.print(f"{name}: {res.error}", markup=False, highlight=False)


@app.command()
def metrics(
    config: ConfigOpt,
    pipeline: PipelineOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Compute and show; write nothing to the CRM")] = False,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Compute as of this day (YYYY-MM-DD)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pull ledger facts, compute DSO, CLV, CAC, revenue at risk and the forecast, write changes to the CRM."""
    import datetime as dt

    from sync.runtime import open_runtime

    day: dt.date | None = None
    if as_of is not None:
        try:
            day = dt.date.fromisoformat(as_of)
        except ValueError:
            raise _fail_input(f"--as-of: {as_of!r} is not a date (YYYY-MM-DD)") from None
    loaded = _load(config)
    code = 0
    report: dict[str, Any] = {}
    try:
        with open_runtime(loaded) as rt:
            for name in rt.pipeline_names(pipeline):
                if not loaded.app.pipelines[name].metrics.enabled:
                    continue
                res = rt.metrics(name, dry_run=dry_run, as_of=day)
                report[name] = res.to_json()
                if not as_json:
                    from metrics.present import print_report

                    print_report(out, res, rt.store)
                if res.error:
                    err.print(f"{name}: {res.error}", markup=False, highlight=False)
                code = max(code, res.exit_code)
    except ConfigError as exc:
        raise _fail_input(str(exc)) from None
    if as_json:
        _dump(report)
    raise typer.Exit(code)


@app.command()
def status(config: ConfigOpt, pipeline: PipelineOpt = None, limit: int = 10, as_json: JsonOpt = False) -> None:
    """Recent runs with their counts, and the deals flagged for attention."""
    from sync.state import StateStore

    loaded = _load(config)
    if pipeline is not None and pipeline not in loaded.app.pipelines:
        known = ", ".join(sorted(loaded.app.pipelines))
        raise _fail_input(f"{loaded.path}: no pipeline named {pipeline!r} (known: {known})")
    st = loaded.app.state
    store = StateStore.open(st.url, secret_key=st.secret_key.get_secret_value() if st.secret_key else None)
    try:
        runs = store.recent_runs(limit, pipeline)
        flags = {n: store.open_flags(n) for n in (loaded.app.pipelines if pipeline is None else [pipeline])}
    finally:
        store.close()
    if as_json:
        _dump({"runs": [dataclasses.asdict(r) for r in runs],
               "flags": {n: [dataclasses.asdict(f) for f in fl.values()] for n, fl in flags.items()}})
        return
    t = Table(title="Recent runs")
    for col in ("run", "pipeline", "job", "started", "status", "created", "flagged", "error"):
        t.add_column(col)
    for r in runs:
        t.add_row(r.id[:8], r.pipeline, r.job, r.started_at.isoformat(timespec="seconds"), r.status,
                  str(r.counts.get("created", 0)), str(r.counts.get("flagged", 0)), escape((r.error or "")[:80]))
    out.print(t)
    for name, fl in flags.items():
        if fl:
            ft = Table(title=f"Flagged deals in {name}")
            for col in ("deal", "reason", "detail", "since"):
                ft.add_column(col)
            for f in fl.values():
                ft.add_row(f.crm_id, f.reason, escape(f.detail), f.first_seen.isoformat(timespec="seconds"))
            out.print(ft)


@sandbox_app.command("serve")
def sandbox_serve(
    vendor: Annotated[str, typer.Argument(help="hubspot, salesforce, pipedrive, xero, quickbooks or pennylane")],
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port)")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the generated data and of the fault plan")] = 0,
    deals: Annotated[int, typer.Option(help="Deals to generate (CRM sandboxes)")] = 600,
    companies: Annotated[int | None, typer.Option(help="Companies to generate (default: deals / 2)")] = None,
    faults: Annotated[
        str | None, typer.Option(help="Fault plan, e.g. '429=0.05,503=0.05,drop_after_commit=0.2'")
    ] = None,
    time_scale: Annotated[float, typer.Option(help="Virtual seconds per real second for rate windows")] = 1.0,
    won_share: Annotated[float, typer.Option(help="Share of generated deals that are won")] = 0.45,
    lines: Annotated[int | None, typer.Option(help="Line items per deal (default: 1 to 4)")] = None,
    history_years: Annotated[int, typer.Option(
        help="Ledger sandboxes: years of invoices, payments and credit notes of the book's companies")] = 0,
    state: Annotated[Path | None, typer.Option(
        help="Snapshot file: loaded at start when it exists (instead of generating), saved at exit")] = None,
) -> None:
    """Run a vendor simulator on 127.0.0.1 until interrupted. Prints its URL on the first line."""
    from sync.sandboxes import build_sandbox

    try:
        if state is not None and state.exists():
            sandbox = build_sandbox(vendor, seed=seed, deals=0, faults=faults, time_scale=time_scale)
            sandbox.load(state)
        else:
            sandbox = build_sandbox(vendor, seed=seed, deals=deals, companies=companies, faults=faults,
                                    time_scale=time_scale, won_share=won_share, lines_per_deal=lines,
                                    history_years=history_years)
    except ValueError as exc:
        raise _fail_input(f"sandbox serve: {exc}") from None
    except OSError as exc:
        raise _fail_input(f"sandbox serve: cannot read {state}: {exc.strerror}") from None
    from connectors.sandboxkit import serve

    server = serve(sandbox, port=port)
    sys.stdout.write(f"{server.url}\n")
    sys.stdout.flush()
    err.print(f"{vendor} sandbox listening on {server.url} (seed {seed}, clock x{time_scale}); Ctrl-C stops it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    server.stop()
    if state is not None:
        sandbox.save(state)


@app.command()
def demo(
    seed: Annotated[int, typer.Option(help="Seed of the generated company")] = 7,
    workdir: Annotated[Path, typer.Option("--dir", help="Where the demo keeps its state")] = Path(".ledgerbridge"),
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget earlier demo runs first")] = False,
    crm: Annotated[str, typer.Option(help="The simulated CRM: hubspot, salesforce or pipedrive")] = "hubspot",
    ledger: Annotated[str, typer.Option(help="The simulated ledger: xero, quickbooks or pennylane")] = "xero",
    as_json: JsonOpt = False,
) -> None:
    """Run a full sync between an in-process CRM sandbox and a Xero sandbox seeded with a French SME."""
    from sync.demo import run_demo

    code = run_demo(seed=seed, workdir=workdir, fresh=fresh, as_json=as_json, console=out, crm=crm, ledger=ledger)
    raise typer.Exit(code)


@app.command()
def daemon(
    config: ConfigOpt,
    host: Annotated[
        str, typer.Option(help="Address of the operations endpoint (/healthz, /readyz, /metrics, /webhooks/)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the operations endpoint")] = 8080,
    lease_seconds: Annotated[float, typer.Option(
        "--lease-seconds", help="How long a job's lease outlives its replica: a dead replica's jobs move on "
        "to another one within this time")] = 30.0,
    stop_timeout: Annotated[float, typer.Option(
        "--stop-timeout", help="Seconds SIGTERM waits for runs in flight before exiting anyway")] = 30.0,
    reload_interval: Annotated[float, typer.Option(
        "--reload-interval", help="Seconds between checks of the config file for changes (SIGHUP reloads at once)"
    )] = 5.0,
    workers: Annotated[int, typer.Option(help="Jobs run at the same time by this replica")] = 8,
    public_url: Annotated[str | None, typer.Option(
        "--public-url", help="Scheme, host and path prefix the vendors call for /webhooks/ when a proxy stands "
        "in front of the daemon (e.g. https://hooks.example.com); HubSpot signs the full URL")] = None,
) -> None:
    """Run every enabled pipeline's jobs (sync, ledger, metrics) on their schedules until SIGTERM or SIGINT.

    Webhooks (HubSpot, Pipedrive, Xero) are received on /webhooks/<pipeline>/<vendor> of the operations
    endpoint for the pipelines whose webhook secret is configured; each verified event runs the job soon.
    """
    from sync.daemon import Daemon, DaemonOptions, run_daemon
    from sync.webhooks import WebhookReceiver

    loaded = _load(config)
    try:
        options = DaemonOptions(host=host, port=port, lease_s=lease_seconds, stop_timeout_s=stop_timeout,
                                reload_interval_s=reload_interval, workers=workers)
    except ConfigError as exc:
        raise _fail_input(str(exc)) from None

    def receiver(d: Daemon) -> WebhookReceiver:
        def trigger(pipeline: str, job: str) -> None:
            d.trigger(pipeline, job)

        return WebhookReceiver(d.config, d.rt.store, trigger, public_url=public_url)

    try:
        code = run_daemon(loaded, options, webhooks=receiver)
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command("rotate-keys")
def rotate_keys(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """Re-encrypt every stored OAuth token with the newest state key (the first of state.secret_key)."""
    from sync.crypto import TokenDecryptionError, load_or_create_key_file, rotate_stored_tokens
    from sync.daemon import sqlite_database
    from sync.state import StateStore

    loaded = _load(config)
    st = loaded.app.state
    if st.secret_key is not None:
        key = st.secret_key.get_secret_value()
    else:
        db = sqlite_database(st.url)
        if db is None:
            raise _fail_input(f"{loaded.path}: state.secret_key is needed to rotate keys")
        key = load_or_create_key_file(db.with_name(db.name + ".key"))
    store = StateStore.open(st.url, secret_key=key)
    try:
        report = rotate_stored_tokens(store, key)
    except TokenDecryptionError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(1) from None
    finally:
        store.close()
    if as_json:
        _dump(dataclasses.asdict(report))
    else:
        out.print(f"{report.rotated} of {report.tokens} stored token(s) re-encrypted with the newest of "
                  f"{report.keys} key(s)")


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""One metrics run of a pipeline: pull the ledger, load the facts, compute, write back.

1. Pull the ledger's invoices, credit notes and payments changed since the last pull (:mod:`sync.ledgerpull`).
2. Read acquisition spend (the CSV and the mapped expense accounts) and the sales activities on won deals.
3. Load the facts in the home currency (:mod:`metrics.load`) and compute every metric (:mod:`metrics.compute`).
4. Keep this month's weighted forecast as its snapshot (the base of forecast accuracy later).
5. Write the changed values to the CRM: customer metrics, and each deal's invoice status
   (:mod:`metrics.writeback`). ``dry_run`` computes and reports what would be written, and writes nothing
   to the CRM (the ledger pull still updates the local facts).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from config.schema import MetricsConfig
from connectors.errors import ConfigError, ConnectorError, ReauthorizationRequired
from connectors.interfaces import CrmSource, Ledger
from metrics.compute import MetricsResult, compute
from metrics.facts import ActivityFact, SpendFact
from metrics.load import Rates, expense_spend, load_facts, read_spend_csv
from metrics.writeback import CUSTOMER_FIELDS, DEAL_FIELDS, WriteBackResult, write_back
from sync.factstore import FactStore
from sync.ledgerpull import LedgerPull, PullResult
from sync.state import StateStore

__all__ = ["MetricsReport", "deal_status_records", "run_metrics"]

log = structlog.get_logger("ledgerbridge.metrics")

#: How far back ledger expense accounts are read for CAC.
SPEND_WINDOW_DAYS = 3 * 366


@dataclass
class MetricsReport:
    pipeline: str
    as_of: dt.date
    dry_run: bool
    status: str = "ok"
    currency: str = ""
    result: MetricsResult | None = None
    pull: PullResult | None = None
    customers: WriteBackResult = field(default_factory=WriteBackResult)
    deals: WriteBackResult = field(default_factory=WriteBackResult)
    api_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    #: The vendor refused a connection's authorisation for good: a person must authorise it again.
    needs_authorisation: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline, "as_of": self.as_of.isoformat(), "dry_run": self.dry_run,
            "status": self.status, "error": self.error, "currency": self.currency,
            "ledger_pull": None if self.pull is None else {"status": self.pull.status, "counts": self.pull.counts},
            "write_back": {
                "customers": _wb_json(self.customers), "deals": _wb_json(self.deals),
            },
            "api_calls": self.api_calls, "seconds": round(self.seconds, 2),
            "metrics": None if self.result is None else self.result.to_json(),
        }


def _wb_json(w: WriteBackResult) -> dict[str, Any]:
    return {"values_changed": w.values_changed, "records_changed": w.records_changed,
            "values_written": w.values_written, "records_failed": w.records_failed,
            "write_calls": w.write_calls, "errors": w.errors}


def run_metrics(
    name: str,
    config: MetricsConfig,
    crm: CrmSource,
    ledger: Ledger,
    store: StateStore,
    *,
    config_dir: Path | None = None,
    as_of: dt.date | None = None,
    dry_run: bool = False,
    pull: bool = True,
    stop: Callable[[], bool] | None = None,
) -> MetricsReport:
    """Run the metrics of pipeline ``name``. Vendor problems end in the report (status ``failed``);
    configuration problems (a bad spend CSV, a missing exchange rate) raise :class:`ConfigError`.

    ``stop`` (a shutdown) is asked between the ledger pull's chunks, before the computation, and between
    write-back chunks; a stopped run ends ``partial`` with what it did recorded."""
    started = time.monotonic()
    day = as_of or dt.datetime.now(dt.UTC).date()
    report = MetricsReport(pipeline=name, as_of=day, dry_run=dry_run)
    crm_before, ledger_before = crm.stats.calls, ledger.stats.calls
    run_id = store.start_run(name, job="metrics")
    facts_store = FactStore(store)
    try:
        if pull:
            report.pull = LedgerPull(name, ledger, store, stop=stop).run()
            report.needs_authorisation = report.pull.needs_authorisation
            if report.pull.status != "ok":
                if stop is not None and stop():
                    raise _Stopped("during the ledger pull")
                raise _Failed(f"ledger pull failed: {report.pull.error}")
        if stop is not None and stop():
            raise _Stopped("before the computation")
        home = config.currency or ledger.base_currency()
        report.currency = home
        rates = Rates(home, config.fx_rates, facts_store.ledger_invoices(name))
        spend = _spend(config, ledger, rates, day, config_dir)
        activities = _activities(crm, facts_store, name)
        facts = load_facts(store, name, config, as_of=day, home_currency=home, spend=spend, activities=activities)
        result = compute(facts, config, snapshots=facts_store.forecast_snapshots(name))
        report.result = result
        month = day.strftime("%Y-%m")
        current = result.forecast_by_month().get(month)
        if current is not None and not dry_run:
            facts_store.snapshot_forecast(name, home, {month: current})
        if config.write_back:
            customers = {cid: result.customer_values(cid) for cid in result.customers if not cid.startswith("ledger:")}
            if stop is not None and stop():
                raise _Stopped("before the write-back")
            report.customers = write_back(crm, facts_store, name, "customer", CUSTOMER_FIELDS, customers,
                                          currency=home, fields=config.fields, dry_run=dry_run, stop=stop)
            if report.customers.stopped or (stop is not None and stop()):
                raise _Stopped("during the write-back")
            deals = deal_status_records(store, facts_store, name, day)
            report.deals = write_back(crm, facts_store, name, "deal", DEAL_FIELDS, deals, currency=home,
                                      fields=config.fields, dry_run=dry_run, stop=stop)
            if report.deals.stopped:
                raise _Stopped("during the write-back")
            if report.customers.records_failed or report.deals.records_failed:
                report.status = "partial"
                report.error = "; ".join((report.customers.errors + report.deals.errors)[:5])
    except ConfigError:
        store.finish_run(run_id, "failed", {}, {}, "configuration error")
        raise
    except _Stopped as exc:
        report.status = "partial"
        report.error = f"stopped for shutdown {exc}; the next run writes what is left"
        log.info("metrics run stopped for shutdown", pipeline=name, at=str(exc))
    except (ConnectorError, _Failed) as exc:
        report.status = "failed"
        report.error = str(exc)
        report.needs_authorisation = report.needs_authorisation or isinstance(exc, ReauthorizationRequired)
        log.error("metrics run failed", pipeline=name, error=str(exc))
    report.api_calls = {crm.vendor: crm.stats.calls - crm_before, ledger.vendor: ledger.stats.calls - ledger_before}
    report.seconds = time.monotonic() - started
    counts = {
        "customers": len(report.result.customers) if report.result else 0,
        "values_written": report.customers.values_written + report.deals.values_written,
        "values_changed": report.customers.values_changed + report.deals.values_changed,
        "records_failed": report.customers.records_failed + report.deals.records_failed,
    }
    store.finish_run(run_id, report.status, counts, report.api_calls, report.error)
    return report


class _Failed(Exception):
    pass


class _Stopped(Exception):
    pass


def _spend(config: MetricsConfig, ledger: Ledger, rates: Rates, day: dt.date,
           config_dir: Path | None) -> list[SpendFact]:
    src = config.spend
    out: list[SpendFact] = []
    if src.csv:
        path = Path(src.csv)
        if not path.is_absolute() and config_dir is not None:
            path = config_dir / path
        out += read_spend_csv(path, rates, src.overhead_channels)
    if src.expense_accounts:
        lines = ledger.list_expenses(sorted(src.expense_accounts), day - dt.timedelta(days=SPEND_WINDOW_DAYS), day)
        out += expense_spend(lines, src.expense_accounts, rates, src.overhead_channels)
    return out


def _activities(crm: CrmSource, facts: FactStore, name: str) -> list[ActivityFact]:
    won = [d.deal_id for d in facts.crm_deals(name) if d.is_won and not d.archived]
    if not won:
        return []
    counts = crm.activity_counts(won)
    return [ActivityFact(deal_id=deal_id, kind=kind, count=n)
            for deal_id, by_kind in sorted(counts.items()) for kind, n in sorted(by_kind.items()) if n]


def deal_status_records(store: StateStore, facts: FactStore, name: str, day: dt.date) -> dict[str, dict[str, Any]]:
    """Each invoiced or flagged deal's sync status: its invoice (number, link, status, amounts, days
    overdue as of ``day``), when the sync last recorded it, and the open problem that holds it, if any."""
    invoices = {row.ledger_id: row for row in facts.ledger_invoices(name)}
    flags = store.open_flags(name)
    out: dict[str, dict[str, Any]] = {}
    for deal_id, link in store.links(name, "deal").items():
        row = invoices.get(link.ledger_id)
        values: dict[str, Any] = {"invoice_number": link.ledger_number or link.ledger_id,
                                  "last_synced_at": link.updated_at}
        if row is not None:
            due = row.amount_due if row.amount_due is not None else row.total
            paid = row.amount_paid if row.amount_paid is not None else row.total - due
            overdue = 0
            if row.status in ("authorised", "submitted") and due > 0 and row.due_date and row.due_date < day:
                overdue = (day - row.due_date).days
            values.update(invoice_number=row.number or link.ledger_number or link.ledger_id, invoice_url=row.url,
                          invoice_status=row.status, amount_invoiced=row.total, amount_paid=paid,
                          balance_due=Decimal(0) if row.status in ("voided", "deleted") else due,
                          days_overdue=overdue)
        flag = flags.get(deal_id)
        values["sync_error"] = f"{flag.reason}: {flag.detail}" if flag is not None else None
        out[deal_id] = values
    for deal_id, flag in flags.items():
        if deal_id not in out:
            out[deal_id] = {"sync_error": f"{flag.reason}: {flag.detail}"}
    return out


def summary_rows(result: MetricsResult, key: str, limit: int = 5) -> list[dict[str, Any]]:
    """The top ``limit`` customers by ``key`` (for the CLI and the demo), largest first."""
    rows = []
    for cid, cm in result.customers.items():
        value = getattr(cm, key, None)
        if value is not None and not cid.startswith("ledger:"):
            rows.append({"customer_id": cid, key: value, "metrics": cm})
    rows.sort(key=lambda r: (-Decimal(str(r[key])), r["customer_id"]))
    return rows[:limit]

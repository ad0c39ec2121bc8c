"""Human-readable output of a metrics run: company figures, top customers, what was written."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rich.console import Console
from rich.table import Table

from metrics.run import MetricsReport, summary_rows
from sync.factstore import FactStore
from sync.state import StateStore

__all__ = ["customer_names", "print_report", "top_tables"]


def customer_names(store: StateStore, pipeline: str) -> dict[str, str]:
    return {c.customer_id: c.name for c in FactStore(store).crm_customers(pipeline)}


def _fmt(value: Any, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value:,.2f}{suffix}"
    if isinstance(value, float):
        return f"{value:,.3f}{suffix}"
    return f"{value}{suffix}"


def top_tables(report: MetricsReport, names: dict[str, str], limit: int = 5) -> list[Table]:
    """Top customers by predicted CLV and by revenue at risk."""
    result = report.result
    if result is None:
        return []
    cur = report.currency
    clv = Table(title=f"{report.pipeline}: top customers by CLV ({cur})")
    for col in ("customer", "CLV to date", "CLV expected", "P(alive)", "CAC", "days to pay"):
        clv.add_column(col, justify="left" if col == "customer" else "right")
    key = "clv_predicted" if any(getattr(c, "clv_predicted", None) is not None for c in result.customers.values()) \
        else "clv_historical"
    for row in summary_rows(result, key, limit):
        cm = row["metrics"]
        clv.add_row(names.get(row["customer_id"], row["customer_id"]), _fmt(cm.clv_historical), _fmt(cm.clv_predicted),
                    _fmt(cm.p_alive), _fmt(cm.cac_blended), _fmt(cm.days_to_pay_weighted))
    risk = Table(title=f"{report.pipeline}: top customers by revenue at risk ({cur})")
    for col in ("customer", "revenue at risk", "churn", "overdue", "signals"):
        risk.add_column(col, justify="left" if col in ("customer", "signals") else "right")
    for row in summary_rows(result, "revenue_at_risk", limit):
        cm = row["metrics"]
        risk.add_row(names.get(row["customer_id"], row["customer_id"]), _fmt(cm.revenue_at_risk),
                     _fmt(cm.churn_probability), _fmt(cm.overdue_amount),
                     # the signals' names; their figures are on the CRM field and in --json
                     ", ".join(s.split(":")[0] for s in cm.risk_signals) or "-")
    return [clv, risk]


def print_report(console: Console, report: MetricsReport, store: StateStore) -> None:
    result = report.result
    t = Table(title=f"Metrics of pipeline {report.pipeline} as of {report.as_of} ({report.status})")
    t.add_column("figure")
    t.add_column("value", justify="right")
    if result is not None:
        for label, value in result.headline():
            t.add_row(label, value)
    for what, wb in (("customer", report.customers), ("deal", report.deals)):
        verb = "would write" if report.dry_run else "written"
        t.add_row(f"{what} values changed ({verb})", f"{wb.values_changed} ({wb.values_written} written)")
        if wb.records_failed:
            t.add_row(f"{what} records rejected by the CRM", str(wb.records_failed))
    for vendor, calls in report.api_calls.items():
        t.add_row(f"{vendor} API calls", str(calls))
    console.print(t)
    for table in top_tables(report, customer_names(store, report.pipeline)):
        console.print(table)

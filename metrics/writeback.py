"""Writing finance values back to CRM records: customers (metrics) and deals (their invoice's status).

Every value is absolute (a balance, not a change in balance) and written as text in a canonical form:
money rounded to the home currency, days to one decimal, probabilities and ratios to three. A write-back
compares each value with the one last written to the same record and field (kept in the state store) and
sends only those that differ, through the connector's batch update; a run where nothing changed writes
nothing and does not even check the fields exist. A value that becomes undefined is cleared (written
empty) once. A record the CRM rejects keeps its old recorded value, so it is retried on the next run.

Field names are neutral (``ledgerbridge_balance_due``); each connector turns them into its own
(Salesforce ``ledgerbridge_balance_due__c``, Pipedrive's generated keys) and creates missing fields with
:meth:`~connectors.interfaces.CrmSource.ensure_fields`. The pipeline's ``metrics.fields`` renames them.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal

from config.schema import MetricsFields
from connectors.domain import round_money
from connectors.interfaces import CrmSource, FieldSpec, FieldUpdate
from sync.factstore import FactStore

__all__ = ["CUSTOMER_FIELDS", "DEAL_FIELDS", "FieldDef", "WriteBackResult", "canonical", "field_specs", "write_back"]

Kind = Literal["money", "days", "ratio", "count", "text", "date", "datetime", "months"]
ObjectType = Literal["deal", "customer"]


@dataclass(frozen=True)
class FieldDef:
    key: str
    label: str
    type: Literal["string", "number", "date", "datetime", "enumeration", "bool"]
    kind: Kind
    options: tuple[str, ...] = ()

    @property
    def default_name(self) -> str:
        return f"ledgerbridge_{self.key}"


#: Customer (company / account / organization) fields, by metric.
CUSTOMER_FIELDS: tuple[FieldDef, ...] = (
    FieldDef("clv_historical", "CLV to date (net invoiced)", "number", "money"),
    FieldDef("clv_predicted", "CLV, expected over the horizon", "number", "money"),
    FieldDef("p_alive", "Probability still active", "number", "ratio"),
    FieldDef("expected_purchases_90d", "Expected purchases, next 90 days", "number", "ratio"),
    FieldDef("cac_blended", "CAC (blended)", "number", "money"),
    FieldDef("cac_paid", "CAC (paid channels)", "number", "money"),
    FieldDef("clv_cac_ratio", "CLV / CAC", "number", "ratio"),
    FieldDef("cac_payback_months", "CAC payback (months)", "number", "count"),
    FieldDef("days_to_pay_weighted", "DSO: average days to pay (amount-weighted)", "number", "days"),
    FieldDef("days_beyond_terms_weighted", "Average days beyond terms (amount-weighted)", "number", "days"),
    FieldDef("open_ar_age_weighted", "Age of open invoices, days (amount-weighted)", "number", "days"),
    FieldDef("balance_due", "Balance due", "number", "money"),
    FieldDef("overdue_amount", "Overdue amount", "number", "money"),
    FieldDef("revenue_at_risk", "Revenue at risk", "number", "money"),
    FieldDef("risk_signals", "Risk signals", "string", "text"),
    FieldDef("last_invoice_date", "Last invoice date", "date", "date"),
)

#: Records written between two checks of the stop flag, each chunk recorded once written: 1,000 is a
#: multiple of every CRM's batch size (HubSpot 100, Salesforce 200, Pipedrive one record a call).
WRITE_CHUNK = 1000

INVOICE_STATUSES = ("draft", "submitted", "authorised", "paid", "voided", "deleted")

#: Deal fields: the sync status of the deal's invoice.
DEAL_FIELDS: tuple[FieldDef, ...] = (
    FieldDef("invoice_number", "Invoice number", "string", "text"),
    FieldDef("invoice_url", "Invoice link", "string", "text"),
    FieldDef("invoice_status", "Invoice status", "enumeration", "text", INVOICE_STATUSES),
    FieldDef("amount_invoiced", "Amount invoiced (incl. tax)", "number", "money"),
    FieldDef("amount_paid", "Amount paid", "number", "money"),
    FieldDef("balance_due", "Balance due", "number", "money"),
    FieldDef("days_overdue", "Days overdue", "number", "count"),
    FieldDef("last_synced_at", "Last synced to the ledger", "datetime", "datetime"),
    FieldDef("sync_error", "Last sync error", "string", "text"),
)


def canonical(value: Any, kind: Kind, currency: str) -> str | None:
    """``value`` as the text written to the CRM (None stays None: undefined)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "; ".join(str(v) for v in value) or None
    if isinstance(value, str):
        return value[:1000] if value else None
    if isinstance(value, float):
        value = Decimal(repr(value))
    if isinstance(value, int):
        value = Decimal(value)
    if not isinstance(value, Decimal):
        raise TypeError(f"cannot write a {type(value).__name__} to a CRM field")
    if not value.is_finite():
        return None
    if kind == "money":
        q = round_money(value, currency)
    elif kind == "days":
        q = value.quantize(Decimal("0.1"))
    elif kind == "ratio":
        q = value.quantize(Decimal("0.001"))
    else:
        q = value.quantize(Decimal("0.1")) if kind == "months" else value.quantize(Decimal(1))
    return format(q, "f")


def field_specs(defs: Sequence[FieldDef], names: Mapping[str, str]) -> list[FieldSpec]:
    return [FieldSpec(name=names.get(d.key, d.default_name), label=d.label, type=d.type, options=d.options)
            for d in defs]


@dataclass
class WriteBackResult:
    """What a write-back did (or, in a dry run, would do)."""

    values_changed: int = 0
    records_changed: int = 0
    values_written: int = 0
    records_failed: int = 0
    errors: list[str] = field(default_factory=list)
    write_calls: int = 0
    #: The write-back ended early for a shutdown; what was written is recorded, the rest goes next run.
    stopped: bool = False


def desired_values(defs: Sequence[FieldDef], records: Mapping[str, Mapping[str, Any]], names: Mapping[str, str],
                   currency: str) -> dict[tuple[str, str], str | None]:
    """(record id, field name) -> canonical text of every value to hold."""
    out: dict[tuple[str, str], str | None] = {}
    for record_id, values in records.items():
        for d in defs:
            out[(record_id, names.get(d.key, d.default_name))] = canonical(values.get(d.key), d.kind, currency)
    return out


def changes(desired: Mapping[tuple[str, str], str | None],
            written: Mapping[tuple[str, str], str | None]) -> dict[tuple[str, str], str | None]:
    """The values that differ from what was last written. A value never written and undefined is no change."""
    out = {}
    for key, value in desired.items():
        if key in written:
            if written[key] != value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def write_back(
    crm: CrmSource,
    facts: FactStore,
    pipeline: str,
    object_type: ObjectType,
    defs: Sequence[FieldDef],
    records: Mapping[str, Mapping[str, Any]],
    *,
    currency: str,
    fields: MetricsFields,
    dry_run: bool = False,
    stop: Callable[[], bool] | None = None,
) -> WriteBackResult:
    """Write the changed values of ``records`` ({CRM record id: {metric key: value}}) to the CRM.

    Records go in chunks of ``WRITE_CHUNK`` (a multiple of every CRM's batch size, so no call is wasted),
    each chunk's accepted values recorded before the next is sent; ``stop`` is asked between chunks.
    """
    names = fields.customer if object_type == "customer" else fields.deal
    desired = desired_values(defs, records, names, currency)
    diff = changes(desired, facts.written_values(pipeline, object_type))
    by_record: dict[str, dict[str, str | None]] = {}
    for (record_id, name), value in diff.items():
        by_record.setdefault(record_id, {})[name] = value
    result = WriteBackResult(values_changed=len(diff), records_changed=len(by_record))
    if dry_run or not by_record:
        return result
    crm.ensure_fields(object_type, field_specs(defs, names))
    calls_before = crm.stats.calls
    updates = [FieldUpdate(object_id=rid, values={k: ("" if v is None else v) for k, v in vals.items()})
               for rid, vals in sorted(by_record.items())]
    try:
        for start in range(0, len(updates), WRITE_CHUNK):
            if start and stop is not None and stop():
                result.stopped = True
                break
            done: dict[tuple[str, str], str | None] = {}
            for res in crm.write_fields(object_type, updates[start:start + WRITE_CHUNK]):
                if res.ok:
                    for name, value in by_record[res.object_id].items():
                        done[(res.object_id, name)] = value
                else:
                    result.records_failed += 1
                    if len(result.errors) < 20:
                        result.errors.append(f"{object_type} {res.object_id}: {res.error}")
            facts.record_written(pipeline, object_type, done)
            result.values_written += len(done)
    finally:
        result.write_calls = crm.stats.calls - calls_before
    return result

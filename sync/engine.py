"""The sync engine: pull, plan, apply, record, for one pipeline.

One run of a pipeline:

1. **Recover.** Intents left open by an earlier run (a crash, an unanswered write) are resolved by
   looking their references up in the ledger *before* anything could create again. Found ones are
   adopted; the rest are re-sent later with the same key when the same batch is rebuilt.
2. **Rebuild.** When the state store knows nothing of the pipeline (first run, or a lost database), the
   ledger's invoices carrying this pipeline's references are adopted as links.
3. **Pull** changed deals page by page since the stored cursor, capped at the run's start; deals that
   were flagged or left pending are re-read by id first.
4. **Plan** each deal: create, already invoiced, or flagged with a reason.
5. **Apply** per batch: intents committed, one ledger call with a deterministic idempotency key, then
   links, intent states and (after a page's last batch) the cursor in one transaction.
6. **Record** the run with its counts and API calls.

A cursor never moves past a deal whose invoice is not durably recorded (created, or flagged for a
person to look at).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import queue
import threading
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import structlog

from config.schema import Pipeline
from connectors.domain import Deal, Invoice
from connectors.errors import (
    AmbiguousWriteError,
    AuthError,
    ConnectorError,
    QuotaExhaustedError,
    ReauthorizationRequired,
)
from connectors.interfaces import (
    CrmSource,
    DealPage,
    InvoiceRequest,
    Ledger,
    LedgerCustomer,
)
from sync.factstore import FactStore
from sync.reconcile import (
    CustomerIndex,
    DealProblem,
    batch_key,
    build_invoice,
    customer_number,
    deal_from_reference,
    fingerprint,
    intent_key,
)
from sync.state import AuditData, Confirmed, Failed, IntentData, LinkData, StateStore

__all__ = ["DealPlan", "PipelineRunner", "RunResult"]

log = structlog.get_logger("ledgerbridge.engine")

STREAM = "deals"
T = TypeVar("T")


@dataclass
class DealPlan:
    """What the engine would do (or did) with one deal."""

    deal_id: str
    action: Literal["create", "already_invoiced", "flag", "skip"]
    reason: str = ""
    detail: str = ""
    invoice: Invoice | None = None
    customer_id: str | None = None
    deal: Deal | None = None


@dataclass
class RunResult:
    run_id: str | None
    pipeline: str
    status: Literal["ok", "partial", "failed"]
    counts: Counter[str] = field(default_factory=Counter)
    api_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    plans: list[DealPlan] = field(default_factory=list)
    #: The vendor refused the connection's authorisation for good: a person must authorise it again.
    needs_authorisation: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1


class StopRun(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


Progress = Callable[[str, int], None]


class PipelineRunner:
    """Runs one pipeline: a CRM source feeding a ledger, with its state in ``store``."""

    def __init__(
        self,
        name: str,
        pipeline: Pipeline,
        crm: CrmSource,
        ledger: Ledger,
        store: StateStore,
        *,
        now: Callable[[], dt.datetime] | None = None,
        progress: Progress | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.name = name
        #: Asked after each page: True ends the run there (a shutdown), the cursor standing after that page.
        self.stop = stop
        self.pipeline = pipeline
        self.crm = crm
        self.ledger = ledger
        self.store = store
        self.facts = FactStore(store)
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self.progress = progress
        self._directory: CustomerIndex | None = None
        self.run_id: str | None = None
        self._hold: set[str] = set()
        # Deals handled in this run, with the version handled: a deal re-checked first (flagged, pending)
        # comes again in the changed pages and is not handled twice unless it changed in between.
        self._seen: dict[str, dt.datetime] = {}

    # ------------------------------------------------------------------------------------------------
    # public entry points
    # ------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """One incremental sync. Never raises for vendor or data problems: they end up in the result."""
        started = self._now()
        # The connectors' counters live as long as the connectors: report this run's share only.
        base = self._api_counters()
        self._seen = {}
        self._directory = None  # the ledger's customers as they are now, not as an earlier run saw them
        self._hold = set()
        self.run_id = self.store.start_run(self.name)
        structlog.contextvars.bind_contextvars(run_id=self.run_id, pipeline=self.name)
        result = RunResult(self.run_id, self.name, "ok")
        counts = result.counts
        try:
            self._recover(counts)
            if not self.store.has_any_state(self.name):
                self._rebuild(counts)
            with closing(self._pages(started)) as pages_left:
                for pages, (page_deals, cursor) in enumerate(pages_left, start=1):
                    self._process_page(page_deals, cursor, counts, result)
                    # On a stop request, the page already being fetched tells whether anything was left.
                    if self.stop is not None and self.stop() and next(pages_left, None) is not None:
                        result.status = "partial"
                        result.error = f"stopped for shutdown after {pages} page(s); the next run goes on from there"
                        log.info("run stopped for shutdown after a page", pages=pages)
                        break
        except StopRun as exc:
            result.status = "failed"
            result.error = exc.message
        except (QuotaExhaustedError, AuthError) as exc:
            result.status = "failed"
            result.error = str(exc)
            result.needs_authorisation = isinstance(exc, ReauthorizationRequired)
        except AmbiguousWriteError as exc:
            result.status = "failed"
            result.error = f"unanswered write, will be resolved by lookup on the next run: {exc}"
        except ConnectorError as exc:
            result.status = "failed"
            result.error = str(exc)
        if result.status == "ok" and (counts["flagged"] or counts["failed"]):
            result.status = "partial"
        spent = {k: v - base[k] for k, v in self._api_counters().items()}
        result.api_calls = {self.crm.vendor: spent["crm_calls"], self.ledger.vendor: spent["ledger_calls"]}
        self.store.finish_run(self.run_id, result.status, dict(counts), result.api_calls, result.error)
        log.info(
            "run finished",
            status=result.status,
            error=result.error,
            **dict(sorted(counts.items())),
            **{f"{k}_calls": v for k, v in result.api_calls.items()},
            crm_retries=spent["crm_retries"],
            ledger_retries=spent["ledger_retries"],
            seconds=round((self._now() - started).total_seconds(), 3),
        )
        structlog.contextvars.unbind_contextvars("run_id", "pipeline")
        return result

    def plan(self) -> RunResult:
        """Dry run: what the next run would create, skip or flag, with reasons. Writes nothing."""
        started = self._now()
        base = self._api_counters()
        result = RunResult(None, self.name, "ok")
        pending = {i.crm_id for i in self.store.open_intents(self.name, "invoice")}
        # A deal re-checked first (flagged, pending) may come again in the changed pages: one plan per deal,
        # made from its latest version.
        planned: dict[str, DealPlan] = {}
        seen: dict[str, dt.datetime] = {}
        try:
            # Without state the run first adopts the ledger's invoices by reference: so does the plan.
            adoptable = {} if self.store.has_any_state(self.name) else {
                lk.crm_id: lk for lk in self._ledger_links()}
            for deals, _cursor in self._pages(started):
                links: dict[str, Any] = {d.crm_id: adoptable[d.crm_id] for d in deals if d.crm_id in adoptable}
                links.update(self.store.links(self.name, "deal", [d.crm_id for d in deals]))
                for deal in deals:
                    if deal.crm_id in seen and deal.updated_at <= seen[deal.crm_id]:
                        continue
                    seen[deal.crm_id] = deal.updated_at
                    p = self._plan_deal(deal, links)
                    if p.action == "already_invoiced" and deal.crm_id in adoptable:
                        found = adoptable[deal.crm_id]
                        p.detail = (f"invoice {found.ledger_number or found.ledger_id} found in the ledger by "
                                    "reference; it will be adopted")
                    if p.action == "create" and deal.crm_id in pending:
                        p.detail = "an earlier write is unresolved; the ledger is checked first"
                    if p.action == "create" and deal.customer is not None:
                        cust, how = self._resolve_customer_readonly(deal)
                        p.customer_id = cust
                        if cust is None and not self.pipeline.customers.create_missing:
                            p.action, p.reason = "flag", "customer_unmatched"
                            p.detail = (f"deal {deal.crm_id}: no ledger customer matches company "
                                        f"{deal.customer.crm_id} ({deal.customer.name}) and creating customers is off")
                        else:
                            p.detail = p.detail or (f"customer matched by {how}" if cust
                                                    else "customer will be created")
                    planned.pop(deal.crm_id, None)
                    planned[deal.crm_id] = p
        except ConnectorError as exc:
            result.status = "failed"
            result.error = str(exc)
        result.plans = list(planned.values())
        result.counts.update(p.action for p in result.plans)
        if result.status == "ok" and result.counts["flag"]:
            result.status = "partial"
        result.api_calls = {self.crm.vendor: self.crm.stats.calls - base["crm_calls"],
                            self.ledger.vendor: self.ledger.stats.calls - base["ledger_calls"]}
        return result

    def _api_counters(self) -> dict[str, int]:
        return {"crm_calls": self.crm.stats.calls, "ledger_calls": self.ledger.stats.calls,
                "crm_retries": self.crm.stats.retries, "ledger_retries": self.ledger.stats.retries}

    # ------------------------------------------------------------------------------------------------
    # recovery and rebuild
    # ------------------------------------------------------------------------------------------------
    def _recover(self, counts: Counter[str]) -> None:
        """Resolve intents an earlier run left open, by looking their references up in the ledger."""
        open_customers = self.store.open_intents(self.name, "customer")
        if open_customers:
            found = self.ledger.find_customers_by_number([i.reference for i in open_customers])
            rows = []
            for it in open_customers:
                lc = found.get(it.reference)
                if lc is not None:
                    rows.append(LinkData(kind="customer", crm_id=it.crm_id, ledger_id=lc.ledger_id,
                                         ledger_number=lc.number, reference=it.reference, fingerprint="",
                                         revision=it.revision))
            if rows:
                self.store.save_links(self.name, "customer", rows)
                self.store.mark_intents([i.idempotency_key for i in open_customers
                                         if i.reference in found], "confirmed")
                counts["customers_adopted"] += len(rows)
        open_invoices = self.store.open_intents(self.name, "invoice")
        if not open_invoices:
            return
        by_ref = {i.reference: i for i in open_invoices}
        found_inv = self.ledger.find_invoices_by_reference(list(by_ref))
        confirmed = []
        audits = []
        for ref, inv in found_inv.items():
            pending = by_ref.get(ref)
            if pending is None or inv.ledger_id is None:
                continue
            confirmed.append(Confirmed(key=pending.idempotency_key, crm_id=pending.crm_id, ledger_id=inv.ledger_id,
                                       ledger_number=inv.number, reference=ref,
                                       fingerprint=pending.request_fingerprint, revision=pending.revision))
            audits.append(AuditData(pipeline=self.name, run_id=self.run_id, action="intent.adopted",
                                    object_kind="deal", object_id=pending.crm_id, location="ledger",
                                    before={"state": pending.state},
                                    after={"ledger_id": inv.ledger_id, "number": inv.number}))
        if confirmed:
            self.store.record_outcomes(self.name, self.run_id or "", confirmed=confirmed, failed=[], audits=audits)
            counts["adopted"] += len(confirmed)
            log.info("adopted invoices found by reference", count=len(confirmed))
        if not self.ledger.idempotent_creates:
            # Without an idempotency key, a create that got no answer may exist although the lookup cannot
            # see it yet. Until the ledger's lookup has had time to settle, keep the intent open and create
            # nothing for that deal; a later run looks again.
            now = self._now()
            for it in open_invoices:
                if it.reference in found_inv or it.state != "sent":
                    continue
                if (now - it.updated_at).total_seconds() < self.ledger.lookup_settle_s:
                    self._hold.add(it.crm_id)
            if self._hold:
                counts["awaiting_lookup"] += len(self._hold)
                log.info("unanswered creates not yet visible in the ledger; re-checked next run",
                         deals=sorted(self._hold))

    def _rebuild(self, counts: Counter[str]) -> None:
        """No state for this pipeline: adopt the ledger invoices that carry its references."""
        adopted = self._ledger_links()
        audits = [AuditData(pipeline=self.name, run_id=self.run_id, action="invoice.adopted", object_kind="deal",
                            object_id=lk.crm_id, location="ledger", before=None,
                            after={"ledger_id": lk.ledger_id, "number": lk.ledger_number}) for lk in adopted]
        if adopted:
            self.store.save_links(self.name, "deal", adopted)
            self.store.audit(audits)
            counts["adopted"] += len(adopted)
            log.info("rebuilt links from ledger references", count=len(adopted))

    def _ledger_links(self) -> list[LinkData]:
        """Links to the live ledger invoices that carry this pipeline's references (read only)."""
        links: list[LinkData] = []
        for inv in self.ledger.list_invoices(None):
            deal_id = deal_from_reference(self.pipeline, self.name, inv.reference)
            if deal_id is None or inv.ledger_id is None or inv.status in ("voided", "deleted"):
                continue
            links.append(LinkData(kind="deal", crm_id=deal_id, ledger_id=inv.ledger_id, ledger_number=inv.number,
                                  reference=inv.reference, fingerprint="", revision=1))
        return links

    # ------------------------------------------------------------------------------------------------
    # pulling
    # ------------------------------------------------------------------------------------------------
    def _pages(self, until: dt.datetime) -> Generator[tuple[list[Deal], Any]]:
        """Deals to look at: first those to re-check (flagged, pending), then the changed ones by page."""
        recheck = set(self.store.open_flags(self.name))
        recheck |= {i.crm_id for i in self.store.open_intents(self.name, "invoice")}
        if recheck:
            deals = self.crm.get_deals(sorted(recheck))
            if deals:
                yield deals, None
        since = self.store.get_cursor(self.name, STREAM)
        page: DealPage
        # The next pages are pulled from the CRM while the current one is written to the ledger.
        for page in prefetch(self.crm.changed_deals(since, until, self.pipeline.page_size), depth=2):
            yield page.deals, page.cursor

    # ------------------------------------------------------------------------------------------------
    # planning
    # ------------------------------------------------------------------------------------------------
    def _plan_deal(self, deal: Deal, links: dict[str, Any]) -> DealPlan:
        link = links.get(deal.crm_id)
        if not deal.is_won or deal.archived:
            if link is not None:
                return DealPlan(deal.crm_id, "flag", "changed_after_invoice",
                                f"deal {deal.crm_id} is invoiced ({link.ledger_number or link.ledger_id}) "
                                f"but {'was deleted in the CRM' if deal.archived else 'is no longer won'}",
                                deal=deal) if self._flag_changes() else DealPlan(
                    deal.crm_id, "already_invoiced", deal=deal)
            return DealPlan(deal.crm_id, "skip", "not_won", deal=deal)
        built = build_invoice(deal, self.pipeline, self.name, self._now().date())
        if link is not None:
            if link.fingerprint and self._flag_changes():
                invoiced_as = link.ledger_number or link.ledger_id
                if isinstance(built, DealProblem):
                    # What was invoiced could be built then; a deal that no longer maps (a new amount, a
                    # removed company, a new SKU) has changed since.
                    return DealPlan(deal.crm_id, "flag", "changed_after_invoice",
                                    f"deal {deal.crm_id} changed after it was invoiced as {invoiced_as}: "
                                    f"{built.detail}", deal=deal)
                fp = fingerprint(built, deal.customer.crm_id if deal.customer else None)
                if fp != link.fingerprint:
                    return DealPlan(deal.crm_id, "flag", "changed_after_invoice",
                                    f"deal {deal.crm_id} changed after it was invoiced as {invoiced_as}",
                                    invoice=built, deal=deal)
            return DealPlan(deal.crm_id, "already_invoiced", deal=deal)
        if isinstance(built, DealProblem):
            return DealPlan(deal.crm_id, "flag", built.reason, built.detail, deal=deal)
        return DealPlan(deal.crm_id, "create", invoice=built, deal=deal)

    def _flag_changes(self) -> bool:
        return self.pipeline.invoice.on_change_after_invoice == "flag"

    # ------------------------------------------------------------------------------------------------
    # customers
    # ------------------------------------------------------------------------------------------------
    def _index(self) -> CustomerIndex:
        if self._directory is None:
            self._directory = CustomerIndex(self.ledger.list_customers())
        return self._directory

    def _resolve_customer_readonly(self, deal: Deal) -> tuple[str | None, str]:
        assert deal.customer is not None
        link = self.store.links(self.name, "customer", [deal.customer.crm_id]).get(deal.customer.crm_id)
        if link is not None:
            return link.ledger_id, "link"
        number = customer_number(self.pipeline, self.crm.vendor, deal.customer.crm_id)
        found, how = self._index().match(deal.customer, number, self.pipeline.customers.match)
        return (found.ledger_id, how) if found else (None, "")

    def _resolve_customers(self, plans: list[DealPlan], counts: Counter[str]) -> None:
        """Give every planned create a ledger customer id: stored link, match, or creation."""
        customers = {p.deal.customer.crm_id: p.deal.customer for p in plans
                     if p.deal is not None and p.deal.customer is not None}
        if not customers:
            return
        links = self.store.links(self.name, "customer", customers)
        resolved: dict[str, str] = {cid: lk.ledger_id for cid, lk in links.items()}
        to_match = [c for cid, c in customers.items() if cid not in resolved]
        new_links: list[LinkData] = []
        to_create: list[tuple[str, Any]] = []
        if to_match:
            index = self._index()
            for c in to_match:
                number = customer_number(self.pipeline, self.crm.vendor, c.crm_id)
                found, how = index.match(c, number, self.pipeline.customers.match)
                if found is not None:
                    resolved[c.crm_id] = found.ledger_id
                    new_links.append(LinkData(kind="customer", crm_id=c.crm_id, ledger_id=found.ledger_id,
                                              ledger_number=found.number, reference=number, fingerprint=how,
                                              revision=1))
                    counts["customers_matched"] += 1
                elif self.pipeline.customers.create_missing:
                    to_create.append((number, c))
        if new_links:
            self.store.save_links(self.name, "customer", new_links)
        # A ledger-rejected key must not be reused: the vendor would replay the rejection, or refuse the
        # corrected request as a different one under a used key.
        earlier = self.store.intents_for(self.name, "customer", [c.crm_id for _, c in to_create]) if to_create else {}
        revisions = {c.crm_id: 1 if (prev := earlier.get(c.crm_id)) is None
                     else prev.revision + 1 if prev.state == "failed" else prev.revision
                     for _, c in to_create}
        for start in range(0, len(to_create), self.ledger.max_batch):
            chunk = to_create[start:start + self.ledger.max_batch]
            intents = self.store.add_intents([
                IntentData(pipeline=self.name, kind="customer", crm_id=c.crm_id, revision=revisions[c.crm_id],
                           idempotency_key=intent_key(self.name, "customer", c.crm_id, revisions[c.crm_id]),
                           reference=number, request_fingerprint="")
                for number, c in chunk
            ])
            keys = [i.idempotency_key for i in intents]
            self.store.mark_intents(keys, "sent")
            created = self.ledger.create_customers(chunk, batch_key(keys))
            rows = []
            for number, c in chunk:
                lc: LedgerCustomer | None = created.get(number)
                if lc is None:
                    continue
                resolved[c.crm_id] = lc.ledger_id
                rows.append(LinkData(kind="customer", crm_id=c.crm_id, ledger_id=lc.ledger_id,
                                     ledger_number=lc.number, reference=number, fingerprint="created", revision=1))
                self._index().add(lc)
            self.store.save_links(self.name, "customer", rows)
            done = {r.crm_id for r in rows}
            self.store.mark_intents([i.idempotency_key for i in intents if i.crm_id in done], "confirmed")
            self.store.mark_intents([i.idempotency_key for i in intents if i.crm_id not in done], "failed",
                                    "the ledger did not create this customer")
            self.store.audit([AuditData(pipeline=self.name, run_id=self.run_id, action="customer.created",
                                        object_kind="customer", object_id=r.crm_id, location="ledger", before=None,
                                        after={"ledger_id": r.ledger_id, "number": r.ledger_number}) for r in rows])
            counts["customers_created"] += len(rows)
        for p in plans:
            if p.deal is not None and p.deal.customer is not None:
                p.customer_id = resolved.get(p.deal.customer.crm_id)
                if p.customer_id is None:
                    p.action, p.reason = "flag", "customer_unmatched"
                    p.detail = (f"deal {p.deal_id}: no ledger customer matches company {p.deal.customer.crm_id} "
                                f"({p.deal.customer.name}) and creating customers is off or failed")

    # ------------------------------------------------------------------------------------------------
    # applying
    # ------------------------------------------------------------------------------------------------
    def _process_page(self, deals: list[Deal], cursor: Any, counts: Counter[str], result: RunResult) -> None:
        counts["pulled"] += len(deals)
        # The deals' latest state (forecast, CAC), stored before anything can move the cursor past them.
        self.facts.save_deals(self.name, deals)
        links = self.store.links(self.name, "deal", [d.crm_id for d in deals])
        plans: list[DealPlan] = []
        for deal in deals:
            handled = self._seen.get(deal.crm_id)
            if handled is not None and deal.updated_at <= handled:
                continue
            self._seen[deal.crm_id] = deal.updated_at
            if deal.is_won:
                counts["won"] += 1
            plan = self._plan_deal(deal, links)
            if plan.action == "create" and deal.crm_id in self._hold:
                # An unanswered create may exist in the ledger: look again next run, never create twice.
                plan = DealPlan(deal.crm_id, "skip", "awaiting_lookup", deal=deal)
            plans.append(plan)
        creates = [p for p in plans if p.action == "create"]
        self._resolve_customers(creates, counts)
        flags = [p for p in plans if p.action == "flag"]
        for p in flags:
            self.store.flag(self.name, self.run_id or "", p.deal_id, p.reason, p.detail)
            log.warning("deal flagged", deal=p.deal_id, reason=p.reason, detail=p.detail)
            counts["flagged"] += 1
        ok_ids = [p.deal_id for p in plans if p.action == "already_invoiced"
                  or (p.action == "skip" and p.reason != "awaiting_lookup")]
        counts["already_invoiced"] += sum(1 for p in plans if p.action == "already_invoiced")
        creates = [p for p in plans if p.action == "create"]
        batches = [creates[i:i + self.ledger.max_batch] for i in range(0, len(creates), self.ledger.max_batch)]
        if not batches:
            self.store.resolve_flags(self.name, ok_ids)
            if cursor is not None:
                self.store.record_outcomes(self.name, self.run_id or "", confirmed=[], failed=[],
                                           cursor=(STREAM, cursor))
            return
        created: list[str] = []
        for n, batch in enumerate(batches):
            last = n == len(batches) - 1
            created += self._apply_batch(batch, cursor if last else None, counts)
            if self.progress:
                self.progress("created", counts["created"])
        # Only deals now invoiced lose their flag: a rejected one keeps the ledger_rejected flag just set,
        # which is what gets it re-checked once the cursor has moved past it.
        self.store.resolve_flags(self.name, ok_ids + created)

    def _apply_batch(self, batch: Sequence[DealPlan], cursor: Any, counts: Counter[str]) -> list[str]:
        """Create one batch of invoices and record the outcomes; returns the deals now invoiced."""
        existing = self.store.intents_for(self.name, "invoice", [p.deal_id for p in batch])
        data: list[IntentData] = []
        for p in batch:
            assert p.invoice is not None
            prev = existing.get(p.deal_id)
            revision = 1
            if prev is not None:
                # A ledger-rejected key must not be reused: the vendor would replay the rejection.
                revision = prev.revision + 1 if prev.state == "failed" else prev.revision
            fp = fingerprint(p.invoice, p.deal.customer.crm_id if p.deal and p.deal.customer else None)
            data.append(IntentData(pipeline=self.name, kind="invoice", crm_id=p.deal_id, revision=revision,
                                   idempotency_key=intent_key(self.name, "invoice", p.deal_id, revision),
                                   reference=p.invoice.reference, request_fingerprint=fp))
        intents = {i.crm_id: i for i in self.store.add_intents(data)}
        requests = [
            InvoiceRequest(idempotency_key=intents[p.deal_id].idempotency_key, invoice=p.invoice,
                           customer_ledger_id=p.customer_id or "")
            for p in batch if p.invoice is not None
        ]
        keys = [r.idempotency_key for r in requests]
        self.store.mark_intents(keys, "sent")
        outcomes = self.ledger.create_invoices(requests, batch_key(keys))
        by_key = {o.idempotency_key: o for o in outcomes}
        confirmed: list[Confirmed] = []
        failed: list[Failed] = []
        audits: list[AuditData] = []
        for p in batch:
            it = intents[p.deal_id]
            o = by_key.get(it.idempotency_key)
            if o is not None and o.ok and o.invoice is not None and o.invoice.ledger_id:
                confirmed.append(Confirmed(key=it.idempotency_key, crm_id=p.deal_id, ledger_id=o.invoice.ledger_id,
                                           ledger_number=o.invoice.number, reference=it.reference,
                                           fingerprint=it.request_fingerprint, revision=it.revision))
                after: dict[str, Any] = {"ledger_id": o.invoice.ledger_id, "number": o.invoice.number,
                                         "total": str(p.invoice.total if p.invoice else ""),
                                         "currency": p.invoice.currency if p.invoice else None}
                if o.invoice.ledger_total is not None and p.invoice is not None \
                        and o.invoice.ledger_total != p.invoice.total:
                    after["ledger_total"] = str(o.invoice.ledger_total)
                    after["rounding_difference"] = str(o.invoice.ledger_total - p.invoice.total)
                audits.append(AuditData(pipeline=self.name, run_id=self.run_id, action="invoice.created",
                                        object_kind="deal", object_id=p.deal_id, location="ledger",
                                        before=None, after=after))
            else:
                err = (o.error if o is not None else None) or "the ledger returned no result for this invoice"
                failed.append(Failed(key=it.idempotency_key, crm_id=p.deal_id, error=err))
                audits.append(AuditData(pipeline=self.name, run_id=self.run_id, action="invoice.rejected",
                                        object_kind="deal", object_id=p.deal_id, location="ledger",
                                        before=None, after={"error": err}))
        self.store.record_outcomes(self.name, self.run_id or "", confirmed=confirmed, failed=failed,
                                   cursor=(STREAM, cursor) if cursor is not None else None, audits=audits)
        for f in failed:
            self.store.flag(self.name, self.run_id or "", f.crm_id, "ledger_rejected", f.error)
            log.warning("invoice rejected by the ledger", deal=f.crm_id, error=f.error)
        counts["created"] += len(confirmed)
        counts["failed"] += len(failed)
        return [c.crm_id for c in confirmed]


_DONE = object()


def prefetch(source: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``source`` in a background thread, at most ``depth`` items ahead of the consumer.

    An exception in the producer is re-raised in the consumer; a consumer that stops early stops the
    producer at its next item.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Queue ``item`` unless the consumer has gone (then False): a full queue never blocks for good."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            offer(exc)

    ctx = contextvars.copy_context()
    worker = threading.Thread(target=ctx.run, args=(produce,), name="crm-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join(timeout=30)


def summarize_totals(invoices: Iterable[Invoice]) -> dict[str, str]:
    """Sum of invoice totals per currency, as strings (for summaries)."""
    from decimal import Decimal

    tot: dict[str, Decimal] = {}
    for inv in invoices:
        tot[inv.currency] = tot.get(inv.currency, Decimal(0)) + inv.total
    return {k: str(v) for k, v in sorted(tot.items())}

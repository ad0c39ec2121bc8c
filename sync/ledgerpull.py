"""The ledger pull: sales invoices, credit notes and payments, read incrementally into the state store.

Each stream (``ledger_invoices``, ``ledger_credit_notes``, ``ledger_payments``) has its own cursor: the
latest ledger modification time it has stored. A pull asks the ledger for what changed since that time
less :data:`OVERLAP` (ledger clocks and "modified since" filters are not exact; reading a document twice
is harmless, the store upserts by ledger id). Documents are stored in chunks as they arrive; the cursor
moves only in the transaction that stores the stream's last chunk, so a crash mid-stream re-reads from
the old cursor and loses nothing.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from connectors.domain import CreditNote, Invoice, Payment
from connectors.errors import ConnectorError, ReauthorizationRequired
from connectors.interfaces import Cursor, Ledger
from sync.factstore import FactStore
from sync.state import StateStore

__all__ = ["OVERLAP", "STREAMS", "LedgerPull", "PullResult"]

log = structlog.get_logger("ledgerbridge.ledgerpull")

OVERLAP = dt.timedelta(minutes=5)
STREAMS = ("ledger_invoices", "ledger_credit_notes", "ledger_payments")
_CHUNK = 200

T = TypeVar("T")


@dataclass
class PullResult:
    status: str = "ok"
    counts: dict[str, int] = field(default_factory=dict)
    api_calls: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    #: The vendor refused the connection's authorisation for good: a person must authorise it again.
    needs_authorisation: bool = False

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "ok" else 1


class LedgerPull:
    """Pulls one pipeline's ledger facts into ``store``."""

    def __init__(self, name: str, ledger: Ledger, store: StateStore, *,
                 now: Callable[[], dt.datetime] | None = None, overlap: dt.timedelta = OVERLAP,
                 stop: Callable[[], bool] | None = None) -> None:
        self.name = name
        #: Asked after each stored chunk: True ends the pull there (a shutdown); what was read is kept and the
        #: stream's cursor stays where it was, so the next pull reads the rest again.
        self.stop = stop
        self.overlap = overlap
        self.ledger = ledger
        self.store = store
        self.facts = FactStore(store)
        self._now = now or (lambda: dt.datetime.now(dt.UTC))

    def run(self) -> PullResult:
        """Pull every stream; vendor problems end up in the result (status ``failed``), not raised."""
        started = time.monotonic()
        calls_before = self.ledger.stats.calls
        result = PullResult()
        run_id = self.store.start_run(self.name, job="ledger")
        try:
            result.counts["invoices"] = self._stream("ledger_invoices", self.ledger.list_invoices, self._save_invoices)
            result.counts["credit_notes"] = self._stream("ledger_credit_notes", self.ledger.list_credit_notes,
                                                         self._save_credits)
            result.counts["payments"] = self._stream("ledger_payments", self.ledger.list_payments,
                                                     self._save_payments)
        except _Stopped as exc:
            result.status = "partial"
            result.error = f"stopped for shutdown during {exc.stream}; the next pull goes on from its cursor"
            log.info("ledger pull stopped for shutdown", pipeline=self.name, stream=exc.stream)
        except ConnectorError as exc:
            result.status = "failed"
            result.error = str(exc)
            result.needs_authorisation = isinstance(exc, ReauthorizationRequired)
            log.error("ledger pull failed", pipeline=self.name, error=str(exc))
        result.api_calls = {self.ledger.vendor: self.ledger.stats.calls - calls_before}
        result.seconds = time.monotonic() - started
        self.store.finish_run(run_id, result.status, result.counts, result.api_calls, result.error)
        return result

    def _stream(self, stream: str, source: Callable[[dt.datetime | None], Iterator[T]],
                save: Callable[[list[T], tuple[str, Cursor] | None], None]) -> int:
        if self.stop is not None and self.stop():
            raise _Stopped(stream)
        cursor = self.store.get_cursor(self.name, stream)
        since = cursor.value - self.overlap if cursor is not None else None
        pulled_at = self._now()
        newest: dt.datetime | None = cursor.value if cursor is not None else None
        chunk: list[T] = []
        count = 0
        for item in source(since):
            chunk.append(item)
            stamp = getattr(item, "updated_at", None)
            if isinstance(stamp, dt.datetime) and (newest is None or stamp > newest):
                newest = stamp
            if len(chunk) >= _CHUNK:
                save(chunk, None)
                count += len(chunk)
                chunk = []
                if self.stop is not None and self.stop():
                    raise _Stopped(stream)
        # The stream is complete: store the rest and move the cursor in one transaction. Without any
        # modification time from the ledger, the pull's own start (less the overlap next time) is used.
        final = newest if newest is not None else pulled_at
        save(chunk, (stream, Cursor(min(final, pulled_at))))
        return count + len(chunk)

    def _save_invoices(self, items: list[Invoice], cursor: tuple[str, Cursor] | None) -> None:
        self.facts.record_ledger_page(self.name, invoices=[(i, self._url(i)) for i in items], cursor=cursor)

    def _save_credits(self, items: list[CreditNote], cursor: tuple[str, Cursor] | None) -> None:
        self.facts.record_ledger_page(self.name, credit_notes=items, cursor=cursor)

    def _save_payments(self, items: list[Payment], cursor: tuple[str, Cursor] | None) -> None:
        self.facts.record_ledger_page(self.name, payments=items, cursor=cursor)

    def _url(self, invoice: Invoice) -> str | None:
        url: Any = self.ledger.invoice_url(invoice)
        return str(url) if url else None


class _Stopped(Exception):
    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.stream = stream

"""QuickBooks Online ledger connector: the adapter, its HTTP client, settings and the QuickBooks sandbox."""

from __future__ import annotations

from connectors.quickbooks.adapter import QuickBooksLedger

__all__ = ["QuickBooksLedger"]

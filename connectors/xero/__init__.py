"""Xero ledger connector: the adapter, its HTTP client, settings and the Xero sandbox."""

from __future__ import annotations

from connectors.xero.adapter import XeroLedger

__all__ = ["XeroLedger"]

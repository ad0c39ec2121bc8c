"""Pennylane ledger connector (Company API v2): the adapter, its HTTP client, settings and the sandbox."""

from __future__ import annotations

from connectors.pennylane.adapter import PennylaneLedger

__all__ = ["PennylaneLedger"]

"""Salesforce CRM connector: the :class:`SalesforceSource` adapter, its settings and its sandbox."""

from __future__ import annotations

from connectors.salesforce.adapter import SalesforceSource
from connectors.salesforce.settings import SalesforceSettings

__all__ = ["SalesforceSettings", "SalesforceSource"]

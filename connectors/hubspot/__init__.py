"""HubSpot CRM connector: the :class:`HubSpotSource` adapter, its settings and its sandbox."""

from __future__ import annotations

from connectors.hubspot.adapter import HubSpotSource
from connectors.hubspot.settings import HubSpotSettings

__all__ = ["HubSpotSettings", "HubSpotSource"]

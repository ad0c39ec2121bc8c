"""Pipedrive CRM connector: the :class:`PipedriveSource` adapter, its settings and its sandbox."""

from __future__ import annotations

from connectors.pipedrive.adapter import PipedriveSource
from connectors.pipedrive.settings import PipedriveSettings

__all__ = ["PipedriveSettings", "PipedriveSource"]

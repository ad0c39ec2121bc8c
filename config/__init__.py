"""LedgerBridge configuration: the schema of the YAML file and the loader that validates it."""

from __future__ import annotations

from config.loader import (
    EXTENSION_PREFIX,
    MAX_ALIAS_NODES,
    MAX_DEPTH,
    ConfigValidationError,
    LoadedConfig,
    PipelineConnectors,
    Problem,
    config_json_schema,
    load_config,
    loads,
)
from config.schema import (
    AppConfig,
    ConnectorBlock,
    ConnectorSettings,
    CustomerPolicy,
    InvoicePolicy,
    ItemMapping,
    ItemTarget,
    LoggingConfig,
    Pipeline,
    Schedule,
    StateConfig,
    TaxMapping,
)

__all__ = [
    "EXTENSION_PREFIX",
    "MAX_ALIAS_NODES",
    "MAX_DEPTH",
    "AppConfig",
    "ConfigValidationError",
    "ConnectorBlock",
    "ConnectorSettings",
    "CustomerPolicy",
    "InvoicePolicy",
    "ItemMapping",
    "ItemTarget",
    "LoadedConfig",
    "LoggingConfig",
    "Pipeline",
    "PipelineConnectors",
    "Problem",
    "Schedule",
    "StateConfig",
    "TaxMapping",
    "config_json_schema",
    "load_config",
    "loads",
]

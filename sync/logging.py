"""Logging, configured once: structlog with a console renderer on a terminal and JSON otherwise.

Every event passes through :func:`redact_event`, the single choke point that removes credentials from
keys and values before anything is rendered. Standard-library loggers (httpx, urllib3, the vendor SDKs)
are routed through the same processors.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from connectors.errors import redact

__all__ = ["configure_logging", "redact_event"]

_SECRET_KEYS = (
    "authorization", "token", "secret", "password", "cookie", "api_key", "apikey", "refresh_token",
    "client_secret", "signature", "access_token", "secret_key",
)

_configured = False


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value, limit=4000)
    if isinstance(value, dict):
        return {k: ("[REDACTED]" if _is_secret_key(k) else _scrub(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _is_secret_key(key: object) -> bool:
    k = str(key).lower()
    return any(s in k for s in _SECRET_KEYS) and not k.endswith(("_count", "_calls"))


def redact_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: drop secret-named keys and scrub credential shapes from every value."""
    for key in list(event_dict):
        if _is_secret_key(key):
            event_dict[key] = "[REDACTED]"
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog and the standard library once (later calls reconfigure)."""
    global _configured
    out = stream or sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    lvl = getattr(logging, level.upper(), logging.INFO)

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_event,
    ]
    renderer: structlog.types.Processor
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    else:
        renderer = structlog.processors.JSONRenderer()

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if use_console else [structlog.processors.dict_tracebacks]),
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_ledgerbridge", False):
            root.removeHandler(h)
    handler._ledgerbridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(lvl)
    # Third-party chatter: warnings only, and never request bodies.
    for noisy in ("httpx", "httpcore", "urllib3", "hubspot", "simple_salesforce", "alembic"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    _configured = True

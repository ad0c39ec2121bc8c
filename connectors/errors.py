"""The one error tree that leaves a connector. No vendor exception type crosses an adapter boundary.

Errors are grouped by what the caller must do, not by vendor:

- :class:`TransientError` - retry with backoff (5xx, connection failures before the request was sent).
- :class:`RateLimitedError` - retry after ``retry_after`` seconds.
- :class:`AmbiguousWriteError` - a write whose outcome is unknown; resolve by lookup, never by a blind
  retry that could create.
- :class:`AuthError` - credentials or scopes are wrong or revoked; alert, do not retry.
  :class:`ReauthorizationRequired`, its subclass, says the connection itself must be authorised again.
- :class:`QuotaExhaustedError` - a daily allocation is used up; stop the pipeline.
- :class:`RecordError` - one record was rejected (validation); the rest of a batch goes on.
- :class:`VendorError` - any other definitive failure.

Messages carry the vendor, method, path (never the query string), status, vendor code and request id,
and a body excerpt that has passed through :func:`redact`.
"""

from __future__ import annotations

import re

__all__ = [
    "AmbiguousWriteError",
    "AuthError",
    "ConfigError",
    "ConnectorError",
    "LedgerBridgeError",
    "QuotaExhaustedError",
    "RateLimitedError",
    "RecordError",
    "TransientError",
    "VendorError",
    "redact",
]

_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(basic\s+)[A-Za-z0-9+/=]+"),
    re.compile(
        r"(?i)((?:access_token|refresh_token|client_secret|api_key|apikey|password|token|secret)"
        r"[\"']?\s*[:=]\s*[\"']?)[^\"'&\s,}]+"
    ),
    re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
]


def redact(text: str, limit: int = 500) -> str:
    """Remove anything shaped like a credential from ``text`` and truncate it to ``limit`` characters."""
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: (m.group(1) if m.groups() else "") + "[REDACTED]", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text


class LedgerBridgeError(Exception):
    """Root of every error LedgerBridge raises on purpose."""


class ConfigError(LedgerBridgeError):
    """The configuration is invalid; the message names the place."""


class ConnectorError(LedgerBridgeError):
    """A failure talking to a vendor API."""

    def __init__(
        self,
        message: str,
        *,
        vendor: str,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        method: str | None = None,
        path: str | None = None,
        body: str | None = None,
    ) -> None:
        self.vendor = vendor
        self.status = status
        self.code = code
        self.request_id = request_id
        self.method = method
        self.path = path.split("?", 1)[0] if path else path
        self.body = redact(body) if body else None
        self.detail = redact(message)
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self.vendor}:"]
        if self.request_id:
            parts.append(f"[request {self.request_id}]")
        if self.method and self.path:
            parts.append(f"{self.method} {self.path}")
        if self.status is not None:
            parts.append(f"-> {self.status}")
        if self.code:
            parts.append(f"({self.code})")
        parts.append(self.detail)
        return " ".join(parts)


class TransientError(ConnectorError):
    """Retry with backoff: 5xx, connect errors, timeouts on reads."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)  # type: ignore[arg-type]


class RateLimitedError(TransientError):
    """The vendor said to slow down; wait ``retry_after`` seconds before the next call."""


class AmbiguousWriteError(ConnectorError):
    """A write was sent and no answer came back: it may or may not have been applied."""


class AuthError(ConnectorError):
    """Credentials rejected, expired beyond refresh, or revoked."""


class ReauthorizationRequired(AuthError):
    """The connection's authorisation is gone for good: the vendor refused its refresh token even after the
    store was read again (or there is none). Retrying cannot help; a person must authorise it again."""


class QuotaExhaustedError(ConnectorError):
    """A daily or monthly allocation is used up; the pipeline must stop until it resets."""


class RecordError(ConnectorError):
    """The vendor rejected one record (validation); other records are unaffected."""


class VendorError(ConnectorError):
    """Any other definitive vendor failure (4xx other than the above)."""

"""The Pennylane HTTP client: bearer token (company token or OAuth2), pacing, error mapping, cursor paging.

Every call goes through :class:`~connectors.http.VendorHttp` (one retry layer) on ``/api/external/v2``.

- **Pacing.** Pennylane allows 25 requests every 5 seconds per token. A
  :class:`~connectors.http.RateBudget` paces calls before they are sent; every answer carries
  ``ratelimit-limit``/``ratelimit-remaining``/``ratelimit-reset`` (a unix timestamp) and a remaining count
  of zero pauses the budget until the reset. A 429 carries ``retry-after`` (seconds) and is retried after it.
- **Retries.** Only 429, 500 and 503 are retried, and only on reads (the errors guide: the other statuses
  are definitive). A create carries no idempotency key: a create whose answer is lost (a dropped
  connection, a timeout, any 5xx) raises :class:`~connectors.errors.AmbiguousWriteError` at once and is
  never sent again by this layer.
- **Errors.** 422 (``{"error", "message", "details"}`` in the errors guide, ``{"error", "status"}`` in the
  OpenAPI description) and a 400 naming a request-validation ``code`` or ``field`` are
  :class:`~connectors.errors.RecordError`; 401/403 are :class:`~connectors.errors.AuthError`; other 4xx
  (an invalid cursor or filter, 404, 409) are :class:`~connectors.errors.VendorError` with the status.
- **Paging.** Lists answer ``{items, has_more, next_cursor}``. The cursor does not carry the filter or the
  sort, so :meth:`PennylaneClient.pages` resends every parameter with each cursor.

JSON numbers are read as :class:`~decimal.Decimal`; amounts travel as strings (:func:`money`).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from decimal import Decimal
from typing import Any

import httpx
import structlog
from pydantic import SecretStr

from connectors import jsonwire
from connectors.errors import (
    AmbiguousWriteError,
    AuthError,
    ConfigError,
    ConnectorError,
    RateLimitedError,
    RecordError,
    TransientError,
    VendorError,
)
from connectors.http import RateBudget, VendorHttp, fingerprint, parse_retry_after, shared_budget
from connectors.interfaces import ApiStats, TokenStore
from connectors.oauth import LockFactory, RotatingOAuth2
from connectors.pennylane.settings import PennylaneSettings

__all__ = ["VENDOR", "PennylaneClient", "dumps", "filter_param", "loads", "money", "rfc3339"]

log = structlog.get_logger("ledgerbridge.pennylane")

VENDOR = "pennylane"
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_RETRIED = frozenset({429, 500, 503})
# Request-validation codes of the 400 answers in the OpenAPI description (a body that breaks the schema).
_VALIDATION_CODES = frozenset({
    "InvalidDateFormat", "InvalidDateTimeFormat", "InvalidEmailFormat", "InvalidPattern", "InvalidUUIDFormat",
    "LessThanExclusiveMinimum", "LessThanMinimum", "LessThanMinItems", "LessThanMinLength",
    "MoreThanExclusiveMaximum", "MoreThanMaximum", "MoreThanMaxItems", "MoreThanMaxLength", "NotAnyOf",
    "NotEnumInclude", "NotExistPropertyDefinition", "NotExistRequiredKey", "NotNullError", "NotOneOf",
    "ValidateError",
})


# -- wire format -------------------------------------------------------------------------------------

def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return jsonwire.loads(data)


def dumps(obj: Any) -> str:
    """Serialise ``obj`` to JSON; Decimals are written exactly as JSON numbers (never through float)."""
    return jsonwire.dumps(obj, datetime_text=rfc3339, zero="0", allow_float=False)


def money(value: Decimal) -> str:
    """An amount as Pennylane takes it: a string in plain notation (``"1250.5"``, never ``"1.25E+3"``)."""
    return jsonwire.decimal_text(value, zero="0")


def rfc3339(value: dt.datetime) -> str:
    """``2025-01-09T08:24:38.812458Z``: UTC with microseconds, the form of Pennylane's timestamps."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def filter_param(*conditions: tuple[str, str, Any]) -> str:
    """The ``filter`` query value: a JSON array of ``{field, operator, value}`` objects."""
    return json.dumps([{"field": f, "operator": op, "value": v} for f, op, v in conditions],
                      separators=(",", ":"), ensure_ascii=False)


def _error_text(body: Any, text: str) -> tuple[str, str | None]:
    """(message, vendor code) from any of Pennylane's error shapes."""
    if not isinstance(body, dict):
        return text.strip()[:300], None
    code = body.get("code")
    error = body.get("error")
    message = body.get("message")
    parts: list[str] = []
    if isinstance(message, str) and message:
        parts.append(message)
    if isinstance(error, str) and error and error not in parts:
        if code is None and isinstance(message, str) and message:
            code = error  # the guide's shape: "error" is the machine code, "message" the text
        else:
            parts.insert(0, error)
    field = body.get("field")
    if isinstance(field, str) and field and field not in " ".join(parts):
        parts.append(f"(field {field})")
    details = body.get("details")
    if isinstance(details, dict) and details:
        parts.append("; ".join(f"{k}: {v}" for k, v in details.items()))
    elif isinstance(details, list) and details:
        parts.append("; ".join(str(d) for d in details))
    return " ".join(parts), (str(code) if code is not None else None)


class _BearerToken(httpx.Auth):
    """``Authorization: Bearer <company token>``; the token never reaches a repr, a log line or an error."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "_BearerToken(***)"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request


class PennylaneClient:
    """One Pennylane company's API client, shared by the adapter's calls."""

    def __init__(
        self,
        settings: PennylaneSettings,
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        stats: ApiStats | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        lock_factory: LockFactory | None = None,
    ) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else ApiStats()
        scale = settings.time_scale
        self.window_s = 5.0 / scale
        # The limit is per token: clients of this process with the same company token (or OAuth connection,
        # whose tokens they share) share one budget.
        credential = (settings.api_token.get_secret_value() if settings.api_token is not None
                      else f"{settings.client_id}\n{settings.connection_name}")
        self.budget = shared_budget(
            (VENDOR, settings.api_url, fingerprint(credential), transport),
            lambda: RateBudget([(settings.requests_per_5s, self.window_s)], sleep=sleep, monotonic=monotonic),
        )
        self._clock = clock
        self.oauth: RotatingOAuth2 | None = None
        auth: httpx.Auth
        if settings.uses_oauth:
            if settings.client_id is None or settings.client_secret is None:
                raise ConfigError("ledger (pennylane): OAuth needs client_id and client_secret")
            self.oauth = RotatingOAuth2(
                vendor=VENDOR,
                token_url=settings.oauth_token_url,
                client_id=settings.client_id,
                client_secret=settings.client_secret,
                connection=settings.connection_name,
                store=tokens,
                initial_refresh_token=settings.refresh_token,
                margin_s=settings.refresh_margin_s,
                now=clock,
                stats=self.stats,
                lock_factory=lock_factory,
                transport=transport,
                timeout=settings.timeout_s,
                time_scale=scale,
            )
            auth = self.oauth
        elif settings.api_token is not None:
            auth = _BearerToken(settings.api_token)
        else:
            raise ConfigError("ledger (pennylane): api_token or an OAuth client is required")
        self.auth = auth
        headers: dict[str, str] = {}
        if settings.use_2026_api_changes is not None:
            headers["X-Use-2026-API-Changes"] = "true" if settings.use_2026_api_changes else "false"
        self.http = VendorHttp(
            vendor=VENDOR,
            base_url=settings.api_url,
            budget=self.budget,
            stats=self.stats,
            auth=auth,
            headers=headers,
            timeout=settings.timeout_s,
            transport=transport,
            error_mapper=self._map_error,
            on_response=self._on_response,
            max_attempts=settings.max_attempts,
            sleep=sleep,
        )

    def close(self) -> None:
        self.http.close()
        if self.oauth is not None:
            self.oauth.close()

    # -- limits ------------------------------------------------------------------------------------
    def _until_reset(self, resp: httpx.Response) -> float | None:
        """Seconds until ``ratelimit-reset`` (a unix timestamp), bounded by one window; None if absent."""
        raw = resp.headers.get("ratelimit-reset")
        if raw is None:
            return None
        try:
            reset = float(raw.strip())
        except ValueError:
            return None
        return min(max(reset - self._clock(), 0.0), self.window_s)

    def _on_response(self, resp: httpx.Response) -> None:
        remaining = resp.headers.get("ratelimit-remaining")
        if remaining is not None and resp.status_code != 429 and remaining.strip() == "0":
            wait = self._until_reset(resp)
            self.budget.pause(wait if wait else self.window_s / 5)

    # -- errors ------------------------------------------------------------------------------------
    def _map_error(self, resp: httpx.Response) -> ConnectorError | None:
        try:
            body: Any = loads(resp.content) if resp.content else None
        except (ValueError, UnicodeDecodeError):
            body = None
        message, code = _error_text(body, resp.text)
        status = resp.status_code
        method = resp.request.method
        kw: dict[str, Any] = {
            "vendor": VENDOR, "status": status, "method": method, "path": resp.request.url.path,
            "request_id": resp.headers.get("x-request-id"), "body": resp.text[:500], "code": code,
        }
        if status == 429:
            wait = parse_retry_after(resp.headers.get("retry-after"))
            if wait is None:
                wait = self._until_reset(resp)
            return RateLimitedError(message or "rate limited", retry_after=wait, **kw)
        if status in (401, 403):
            what = "token rejected" if status == 401 else "access refused (check the token's scopes)"
            return AuthError(f"{what}: {message}" if message else what, **kw)
        if status == 422 or (status == 400 and isinstance(body, dict)
                             and (code in _VALIDATION_CODES or isinstance(body.get("field"), str))):
            return RecordError(message or "validation failed", **kw)
        if status in _RETRIED:
            return TransientError(message or "server error",
                                  retry_after=parse_retry_after(resp.headers.get("retry-after")), **kw)
        if status >= 500:
            if method in _WRITES:
                # A gateway error after the request was sent: the write may have been applied.
                return AmbiguousWriteError(message or "server error after the write was sent", **kw)
            return VendorError(message or "server error", **kw)
        return VendorError(message or "request failed", **kw)

    # -- calls -------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        replay_safe: bool | None = None,
    ) -> Any:
        """Send one API call and return the parsed JSON (None for an empty answer).

        A write is sent once unless ``replay_safe`` (a create never is: Pennylane has no idempotency key).
        """
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = dumps(body).encode()
            headers["Content-Type"] = "application/json"
        write = method.upper() in _WRITES
        try:
            resp = self.http.request(method, path, params=params, content=content, headers=headers,
                                     replay_safe=(bool(replay_safe) if write else None))
        except httpx.HTTPError as exc:  # building the request failed; nothing was sent
            raise VendorError(f"request not sent: {type(exc).__name__}", vendor=VENDOR, method=method,
                              path=path) from None
        if not resp.content or resp.status_code == 204:
            return None
        try:
            return loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise VendorError("response is not JSON", vendor=VENDOR, status=resp.status_code, method=method,
                              path=path) from None

    def pages(self, path: str, params: Mapping[str, Any] | None = None, *, limit: int | None = None
              ) -> Iterator[list[dict[str, Any]]]:
        """Every page of a cursor-paginated list. ``params`` (filter, sort...) are resent with each cursor."""
        query = dict(params or {})
        query["limit"] = limit or self.settings.page_size
        for data in self.answers(path, query):
            yield [r for r in data["items"] if isinstance(r, dict)]

    def answers(self, path: str, params: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
        """The whole answer of every page (``items`` with, say, an ``included`` section), cursor by cursor."""
        base = {k: v for k, v in params.items() if v is not None}
        base.setdefault("limit", self.settings.page_size)
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            query = dict(base)
            if cursor is not None:
                query["cursor"] = cursor
            data = self.request("GET", path, params=query)
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise VendorError("unexpected list response", vendor=VENDOR, method="GET", path=path)
            yield data
            nxt = data.get("next_cursor")
            if not data.get("has_more") or not isinstance(nxt, str) or not nxt:
                return
            if nxt in seen:
                raise VendorError("paging loop detected (cursor repeated)", vendor=VENDOR, method="GET", path=path)
            seen.add(nxt)
            cursor = nxt

    def changelog(self, resource: str, start: dt.datetime | None) -> Iterator[list[dict[str, Any]]]:
        """Pages of ``GET /changelogs/<resource>`` from ``start``, oldest first (by ``processed_at``).

        The first call carries ``start_date``; the next ones carry only the cursor (both at once is a 400).
        """
        path = f"/changelogs/{resource}"
        query: dict[str, Any] = {"limit": self.settings.changelog_page_size}
        if start is not None:
            query["start_date"] = rfc3339(start)
        seen: set[str] = set()
        while True:
            data = self.request("GET", path, params=query)
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise VendorError("unexpected changelog response", vendor=VENDOR, method="GET", path=path)
            yield [r for r in data["items"] if isinstance(r, dict)]
            nxt = data.get("next_cursor")
            if not data.get("has_more") or not isinstance(nxt, str) or not nxt:
                return
            if nxt in seen:
                raise VendorError("paging loop detected (cursor repeated)", vendor=VENDOR, method="GET", path=path)
            seen.add(nxt)
            query = {"limit": self.settings.changelog_page_size, "cursor": nxt}

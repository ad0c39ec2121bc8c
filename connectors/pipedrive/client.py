"""The Pipedrive HTTP client: API token or OAuth2, token-cost accounting, pacing, error mapping, cursor paging.

Authentication is the ``x-api-token`` header (the token never goes into a URL, where proxies and access logs
would keep it) or an OAuth2 bearer token refreshed through :class:`~connectors.oauth.RotatingOAuth2` and the
state store's :class:`~connectors.interfaces.TokenStore`.

Pipedrive limits every company with a daily *token* budget: each operation costs the tokens its OpenAPI
description states in ``x-token-cost`` (:func:`token_cost`; a v2 list costs 10 whatever its ``limit``, a
single record 1, a write 5, v1 operations twice as much). On top of it, each token is allowed a burst of
requests per 2-second window, reported in ``x-ratelimit-limit``/``x-ratelimit-remaining``/
``x-ratelimit-reset`` (seconds until the window frees). Pacing is proactive (a
:class:`~connectors.http.RateBudget` on the burst window, less a margin) and reactive (a remaining count of
zero pauses the budget until the reset; a 429 is a :class:`~connectors.errors.RateLimitedError` that waits
``Retry-After`` or the reset). A 429 for the *daily* budget (``x-daily-requests-left: 0``, a wait longer
than any burst window, or an error naming the daily limit) is a :class:`~connectors.errors.QuotaExhaustedError`
that is never retried; so is reaching ``daily_token_allowance``, the share of the budget this connector may
spend, which is checked before a call is sent.

JSON numbers are read as :class:`~decimal.Decimal` and written from it exactly (:func:`loads`,
:func:`dumps`), so no amount passes through ``float``.
"""

from __future__ import annotations

import datetime as dt
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import structlog

from connectors import jsonwire
from connectors.errors import (
    AuthError,
    ConnectorError,
    QuotaExhaustedError,
    RateLimitedError,
    RecordError,
    TransientError,
    VendorError,
)
from connectors.http import RateBudget, VendorHttp, fingerprint, parse_retry_after, shared_budget
from connectors.interfaces import ApiStats, TokenStore
from connectors.oauth import LockFactory, RotatingOAuth2
from connectors.pipedrive.settings import PipedriveSettings

__all__ = ["VENDOR", "PipedriveClient", "dumps", "loads", "rfc3339", "token_cost"]

log = structlog.get_logger("ledgerbridge.pipedrive")

VENDOR = "pipedrive"
MAX_IDS = 100  # ``ids`` and ``deal_ids`` take at most 100 ids (v2 list operations)

# Second path segments that name a collection or an action rather than one record (``/deals/products``).
_COLLECTION_WORDS = frozenset({"archived", "products", "search", "installments", "summary", "timeline", "field",
                               "collection"})


def token_cost(method: str, path: str) -> int:
    """Tokens an operation costs, per the ``x-token-cost`` of Pipedrive's OpenAPI descriptions.

    API v2: a list or a sub-collection 10 (the stages and pipelines lists 5), one record 1, a create or an update
    5, a delete 3, a search 20, the archived deals list 20, a bulk add of deal products 25. API v1 costs twice the
    v2 figure (its ``GET /dealFields`` costs 20, ``POST /dealFields`` 10). Paths outside the API (OAuth) cost
    nothing.
    """
    segs = [s for s in path.split("?", 1)[0].split("/") if s]
    if segs[:2] == ["api", "v2"]:
        rest, factor = segs[2:], 1
    elif segs[:1] == ["v1"]:
        rest, factor = segs[1:], 2
    else:
        return 0
    if not rest:
        return 0
    m = method.upper()
    if rest[-1] == "search" or rest[0] == "itemSearch":
        cost = 20
    elif rest[-1] == "bulk":
        cost = 25
    elif m == "GET":
        if rest[:2] == ["deals", "archived"]:
            cost = 20
        elif len(rest) == 2 and rest[1] not in _COLLECTION_WORDS:
            cost = 1
        elif len(rest) == 1 and rest[0] in ("stages", "pipelines"):
            cost = 5
        else:
            cost = 10
    elif m == "DELETE":
        cost = 3
    else:
        cost = 5
    return cost * factor


# -- JSON with exact decimals ------------------------------------------------------------------------

def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return jsonwire.loads(data)


def dumps(obj: Any) -> str:
    """Serialise ``obj`` to JSON; Decimals are written exactly as JSON numbers (a zero as ``0``)."""
    return jsonwire.dumps(obj, datetime_text=rfc3339, zero="0")


def rfc3339(value: dt.datetime) -> str:
    """``2025-01-01T10:20:00Z``: the whole-second UTC form Pipedrive's v2 filters take and answer."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error_text(resp: httpx.Response) -> tuple[str, str | None]:
    """(message, vendor code) from a Pipedrive error body."""
    try:
        body = loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        return "", None
    if not isinstance(body, dict):
        return "", None
    message = str(body.get("error") or body.get("message") or "")
    info = body.get("error_info")
    if info and isinstance(info, str) and "developers.pipedrive.com" not in info:
        message = f"{message} ({info})" if message else info
    code = body.get("errorCode") or body.get("code")
    return message, (str(code) if code is not None else None)


class PipedriveClient:
    """One Pipedrive company's API client, shared by the adapter's calls."""

    def __init__(
        self,
        settings: PipedriveSettings,
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
        per_window = max(1, math.floor(settings.burst_limit * (1 - settings.rate_limit_margin)))
        # The burst window is per token: clients of this process with the same API token (or OAuth
        # connection, whose tokens they share) share one budget.
        credential = (settings.api_token.get_secret_value() if settings.api_token is not None
                      else f"{settings.client_id}\n{settings.connection_name}")
        self.budget = shared_budget(
            (VENDOR, settings.base_url, fingerprint(credential), transport),
            lambda: RateBudget([(per_window, 2.0 / scale)], sleep=sleep, monotonic=monotonic),
        )
        self._monotonic = monotonic
        self._clock = clock
        self._lock = threading.Lock()
        self._exhausted_until = 0.0
        self._day = self._utc_day()
        #: Tokens spent by this instance since the start of the UTC day (answered requests only).
        self.tokens_spent = 0
        #: The last ``x-daily-requests-left`` Pipedrive reported, when it reports one.
        self.daily_left: int | None = None
        self.auth: RotatingOAuth2 | None = None
        headers: dict[str, str] = {}
        if settings.api_token is not None:
            headers["x-api-token"] = settings.api_token.get_secret_value()
        else:
            if settings.client_id is None or settings.client_secret is None:  # the settings validator forbids it
                raise ValueError("OAuth needs client_id and client_secret")
            self.auth = RotatingOAuth2(
                vendor=VENDOR,
                token_url=settings.token_url,
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
        self.http = VendorHttp(
            vendor=VENDOR,
            base_url=settings.base_url,
            budget=self.budget,
            stats=self.stats,
            auth=self.auth,
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
        if self.auth is not None:
            self.auth.close()

    # -- limits ------------------------------------------------------------------------------------
    def _utc_day(self) -> dt.date:
        return dt.datetime.fromtimestamp(self._clock(), dt.UTC).date()

    def _reset_seconds(self, resp: httpx.Response) -> float | None:
        raw = resp.headers.get("x-ratelimit-reset")
        try:
            return max(float(raw), 0.0) if raw is not None else None
        except ValueError:
            return None

    def _on_response(self, resp: httpx.Response) -> None:
        if resp.status_code < 500 and resp.status_code not in (401, 429):
            # Refused (401, 429) and failed (5xx) calls are not charged: only answered ones are counted.
            cost = token_cost(resp.request.method, resp.request.url.path)
            with self._lock:
                self.tokens_spent += cost
        left = resp.headers.get("x-daily-requests-left")
        if left is not None and left.strip().lstrip("-").isdigit():
            self.daily_left = int(left)
        remaining = resp.headers.get("x-ratelimit-remaining")
        if remaining is not None and resp.status_code != 429 and remaining.strip() == "0":
            wait = self._reset_seconds(resp)
            self.budget.pause(wait if wait is not None else 2.0 / self.settings.time_scale)

    def _check_quota(self, method: str, path: str) -> None:
        with self._lock:
            today = self._utc_day()
            if today != self._day:
                self._day, self.tokens_spent = today, 0
            blocked = self._monotonic() < self._exhausted_until
            allowance = self.settings.daily_token_allowance
            over = allowance is not None and self.tokens_spent + token_cost(method, path) > allowance
        if blocked:
            raise QuotaExhaustedError("the company's daily API token budget is used up", vendor=VENDOR,
                                      status=429, code="daily_budget", method=method, path=path)
        if over:
            raise QuotaExhaustedError(f"this connector's daily allowance of {allowance} API tokens is used up",
                                      vendor=VENDOR, code="daily_allowance", method=method, path=path)

    def _map_error(self, resp: httpx.Response) -> ConnectorError | None:
        message, code = _error_text(resp)
        status = resp.status_code
        kw: dict[str, Any] = {
            "vendor": VENDOR,
            "status": status,
            "code": code,
            "method": resp.request.method,
            "path": resp.request.url.path,
            "request_id": resp.headers.get("x-correlation-id") or resp.headers.get("x-request-id"),
            "body": resp.text[:500],
        }
        if status == 429:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if retry_after is None:
                retry_after = self._reset_seconds(resp)
            daily = (resp.headers.get("x-daily-requests-left", "").strip() == "0"
                     or (retry_after is not None and retry_after > 60.0 / self.settings.time_scale)
                     or any(w in message.lower() for w in ("daily", "budget")))
            if daily:
                wait = retry_after if retry_after is not None else 3600.0 / self.settings.time_scale
                with self._lock:
                    self._exhausted_until = self._monotonic() + wait
                log.warning("pipedrive daily token budget used up", resets_in_s=round(wait))
                return QuotaExhaustedError(f"daily API token budget used up; resets in about {wait:.0f} s",
                                           **{**kw, "code": code or "daily_budget"})
            return RateLimitedError(message or "rate limited", retry_after=retry_after, **kw)
        if status in (401, 403):
            return AuthError(message or ("unauthorised" if status == 401 else "forbidden"), **kw)
        if status >= 500:
            return TransientError(message or "server error",
                                  retry_after=parse_retry_after(resp.headers.get("Retry-After")), **kw)
        if status in (400, 409, 422):
            return RecordError(message or "request rejected", **kw)
        if status >= 400:
            return VendorError(message or "request failed", **kw)
        return None

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
        """Send one API call (under the retry policy) and return the parsed JSON body (decimals exact)."""
        self._check_quota(method, path)
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            resp = self.http.request(method, path, params=params, content=content, headers=headers,
                                     replay_safe=replay_safe)
        except httpx.HTTPError as exc:  # building the request failed: nothing was sent
            raise VendorError(f"request not sent: {type(exc).__name__}", vendor=VENDOR, method=method,
                              path=path) from None
        try:
            parsed = loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise VendorError("response is not JSON", vendor=VENDOR, status=resp.status_code, method=method,
                              path=path) from None
        if isinstance(parsed, dict) and parsed.get("success") is False:
            message, code = _error_text(resp)
            raise VendorError(message or "request failed", vendor=VENDOR, status=resp.status_code, code=code,
                              method=method, path=path)
        return parsed

    def data(self, method: str, path: str, **kw: Any) -> Any:
        """The ``data`` member of a successful answer."""
        body = self.request(method, path, **kw)
        return body.get("data") if isinstance(body, dict) else None

    def pages(self, path: str, params: Mapping[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
        """Every page of a v2 list, following ``additional_data.next_cursor`` until it is null."""
        query: dict[str, Any] = {**(params or {}), "limit": self.settings.list_limit}
        seen: set[str] = set()
        while True:
            body = self.request("GET", path, params=query)
            if not isinstance(body, dict):
                raise VendorError("unexpected list answer", vendor=VENDOR, method="GET", path=path)
            rows = body.get("data") or []
            if not isinstance(rows, list):
                raise VendorError("list answer without a data array", vendor=VENDOR, method="GET", path=path)
            yield [r for r in rows if isinstance(r, dict)]
            extra = body.get("additional_data")
            nxt = extra.get("next_cursor") if isinstance(extra, dict) else None
            if not nxt:
                return
            if nxt in seen:
                raise VendorError("paging loop: a cursor came back twice", vendor=VENDOR, method="GET", path=path)
            seen.add(str(nxt))
            query["cursor"] = nxt

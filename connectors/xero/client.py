"""The Xero HTTP client: OAuth2 with rotating refresh tokens, pacing, error mapping, paging.

Every call goes through :class:`~connectors.http.VendorHttp` (one retry layer). Pacing is proactive (a
:class:`~connectors.http.RateBudget` of 60 calls a minute, 5,000 a day and 5 in flight per organisation)
and reactive: ``Retry-After`` on a 429 pauses the budget, ``X-MinLimit-Remaining: 0`` pauses it briefly,
and a daily exhaustion (``X-Rate-Limit-Problem: day`` or ``X-DayLimit-Remaining: 0``) raises
:class:`~connectors.errors.QuotaExhaustedError`, which is never retried: the pipeline stops for the day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
import structlog

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
from connectors.xero import wire
from connectors.xero.settings import XeroSettings

__all__ = ["XeroClient", "idempotency_key", "quote_value", "where_any"]

log = structlog.get_logger("ledgerbridge.xero")

VENDOR = "xero"
MAX_IDEMPOTENCY_KEY = 128
_WHERE_BUDGET = 1500  # encoded characters of one ``where`` value, to keep URLs under ~2,000


def quote_value(value: str) -> str:
    """A string literal for a ``where`` expression (a double quote inside is doubled)."""
    return '"' + value.replace('"', '""') + '"'


def where_any(field: str, values: Iterable[str], *, prefix: str = "", budget: int = _WHERE_BUDGET
              ) -> Iterator[tuple[list[str], str]]:
    """Split ``values`` into ``where`` expressions ``field=="a" OR field=="b" ...`` that fit in a URL.

    ``prefix`` (e.g. ``'Type=="ACCREC" AND '``) is prepended, with the alternatives in parentheses.
    Yields (values in this chunk, expression).
    """

    def render(chunk: list[str]) -> str:
        alternatives = " OR ".join(f"{field}=={quote_value(v)}" for v in chunk)
        return f"{prefix}({alternatives})" if prefix else alternatives

    chunk: list[str] = []
    for value in dict.fromkeys(values):
        candidate = [*chunk, value]
        if chunk and len(quote(render(candidate), safe="")) > budget:
            yield chunk, render(chunk)
            candidate = [value]
        chunk = candidate
    if chunk:
        yield chunk, render(chunk)


def idempotency_key(key: str, suffix: str | None = None) -> str:
    """The ``Idempotency-Key`` to send: ``key`` (plus ``suffix``), hashed when over 128 characters."""
    full = f"{key}:{suffix}" if suffix else key
    if len(full) <= MAX_IDEMPOTENCY_KEY:
        return full
    return "lb-" + hashlib.sha256(full.encode()).hexdigest()


def _problem_detail(resp: httpx.Response) -> tuple[str | None, str]:
    """(vendor code, human message) from a Xero error body."""
    try:
        body = wire.loads(resp.content)
    except (ValueError, UnicodeDecodeError):
        return None, ""
    if not isinstance(body, dict):
        return None, ""
    if "Type" in body and "Message" in body:  # API error: ValidationException, QueryParseException...
        messages: list[str] = []
        for element in body.get("Elements") or []:
            if isinstance(element, dict):
                messages.extend(str(v.get("Message")) for v in element.get("ValidationErrors") or []
                                if isinstance(v, dict))
        text = str(body.get("Message") or "")
        if messages:
            text = f"{text}: {'; '.join(dict.fromkeys(messages))}"
        return (str(body["Type"]) if body.get("Type") else None), text
    if "Title" in body or "Detail" in body:  # identity layer problem
        return (str(body.get("Title")) if body.get("Title") else None), str(body.get("Detail") or "")
    return None, ""


class XeroClient:
    """One organisation's Xero API client, shared by the adapter's calls."""

    def __init__(
        self,
        settings: XeroSettings,
        tokens: TokenStore,
        *,
        transport: httpx.BaseTransport | None = None,
        stats: ApiStats | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        lock_factory: LockFactory | None = None,
        max_attempts: int = 8,
    ) -> None:
        self.settings = settings
        self.stats = stats if stats is not None else ApiStats()
        scale = settings.time_scale
        # Xero counts per organisation and app: every client of this process on the tenant shares one budget.
        self.budget = shared_budget(
            (VENDOR, settings.api_url, settings.tenant_id.lower(), fingerprint(settings.client_id), transport),
            lambda: RateBudget(
                [(settings.calls_per_minute, 60.0 / scale), (settings.calls_per_day, 86400.0 / scale)],
                settings.concurrency,
                sleep=sleep,
                monotonic=monotonic,
            ),
        )
        self._minute_pause = 5.0 / scale
        self._day_pause = 3600.0 / scale
        self._monotonic = monotonic
        self._quota_lock = threading.Lock()
        self._day_exhausted_until = 0.0
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
            time_scale=settings.time_scale,
        )
        self.http = VendorHttp(
            vendor=VENDOR,
            base_url=settings.api_url,
            budget=self.budget,
            stats=self.stats,
            auth=self.auth,
            headers={"xero-tenant-id": settings.tenant_id},
            timeout=settings.timeout_s,
            transport=transport,
            error_mapper=self._map_error,
            on_response=self._on_response,
            max_attempts=max_attempts,
            sleep=sleep,
        )

    def close(self) -> None:
        self.http.close()
        self.auth.close()

    # -- limits ------------------------------------------------------------------------------------
    def _on_response(self, resp: httpx.Response) -> None:
        day = resp.headers.get("X-DayLimit-Remaining")
        minute = resp.headers.get("X-MinLimit-Remaining")
        try:
            if day is not None and int(day) <= 0 and resp.status_code != 429:
                with self._quota_lock:
                    self._day_exhausted_until = self._monotonic() + self._day_pause
                log.warning("xero daily call allowance used up", tenant=self.settings.tenant_id)
            if minute is not None and int(minute) <= 0 and resp.status_code != 429:
                self.budget.pause(self._minute_pause)
            # Other connectors on this organisation (earlier runs, other jobs, other replicas) count in
            # Xero's windows and not in this budget's: take Xero's remaining counts as the ceiling.
            if minute is not None:
                self.budget.observe(int(minute), 0)
            if day is not None:
                self.budget.observe(int(day), 1)
        except ValueError:
            pass

    def _check_quota(self, method: str, path: str) -> None:
        with self._quota_lock:
            blocked = self._monotonic() < self._day_exhausted_until
        if blocked:
            raise QuotaExhaustedError("daily API limit used up for this organisation", vendor=VENDOR,
                                      status=429, code="day", method=method, path=path)

    def _map_error(self, resp: httpx.Response) -> ConnectorError | None:
        code, detail = _problem_detail(resp)
        kw: dict[str, Any] = {
            "vendor": VENDOR,
            "status": resp.status_code,
            "method": resp.request.method,
            "path": resp.request.url.path,
            "request_id": resp.headers.get("Xero-Correlation-Id"),
            "body": resp.text[:500],
        }
        status = resp.status_code
        if status == 429:
            problem = (resp.headers.get("X-Rate-Limit-Problem") or "").strip().lower()
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            if problem in {"day", "daily"}:
                with self._quota_lock:
                    wait = retry_after if retry_after is not None else self._day_pause
                    self._day_exhausted_until = self._monotonic() + wait
                return QuotaExhaustedError(f"daily API limit reached; resets in about {wait:.0f} s",
                                           code="day", **kw)
            return RateLimitedError(f"rate limited ({problem or 'unspecified'} limit)", retry_after=retry_after,
                                    code=problem or None, **kw)
        if status == 401:
            return AuthError(f"access token rejected: {detail or 'unauthorised'}", code=code, **kw)
        if status == 403:
            return AuthError("access to this organisation refused (check tenant_id and the granted scopes)",
                             code=code, **kw)
        if status == 400 and code == "ValidationException":
            return RecordError(detail or "validation failed", code=code, **kw)
        if status >= 500:
            return TransientError(detail or "server error", code=code,
                                  retry_after=parse_retry_after(resp.headers.get("Retry-After")), **kw)
        if status >= 400:
            return VendorError(detail or "request failed", code=code, **kw)
        return None

    # -- calls -------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotency_key: str | None = None,
        modified_since: dt.datetime | None = None,
    ) -> Any:
        """Send one API call (under the retry policy) and return the parsed JSON (decimals exact)."""
        self._check_quota(method, path)
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = wire.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        if modified_since is not None:
            since = modified_since if modified_since.tzinfo else modified_since.replace(tzinfo=dt.UTC)
            headers["If-Modified-Since"] = since.astimezone(dt.UTC).isoformat(timespec="seconds")
        write = method.upper() in {"POST", "PUT", "PATCH", "DELETE"}
        try:
            resp = self.http.request(
                method,
                path,
                params=params,
                content=content,
                headers=headers,
                replay_safe=bool(idempotency_key) if write else None,
            )
        except httpx.HTTPError as exc:  # request building (bad URL...), never a sent request
            raise VendorError(f"request not sent: {type(exc).__name__}", vendor=VENDOR, method=method,
                              path=path) from None
        try:
            return wire.loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise VendorError("response is not JSON", vendor=VENDOR, status=resp.status_code, method=method,
                              path=path, request_id=resp.headers.get("Xero-Correlation-Id")) from None

    def pages(
        self,
        path: str,
        key: str,
        *,
        params: Mapping[str, Any] | None = None,
        modified_since: dt.datetime | None = None,
        page_size: int | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Every page of a paged list (``page=1..``) until the last one."""
        size = page_size or self.settings.page_size
        page = 1
        seen_first: set[str] = set()
        while True:
            data = self.request("GET", path, params={**(params or {}), "page": page, "pageSize": size},
                                modified_since=modified_since)
            if not isinstance(data, dict):
                raise VendorError("unexpected list response", vendor=VENDOR, method="GET", path=path)
            records = [r for r in data.get(key) or [] if isinstance(r, dict)]
            if records:
                first = wire.dumps(records[0])
                if first in seen_first:
                    raise VendorError(f"paging loop detected at page {page}", vendor=VENDOR, method="GET",
                                      path=path)
                seen_first.add(first)
            yield records
            pagination = data.get("pagination")
            if isinstance(pagination, dict) and isinstance(pagination.get("pageCount"), int):
                if page >= pagination["pageCount"]:
                    return
            elif len(records) < size:
                return
            if not records:
                return
            page += 1

"""The QuickBooks Online HTTP client: OAuth2 with rotating refresh tokens, pacing, Faults, queries, CDC.

Every call goes through :class:`~connectors.http.VendorHttp` (one retry layer) on
``{base_url}/v3/company/{realmId}`` with ``minorversion``. Pacing is proactive (a
:class:`~connectors.http.RateBudget` of 500 requests a minute and 10 in flight per company) and reactive:
a throttle answer (HTTP 429, or 403 in older answers, with Fault ``SERVICE`` code 3001) pauses the budget for
``Retry-After`` when given, else ``throttle_wait_s`` (60 s, divided by ``time_scale``).

Faults are read from every answer, a 200 included: QuickBooks can carry a Fault in a 200. A
``ValidationFault`` is a :class:`~connectors.errors.RecordError` whose ``code`` is the QuickBooks code
(6240 duplicate name, 6140 duplicate DocNumber, 5010 stale object...). Writes carry ``requestid``: a
write resent with the same id is answered with the original response, so writes are replay-safe and the
retry layer may resend them.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import httpx
import structlog

from connectors.errors import (
    AmbiguousWriteError,
    AuthError,
    ConnectorError,
    RateLimitedError,
    RecordError,
    TransientError,
    VendorError,
)
from connectors.http import RateBudget, VendorHttp, parse_retry_after, shared_budget
from connectors.interfaces import ApiStats, TokenStore
from connectors.oauth import LockFactory, RotatingOAuth2
from connectors.quickbooks import wire
from connectors.quickbooks.settings import QuickBooksSettings

__all__ = ["CDC_MAX_OBJECTS", "CDC_WINDOW_DAYS", "VENDOR", "QuickBooksClient", "fault_errors", "request_id"]

log = structlog.get_logger("ledgerbridge.quickbooks")

VENDOR = "quickbooks"
MAX_REQUEST_ID = 50
CDC_WINDOW_DAYS = 30
CDC_MAX_OBJECTS = 1000
_NAMESPACE = uuid.UUID("5b0e8a4e-3f7c-4d8e-9a51-6c2f4f1d9e21")
_QUERY_ERRORS = {"4000", "4001", "4002"}


def request_id(key: str, suffix: str | None = None) -> str:
    """The ``requestid`` for an intent key (plus ``suffix``): itself when it fits in 50 characters, else a UUID5."""
    full = f"{key}-{suffix}" if suffix else key
    if len(full) <= MAX_REQUEST_ID:
        return full
    return str(uuid.uuid5(_NAMESPACE, full))


def fault_errors(body: Any) -> tuple[str | None, list[dict[str, str]]]:
    """(Fault type, errors as ``{code, message, detail, element}``) of an answer; (None, []) without a Fault.

    Both the documented ``{"Fault": {"Error": [...], "type"}}`` and the lower-case ``{"fault": {"error"}}``
    of some authentication answers are read.
    """
    if not isinstance(body, dict):
        return None, []
    fault = body.get("Fault") if isinstance(body.get("Fault"), dict) else body.get("fault")
    if not isinstance(fault, dict):
        return None, []
    raw = fault.get("Error") if isinstance(fault.get("Error"), list) else fault.get("error")
    errors: list[dict[str, str]] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        errors.append({
            "code": str(item.get("code") or item.get("Code") or ""),
            "message": str(item.get("Message") or item.get("message") or ""),
            "detail": str(item.get("Detail") or item.get("detail") or ""),
            "element": str(item.get("element") or item.get("Element") or ""),
        })
    kind = fault.get("type") or fault.get("Type")
    return (str(kind) if kind else None), errors


def _describe(errors: list[dict[str, str]]) -> str:
    parts = []
    for e in errors:
        text = e["detail"] or e["message"]
        if e["message"] and e["detail"] and not e["detail"].startswith(e["message"].split(":")[0]):
            text = f"{e['message']}: {e['detail']}"
        parts.append(f"{text} [{e['code']}]" if e["code"] else text)
    return "; ".join(parts) or "request failed"


class QuickBooksClient:
    """One company's QuickBooks Online API client, shared by the adapter's calls."""

    def __init__(
        self,
        settings: QuickBooksSettings,
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
        # QuickBooks counts per company (realm): every client of this process on the realm shares one budget.
        self.budget = shared_budget(
            (VENDOR, settings.api_url, settings.realm_id, transport),
            lambda: RateBudget([(settings.requests_per_minute, 60.0 / scale)], settings.concurrency,
                               sleep=sleep, monotonic=monotonic),
        )
        self._throttle_wait = settings.throttle_wait_s / scale
        self._clock = clock
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
            base_url=settings.api_url,
            budget=self.budget,
            stats=self.stats,
            auth=self.auth,
            timeout=settings.timeout_s,
            transport=transport,
            error_mapper=self._map_error,
            max_attempts=max_attempts,
            sleep=sleep,
        )

    def close(self) -> None:
        self.http.close()
        self.auth.close()

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC)

    # -- errors ------------------------------------------------------------------------------------
    def _error(self, resp: httpx.Response, body: Any) -> ConnectorError | None:
        kind, errors = fault_errors(body)
        codes = {e["code"] for e in errors}
        status = resp.status_code
        kw: dict[str, Any] = {
            "vendor": VENDOR,
            "status": status,
            "method": resp.request.method,
            "path": resp.request.url.path,
            "request_id": resp.headers.get("intuit_tid"),
            "body": resp.text[:500],
            "code": next(iter(sorted(codes)), None) if codes else None,
        }
        detail = _describe(errors)
        throttled = "3001" in codes or ((kind or "").upper() == "SERVICE" and "throttle" in detail.lower())
        if status == 429 or throttled:
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            return RateLimitedError("throttled (ThrottleExceeded)",
                                    retry_after=wait if wait is not None else self._throttle_wait, **kw)
        if status == 401:
            return AuthError(f"access token rejected: {detail}", **kw)
        if status == 403:
            return AuthError(f"access to this company refused (check realm_id and the granted scopes): {detail}",
                             **kw)
        if status >= 500:
            return TransientError(detail if errors else "server error",
                                  retry_after=parse_retry_after(resp.headers.get("Retry-After")), **kw)
        if not errors:
            return VendorError("request failed", **kw) if status >= 400 else None
        if codes & _QUERY_ERRORS:
            return VendorError(f"query refused: {detail}", **kw)
        if (kind or "") == "ValidationFault" or status == 400 or status == 200:
            # One record refused. QuickBooks puts the main code first; keep it.
            kw["code"] = errors[0]["code"] or kw["code"]
            return RecordError(detail, **kw)
        return VendorError(detail, **kw)

    def _map_error(self, resp: httpx.Response) -> ConnectorError | None:
        try:
            body = wire.loads(resp.content) if resp.content else None
        except (ValueError, UnicodeDecodeError):
            body = None
        return self._error(resp, body)

    # -- calls -------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        text: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Send one call (under the retry policy) and return the parsed JSON; a Fault (even in a 200) raises."""
        query: dict[str, Any] = {**(params or {}), "minorversion": self.settings.minor_version}
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = wire.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif text is not None:
            content = text.encode()
            headers["Content-Type"] = "application/text"
        if request_id:
            if len(request_id) > MAX_REQUEST_ID:
                raise ValueError("requestid is at most 50 characters")
            query["requestid"] = request_id
        write = method.upper() == "POST" and not path.endswith("/query")
        try:
            resp = self.http.request(method, path, params=query, content=content, headers=headers,
                                     replay_safe=bool(request_id) if write else True)
        except httpx.HTTPError as exc:  # request building (bad URL...), never a sent request
            raise VendorError(f"request not sent: {type(exc).__name__}", vendor=VENDOR, method=method,
                              path=path) from None
        except AmbiguousWriteError as exc:
            if write:
                raise
            # A query is sent as POST but changes nothing: running out of retries is only transient.
            raise TransientError(exc.detail, vendor=VENDOR, status=exc.status, method=method, path=path) from None
        try:
            data = wire.loads(resp.content)
        except (ValueError, UnicodeDecodeError):
            raise VendorError("response is not JSON", vendor=VENDOR, status=resp.status_code, method=method,
                              path=path, request_id=resp.headers.get("intuit_tid")) from None
        error = self._error(resp, data)
        if error is not None:
            raise error
        if not isinstance(data, dict):
            raise VendorError("unexpected response shape", vendor=VENDOR, status=resp.status_code, method=method,
                              path=path)
        return data

    def query(self, statement: str) -> dict[str, Any]:
        """One ``/query`` statement, sent as POST with ``Content-Type: application/text``; the QueryResponse."""
        data = self.request("POST", "/query", text=statement)
        response = data.get("QueryResponse")
        if not isinstance(response, dict):
            raise VendorError("query answered without a QueryResponse", vendor=VENDOR, method="POST", path="/query")
        return response

    def query_pages(self, entity: str, where: str | None = None, *, order: str = "Id",
                    page_size: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Every page of ``SELECT * FROM entity [WHERE ...] ORDERBY ...`` (STARTPOSITION 1, 1+n, ...)."""
        size = page_size or self.settings.page_size
        start = 1
        while True:
            statement = f"SELECT * FROM {entity}"  # noqa: S608 - a QuickBooks query, values quoted by the caller
            if where:
                statement += f" WHERE {where}"
            statement += f" ORDERBY {order} STARTPOSITION {start} MAXRESULTS {size}"
            response = self.query(statement)
            records = [r for r in response.get(entity) or [] if isinstance(r, dict)]
            if records:
                yield records
            if len(records) < size:
                return
            start += size

    def cdc(self, entities: list[str], since: dt.datetime) -> dict[str, list[dict[str, Any]]] | None:
        """Objects of ``entities`` changed since ``since`` (deleted ones as ``status: Deleted``).

        None when change data capture cannot answer completely: ``since`` is past the 30-day look-back, or
        the answer holds the maximum of 1,000 objects (then some changes may be missing from it, and only
        the paged query can give them all: CDC has no upper bound to shrink the window with).
        """
        if since < self.now() - dt.timedelta(days=CDC_WINDOW_DAYS) + dt.timedelta(minutes=5):
            return None
        data = self.request("GET", "/cdc", params={"entities": ",".join(entities),
                                                   "changedSince": wire.qbo_datetime(since)})
        out: dict[str, list[dict[str, Any]]] = {e: [] for e in entities}
        total = 0
        for block in data.get("CDCResponse") or []:
            responses = block.get("QueryResponse") if isinstance(block, dict) else None
            for response in responses if isinstance(responses, list) else []:
                if not isinstance(response, dict):
                    continue
                for entity in entities:
                    records = [r for r in response.get(entity) or [] if isinstance(r, dict)]
                    out[entity].extend(records)
                    total += len(records)
        if total >= CDC_MAX_OBJECTS:
            log.info("quickbooks change data capture answer is full; reading by query instead",
                     entities=entities, objects=total)
            return None
        return out

    def update(
        self,
        entity: str,
        record_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        key: str,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Read ``entity`` ``record_id``, POST ``change(current)`` (which carries Id and SyncToken), return it.

        A stale SyncToken (Fault 5010: someone changed the object in between) re-reads the object and sends
        the change once more, under a new ``requestid`` (the first one would replay the 5010 answer).
        """
        path = f"/{entity.lower()}"
        for attempt in range(2):
            current = self.request("GET", f"{path}/{record_id}").get(entity)
            if not isinstance(current, dict):
                raise VendorError(f"{entity} {record_id} answered without the object", vendor=VENDOR,
                                  method="GET", path=path)
            try:
                data = self.request("POST", path, params=params, body=change(current),
                                    request_id=request_id(key, f"u{attempt}" if attempt else None))
            except RecordError as exc:
                if exc.code == "5010" and attempt == 0:
                    log.info("quickbooks object changed meanwhile; re-reading", entity=entity, id=record_id)
                    continue
                raise
            result = data.get(entity)
            if not isinstance(result, dict):
                raise VendorError(f"{entity} update answered without the object", vendor=VENDOR, method="POST",
                                  path=path)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

"""The Salesforce REST client: wire formats, response models, OAuth, limits and error mapping.

Calls go through simple-salesforce (``Salesforce(instance_url=..., session_id=..., session=...)``) on a
``requests`` session of our own whose transport adapters never retry. :meth:`SalesforceClient.call` is the one
place a call is made: it paces it (:class:`~connectors.http.RateBudget`), counts it, runs it under
:func:`connectors.http.retrying`, and turns every simple-salesforce and requests exception into a
:mod:`connectors.errors` type.

Authentication
    The OAuth 2.0 refresh-token flow or the username-password flow against ``/services/oauth2/token``. A token
    response carries no ``expires_in`` (the session lasts as long as the org's session timeout and is extended by
    use), so the access token is used until Salesforce answers ``401 INVALID_SESSION_ID``; then it is renewed
    exactly once and the call is sent again. A connected app with refresh-token rotation returns a new refresh
    token, which is saved to the :class:`~connectors.interfaces.TokenStore` before the new access token is used.

Limits
    Every REST answer carries ``Sforce-Limit-Info: api-usage=N/MAX`` (the org's rolling 24-hour allocation).
    The usage is kept in :class:`SalesforceStats`; past ``slow_down_share`` calls are spaced out, and at
    ``daily_api_share`` the client stops with :class:`~connectors.errors.QuotaExhaustedError`. Salesforce
    itself refuses calls beyond the allocation with ``403 REQUEST_LIMIT_EXCEEDED`` (not 429): that is a
    :class:`~connectors.errors.QuotaExhaustedError` too, never retried. The same code with the
    ``ConcurrentRequests`` message (too many long-running calls in flight) is a rate limit and is retried.

Plain http
    simple-salesforce always builds ``https://`` URLs. With ``allow_http`` (sandboxes only) the client mounts
    :class:`PlainHttpAdapter` for the instance's origin, which sends those requests to the same host and port
    over http.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import structlog
from requests.adapters import HTTPAdapter
from simple_salesforce.api import Salesforce
from simple_salesforce.exceptions import SalesforceError

from connectors.errors import (
    AuthError,
    ConnectorError,
    QuotaExhaustedError,
    RateLimitedError,
    ReauthorizationRequired,
    TransientError,
    VendorError,
    redact,
)
from connectors.http import USER_AGENT, RateBudget, fingerprint, parse_retry_after, retrying, shared_budget
from connectors.interfaces import ApiStats, TokenStore
from connectors.salesforce.settings import SalesforceSettings

__all__ = [
    "ApiErrorItem",
    "DeletedRecords",
    "DescribeResult",
    "FieldInfo",
    "PlainHttpAdapter",
    "QueryPage",
    "SalesforceClient",
    "SalesforceStats",
    "SaveResult",
    "SfRecord",
    "TokenResponse",
    "UpdatedRecords",
    "dumps",
    "format_datetime",
    "is_salesforce_id",
    "loads",
    "mount_plain_http",
    "parse_date",
    "parse_datetime",
    "parse_deleted",
    "parse_describe",
    "parse_errors",
    "parse_limit_info",
    "parse_limits",
    "parse_query_page",
    "parse_save_results",
    "parse_token_response",
    "parse_updated",
    "soql_quote",
    "to_18",
]

log = structlog.get_logger("ledgerbridge.salesforce")
T = TypeVar("T")

VENDOR = "salesforce"
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)

# ------------------------------------------------------------------------------------------------------
# wire formats
# ------------------------------------------------------------------------------------------------------


def loads(data: bytes | str) -> Any:
    """Parse JSON with every non-integer number as a Decimal."""
    return json.loads(data, parse_float=Decimal)


def _number(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError("numbers must be finite")
    text = format(value, "f")
    return text.lstrip("-") if value.is_zero() else text


def _encode(obj: Any, out: list[str]) -> None:
    if obj is None:
        out.append("null")
    elif obj is True:
        out.append("true")
    elif obj is False:
        out.append("false")
    elif isinstance(obj, Decimal):
        out.append(_number(obj))
    elif isinstance(obj, int):
        out.append(str(obj))
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, dt.datetime):
        out.append(json.dumps(format_datetime(obj)))
    elif isinstance(obj, dt.date):
        out.append(json.dumps(obj.isoformat()))
    elif isinstance(obj, Mapping):
        out.append("{")
        for i, (key, value) in enumerate(obj.items()):
            if i:
                out.append(",")
            out.append(json.dumps(str(key), ensure_ascii=False))
            out.append(":")
            _encode(value, out)
        out.append("}")
    elif isinstance(obj, list | tuple):
        out.append("[")
        for i, value in enumerate(obj):
            if i:
                out.append(",")
            _encode(value, out)
        out.append("]")
    elif isinstance(obj, float):
        raise TypeError("floats are not written; use Decimal")
    else:
        raise TypeError(f"cannot encode {type(obj).__name__} as JSON")


def dumps(obj: Any) -> str:
    """JSON with Decimals written exactly (never through float), dates ISO, datetimes as Salesforce reads them."""
    out: list[str] = []
    _encode(obj, out)
    return "".join(out)


def format_datetime(value: dt.datetime) -> str:
    """UTC with milliseconds and ``Z``: ``2024-05-01T09:30:00.123Z`` (a valid SOQL literal and field value)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


_DT_RE = re.compile(
    r"^(?P<d>\d{4}-\d{2}-\d{2})T(?P<t>\d{2}:\d{2}(?::\d{2})?)(?P<f>\.\d+)?(?P<z>Z|[+-]\d{2}:?\d{2})?$"
)


def parse_datetime(value: Any) -> dt.datetime | None:
    """A UTC datetime from Salesforce's ``2024-05-01T09:30:00.000+0000`` (or ISO-8601 variants); None if unreadable."""
    if not isinstance(value, str):
        return None
    m = _DT_RE.match(value.strip())
    if m is None:
        return None
    frac = (m.group("f") or ".0")[1:7].ljust(6, "0")
    zone = m.group("z") or "Z"
    if zone == "Z":
        offset = dt.timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        offset = sign * dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    try:
        naive = dt.datetime.fromisoformat(f"{m.group('d')}T{m.group('t')}")
    except ValueError:
        return None
    return (naive.replace(microsecond=int(frac), tzinfo=dt.UTC) - offset).astimezone(dt.UTC)


def parse_date(value: Any) -> dt.date | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.date.fromisoformat(value.strip()[:10])
    except ValueError:
        return None


def soql_quote(value: str) -> str:
    """A SOQL string literal: quotes and backslashes escaped, control characters as escapes."""
    escaped = (value.replace("\\", "\\\\").replace("'", "\\'").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f"'{escaped}'"


_ID_RE = re.compile(r"^[a-zA-Z0-9]{15}(?:[A-Z0-5]{3})?$")
_CHECKSUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def to_18(record_id: str) -> str:
    """The 18-character, case-insensitive form of a 15-character Salesforce id (18-character ids unchanged)."""
    if len(record_id) == 18:
        return record_id
    if len(record_id) != 15:
        raise ValueError("a Salesforce id has 15 or 18 characters")
    suffix = ""
    for chunk in range(3):
        bits = 0
        for j, ch in enumerate(record_id[chunk * 5:chunk * 5 + 5]):
            if "A" <= ch <= "Z":
                bits |= 1 << j
        suffix += _CHECKSUM[bits]
    return record_id + suffix


def is_salesforce_id(value: str, prefix: str | None = None) -> bool:
    """True for a well-formed 15- or 18-character id (with ``prefix`` when given, e.g. ``006``)."""
    if not _ID_RE.match(value) or (prefix is not None and not value.startswith(prefix)):
        return False
    return len(value) == 15 or to_18(value[:15]) == value


# ------------------------------------------------------------------------------------------------------
# response models
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SfRecord:
    """One record of a query answer or a get: typed access to fields and relationship paths."""

    data: Mapping[str, Any]

    @property
    def type(self) -> str | None:
        attributes = self.data.get("attributes")
        return str(attributes.get("type")) if isinstance(attributes, Mapping) and attributes.get("type") else None

    @property
    def id(self) -> str:
        value = self.data.get("Id")
        if isinstance(value, str) and value:
            return value
        attributes = self.data.get("attributes")
        url = attributes.get("url") if isinstance(attributes, Mapping) else None
        return str(url).rstrip("/").rsplit("/", 1)[-1] if url else ""

    def get(self, path: str | None) -> Any:
        """The value at a field name or a relationship path (``Account.Name``); None when absent or null."""
        if not path:
            return None
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, Mapping):
                return None
            node = _get_ci(node, part)
        return node

    def text(self, path: str | None) -> str | None:
        value = self.get(path)
        if value is None or isinstance(value, Mapping | list):
            return None
        text = str(value).strip()
        return text or None

    def decimal(self, path: str | None) -> Decimal | None:
        value = self.get(path)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, Decimal):
            return value if value.is_finite() else None
        if isinstance(value, int):
            return Decimal(value)
        try:
            number = Decimal(str(value).strip())
        except ArithmeticError:
            return None
        return number if number.is_finite() else None

    def flag(self, path: str | None) -> bool:
        value = self.get(path)
        return value is True or (isinstance(value, str) and value.lower() == "true")

    def children(self, relationship: str) -> QueryPage:
        """A child relationship's records (an empty page when Salesforce answers null)."""
        value = self.get(relationship)
        if isinstance(value, Mapping):
            return parse_query_page(value)
        return QueryPage([], 0, True, None)


def _get_ci(node: Mapping[str, Any], key: str) -> Any:
    if key in node:
        return node[key]
    low = key.lower()
    for k, v in node.items():
        if k.lower() == low:
            return v
    return None


@dataclass(frozen=True)
class QueryPage:
    """One batch of a query: its records, the total size, and the ``nextRecordsUrl`` while not done."""

    records: list[SfRecord]
    total_size: int
    done: bool
    next_url: str | None


def _shape(what: str, body: Any = None) -> VendorError:
    return VendorError(f"unexpected {what} in the answer", vendor=VENDOR,
                       body=redact(str(body))[:300] if body is not None else None)


def parse_query_page(payload: Any) -> QueryPage:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("records"), list):
        raise _shape("query result", payload)
    records = [SfRecord(r) for r in payload["records"] if isinstance(r, Mapping)]
    done = payload.get("done") is not False
    nxt = payload.get("nextRecordsUrl")
    total = payload.get("totalSize")
    return QueryPage(records, int(total) if isinstance(total, int) else len(records), done,
                     str(nxt) if nxt and not done else None)


@dataclass(frozen=True)
class ApiErrorItem:
    """One error of Salesforce's error array (``errorCode``; ``statusCode`` in sObject Collections results)."""

    code: str
    message: str
    fields: tuple[str, ...] = ()


def parse_errors(payload: Any) -> list[ApiErrorItem]:
    """The errors of an error answer: REST arrays, collection results, OAuth errors or a 300's list of URLs."""
    if isinstance(payload, Mapping):
        if "error" in payload:  # OAuth token endpoint
            return [ApiErrorItem(str(payload.get("error")), str(payload.get("error_description") or ""))]
        if "errorCode" in payload or "statusCode" in payload:
            payload = [payload]
        elif isinstance(payload.get("errors"), list):
            payload = payload["errors"]
    if not isinstance(payload, list):
        return []
    out: list[ApiErrorItem] = []
    urls = [str(item) for item in payload if isinstance(item, str)]
    if urls:
        out.append(ApiErrorItem("MULTIPLE_CHOICES", "several records match: " + ", ".join(urls[:5])))
    for item in payload:
        if not isinstance(item, Mapping):
            continue
        code = item.get("errorCode") or item.get("statusCode") or "UNKNOWN"
        raw_fields = item.get("fields") or []
        fields = tuple(str(f) for f in raw_fields) if isinstance(raw_fields, list) else ()
        out.append(ApiErrorItem(str(code), str(item.get("message") or ""), fields))
    return out


@dataclass(frozen=True)
class SaveResult:
    """The outcome of one record of a create or an sObject Collections call."""

    id: str | None
    success: bool
    errors: tuple[ApiErrorItem, ...] = ()

    def message(self) -> str:
        return "; ".join(f"{e.code}: {e.message}" + (f" ({', '.join(e.fields)})" if e.fields else "")
                         for e in self.errors) or "not saved"


def parse_save_results(payload: Any) -> list[SaveResult]:
    items = [payload] if isinstance(payload, Mapping) else payload
    if not isinstance(items, list):
        raise _shape("save results", payload)
    out = []
    for item in items:
        if not isinstance(item, Mapping):
            raise _shape("save result", item)
        rid = item.get("id")
        out.append(SaveResult(str(rid) if rid else None, item.get("success") is True,
                              tuple(parse_errors(item.get("errors") or []))))
    return out


@dataclass(frozen=True)
class TokenResponse:
    """A token endpoint answer. It has no ``expires_in``; ``refresh_token`` only when the app rotates them."""

    access_token: str = field(repr=False)
    instance_url: str
    issued_at: int | None
    refresh_token: str | None = field(default=None, repr=False)
    identity_url: str | None = None
    token_type: str = "Bearer"
    scope: str | None = None


def parse_token_response(payload: Any) -> TokenResponse:
    if not isinstance(payload, Mapping) or not payload.get("access_token") or not payload.get("instance_url"):
        raise VendorError("token endpoint answered without an access token and instance URL", vendor=VENDOR)
    issued = payload.get("issued_at")
    refresh = payload.get("refresh_token")
    return TokenResponse(
        access_token=str(payload["access_token"]), instance_url=str(payload["instance_url"]).rstrip("/"),
        issued_at=int(issued) if isinstance(issued, str | int) and str(issued).isdigit() else None,
        refresh_token=str(refresh) if refresh else None,
        identity_url=str(payload["id"]) if payload.get("id") else None,
        token_type=str(payload.get("token_type") or "Bearer"),
        scope=str(payload["scope"]) if payload.get("scope") else None,
    )


@dataclass(frozen=True)
class FieldInfo:
    name: str
    type: str
    label: str = ""
    custom: bool = False
    updateable: bool = False
    length: int = 0
    reference_to: tuple[str, ...] = ()
    relationship_name: str | None = None


@dataclass(frozen=True)
class DescribeResult:
    name: str
    fields: dict[str, FieldInfo]

    def has(self, name: str) -> bool:
        low = name.lower()
        return any(k.lower() == low for k in self.fields)

    def field(self, name: str) -> FieldInfo | None:
        low = name.lower()
        return next((f for k, f in self.fields.items() if k.lower() == low), None)


def parse_describe(payload: Any) -> DescribeResult:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("fields"), list):
        raise _shape("describe result", payload)
    fields: dict[str, FieldInfo] = {}
    for f in payload["fields"]:
        if not isinstance(f, Mapping) or not f.get("name"):
            continue
        refs = f.get("referenceTo") or []
        fields[str(f["name"])] = FieldInfo(
            name=str(f["name"]), type=str(f.get("type") or ""), label=str(f.get("label") or ""),
            custom=f.get("custom") is True, updateable=f.get("updateable") is True,
            length=int(f["length"]) if isinstance(f.get("length"), int) else 0,
            reference_to=tuple(str(r) for r in refs) if isinstance(refs, list) else (),
            relationship_name=str(f["relationshipName"]) if f.get("relationshipName") else None,
        )
    return DescribeResult(str(payload.get("name") or ""), fields)


@dataclass(frozen=True)
class DeletedRecords:
    records: list[tuple[str, dt.datetime]]
    earliest_available: dt.datetime | None
    latest_covered: dt.datetime | None


def parse_deleted(payload: Any) -> DeletedRecords:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("deletedRecords"), list):
        raise _shape("deleted records", payload)
    out: list[tuple[str, dt.datetime]] = []
    for item in payload["deletedRecords"]:
        when = parse_datetime(item.get("deletedDate")) if isinstance(item, Mapping) else None
        if isinstance(item, Mapping) and item.get("id") and when is not None:
            out.append((str(item["id"]), when))
    return DeletedRecords(out, parse_datetime(payload.get("earliestDateAvailable")),
                          parse_datetime(payload.get("latestDateCovered")))


@dataclass(frozen=True)
class UpdatedRecords:
    ids: list[str]
    latest_covered: dt.datetime | None


def parse_updated(payload: Any) -> UpdatedRecords:
    if not isinstance(payload, Mapping) or not isinstance(payload.get("ids"), list):
        raise _shape("updated records", payload)
    return UpdatedRecords([str(i) for i in payload["ids"]], parse_datetime(payload.get("latestDateCovered")))


_USAGE_RE = re.compile(r"(?:^|[;,\s])(?P<name>[a-z-]+)=(?P<used>\d+)/(?P<max>\d+)")


def parse_limit_info(header: str | None) -> dict[str, tuple[int, int]]:
    """``Sforce-Limit-Info: api-usage=25/5000; per-app-api-usage=17/250(appName=x)`` -> {name: (used, max)}."""
    if not header:
        return {}
    return {m.group("name"): (int(m.group("used")), int(m.group("max"))) for m in _USAGE_RE.finditer(header)}


def parse_limits(payload: Any) -> dict[str, tuple[int, int]]:
    """``GET limits`` -> {limit name: (max, remaining)}."""
    if not isinstance(payload, Mapping):
        raise _shape("limits", payload)
    out: dict[str, tuple[int, int]] = {}
    for name, value in payload.items():
        if isinstance(value, Mapping) and isinstance(value.get("Max"), int) and isinstance(value.get("Remaining"),
                                                                                            int):
            out[str(name)] = (int(value["Max"]), int(value["Remaining"]))
    return out


# ------------------------------------------------------------------------------------------------------
# transport
# ------------------------------------------------------------------------------------------------------


class PlainHttpAdapter(HTTPAdapter):
    """A transport adapter that sends the ``https://`` requests it is mounted for over plain http.

    simple-salesforce builds every URL as ``https://<instance>``; a local sandbox listens on http. Mount this
    adapter on the session for the sandbox's https origin (:func:`mount_plain_http`); nothing else changes.
    It never retries, like the session's other adapters.
    """

    def __init__(self) -> None:
        super().__init__(max_retries=0)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        url = request.url or ""
        if url.startswith("https://"):
            request.url = "http://" + url[len("https://"):]
        return super().send(request, *args, **kwargs)


def mount_plain_http(session: requests.Session, origin: str) -> str:
    """Route ``https://`` requests for ``origin``'s host and port to it over http; returns the https origin."""
    parts = urlsplit(origin)
    https_origin = f"https://{parts.netloc}"
    session.mount(https_origin + "/", PlainHttpAdapter())
    return https_origin


# ------------------------------------------------------------------------------------------------------
# the client
# ------------------------------------------------------------------------------------------------------


@dataclass
class SalesforceStats(ApiStats):
    """Calls made, plus the org's API usage as the last ``Sforce-Limit-Info`` header reported it."""

    api_used: int | None = None
    api_max: int | None = None
    token_requests: int = 0
    slowed: int = 0


@dataclass(frozen=True)
class _Token:
    access_token: str = field(repr=False)
    instance_url: str
    refresh_token: str | None = field(default=None, repr=False)
    issued_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"access_token": self.access_token, "instance_url": self.instance_url,
                "refresh_token": self.refresh_token, "issued_at": self.issued_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Token | None:
        access, instance = data.get("access_token"), data.get("instance_url")
        refresh = data.get("refresh_token")
        if not isinstance(instance, str):
            return None
        issued = data.get("issued_at")
        return cls(access if isinstance(access, str) else "", instance,
                   refresh if isinstance(refresh, str) and refresh else None,
                   issued if isinstance(issued, int) else None)


def _raised_in(exc: BaseException, prefixes: tuple[str, ...]) -> bool:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    return module.startswith(prefixes)


class _SessionExpired(AuthError):
    """Internal: ``401 INVALID_SESSION_ID``; renewed once by :meth:`SalesforceClient.call`."""


class _InvalidGrant(AuthError):
    """Internal: the token endpoint refused the refresh token or the login."""


class SalesforceClient:
    """One org's API client: a requests session, the simple-salesforce object, tokens, pacing and limits."""

    def __init__(
        self,
        settings: SalesforceSettings,
        tokens: TokenStore,
        *,
        stats: SalesforceStats | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.tokens = tokens
        self.stats = stats if stats is not None else SalesforceStats()
        self._sleep = sleep
        self._monotonic = monotonic
        scale = settings.time_scale
        # One org's calls share one budget in this process: the org's address (or the login host until the
        # token names it) and the connected app and connection its tokens belong to.
        self.budget = shared_budget(
            (VENDOR, settings.api_origin or settings.login_url,
             fingerprint(f"{settings.client_id}\n{settings.connection_name}")),
            lambda: RateBudget([(max(1, round(settings.requests_per_second)), 1.0 / scale)],
                               settings.concurrency, sleep=sleep, monotonic=monotonic),
        )
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        # The transport never retries: connectors.http.retrying() is the one retry layer.
        for scheme in ("https://", "http://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=0, pool_maxsize=settings.concurrency))
        self.session.hooks["response"].append(self._on_response)
        self._local = threading.local()
        self._lock = threading.RLock()
        self._sf: Salesforce | None = None
        self._exhausted_until = 0.0
        self._exhausted: QuotaExhaustedError | None = None
        self._mounted: set[str] = set()

    def close(self) -> None:
        self.session.close()

    # -- responses and limits ----------------------------------------------------------------------
    def _on_response(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._local.last = resp
        usage = parse_limit_info(resp.headers.get("Sforce-Limit-Info")).get("api-usage")
        if usage is not None:
            self.stats.api_used, self.stats.api_max = usage

    def _last_response(self) -> requests.Response | None:
        last = getattr(self._local, "last", None)
        return last if isinstance(last, requests.Response) else None

    def usage_text(self, used: int | None = None, total: int | None = None) -> str:
        used = self.stats.api_used if used is None else used
        total = self.stats.api_max if total is None else total
        return f"DailyApiRequests {used}/{total}" if used is not None and total is not None else "DailyApiRequests"

    def _quota_error(self, method: str, path: str, *, status: int | None = None, used: int | None = None,
                     total: int | None = None) -> QuotaExhaustedError:
        message = (f"Salesforce daily API request limit exhausted ({self.usage_text(used, total)}); "
                   "the pipeline stops until it resets")
        return QuotaExhaustedError(message, vendor=VENDOR, status=status, code="REQUEST_LIMIT_EXCEEDED",
                                   method=method, path=path)

    def _before_call(self, method: str, path: str) -> None:
        """Stop at the allocation share this connector may use; space calls out when usage gets close."""
        s = self.settings
        with self._lock:
            if self._exhausted is not None and self._monotonic() < self._exhausted_until:
                raise self._exhausted
        used, total = self.stats.api_used, self.stats.api_max
        if used is None or not total:
            return
        share = used / total
        if share >= s.daily_api_share:
            if s.daily_api_share >= 1:
                raise self._quota_error(method, path)
            raise QuotaExhaustedError(
                f"Salesforce API usage is at {used}/{total} (DailyApiRequests), the {s.daily_api_share:.0%} of the "
                "daily allocation this pipeline may use; the pipeline stops until usage falls",
                vendor=VENDOR, code="DAILY_API_SHARE", method=method, path=path)
        if share >= s.slow_down_share and s.slow_down_pause_s > 0:
            self.stats.slowed += 1
            self.budget.pause(s.slow_down_pause_s / s.time_scale)

    # -- error mapping -----------------------------------------------------------------------------
    def map_status(self, status: int, body: Any, headers: Mapping[str, str], method: str, path: str
                   ) -> ConnectorError:
        """The connectors.errors type for one error answer."""
        items = parse_errors(body)
        first = items[0] if items else None
        code = first.code if first else None
        message = "; ".join(f"{e.message}" + (f" [{', '.join(e.fields)}]" if e.fields else "") for e in items) \
            or f"HTTP {status}"
        text = body if isinstance(body, str) else dumps(body) if body is not None else ""
        kw: dict[str, Any] = {"vendor": VENDOR, "status": status, "code": code, "method": method, "path": path,
                              "body": text[:500]}
        retry_after = parse_retry_after(headers.get("Retry-After"))
        if status == 401 and code == "INVALID_SESSION_ID":
            return _SessionExpired("session expired or invalid", **kw)
        if status == 403 and code == "REQUEST_LIMIT_EXCEEDED":
            if "concurrent" in message.lower():
                return RateLimitedError(message, retry_after=retry_after or 5.0 / self.settings.time_scale, **kw)
            usage = parse_limit_info(headers.get("Sforce-Limit-Info")).get("api-usage")
            # Without the header the allocation is used up by definition: report it as max/max.
            used, total = usage if usage else (self.stats.api_max, self.stats.api_max)
            return self._quota_error(method, path, status=status, used=used, total=total)
        if status == 429:
            return RateLimitedError(message, retry_after=retry_after, **kw)
        if status >= 500:
            return TransientError(message, retry_after=retry_after, **kw)
        if status in (401, 403):
            return AuthError(message, **kw)
        return VendorError(message, **kw)

    def _map_exception(self, exc: BaseException, method: str, path: str) -> ConnectorError | None:
        if isinstance(exc, SalesforceError):
            last = self._last_response()
            headers: Mapping[str, str] = last.headers if last is not None and last.status_code == exc.status else {}
            return self.map_status(int(exc.status), exc.content, headers, method, path)
        kw: dict[str, Any] = {"vendor": VENDOR, "method": method, "path": path}
        if isinstance(exc, requests.exceptions.JSONDecodeError | json.JSONDecodeError):
            return VendorError("the answer is not JSON", **kw)
        if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout
                      | requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError):
            # Reads are always safe to repeat; every write this connector makes sets absolute values or
            # treats "already exists" as done, so it is safe to repeat as well.
            return TransientError(f"transport failure: {type(exc).__name__}", **kw)
        if isinstance(exc, requests.exceptions.RequestException):
            return VendorError(f"request failed: {type(exc).__name__}", **kw)
        if isinstance(exc, ValueError | TypeError | KeyError | IndexError | AttributeError) and _raised_in(
                exc, ("simple_salesforce", "requests", "urllib3")):
            # The client library could not read the answer (or refused the request before sending it).
            return VendorError(f"unexpected answer or request: {type(exc).__name__}", **kw)
        return None

    # -- tokens ------------------------------------------------------------------------------------
    def _load_token(self) -> _Token | None:
        data = self.tokens.load(self.settings.connection_name)
        return _Token.from_dict(data) if data else None

    def _token_request(self, form: dict[str, str]) -> TokenResponse:
        url = self.settings.token_url
        path = urlsplit(url).path
        last_exc: ConnectorError | None = None
        for attempt in retrying(max_attempts=min(self.settings.max_attempts, 4), stats=self.stats, sleep=self._sleep):
            with attempt:
                mapped: ConnectorError | None = None
                resp: requests.Response | None = None
                self.stats.record("POST /services/oauth2/token")
                self.stats.token_requests += 1
                try:
                    resp = self.session.post(url, data=form, timeout=self.settings.timeout_s,
                                             headers={"Accept": "application/json"})
                except requests.exceptions.RequestException as exc:
                    mapped = self._map_exception(exc, "POST", path)
                if mapped is not None:
                    last_exc = mapped
                    raise mapped
                assert resp is not None
                try:
                    payload = loads(resp.content) if resp.content else None
                except ValueError:
                    payload = None
                if resp.status_code == 200:
                    return parse_token_response(payload)
                items = parse_errors(payload)
                code = items[0].code if items else None
                kw: dict[str, Any] = {"vendor": VENDOR, "status": resp.status_code, "code": code, "method": "POST",
                                      "path": path, "body": resp.text[:300]}
                if code == "invalid_grant":
                    raise _InvalidGrant("the token endpoint refused the grant", **kw)
                if resp.status_code == 429 or resp.status_code >= 500:
                    raise TransientError("token endpoint unavailable",
                                         retry_after=parse_retry_after(resp.headers.get("Retry-After")), **kw)
                raise AuthError("the token endpoint refused the client credentials or request", **kw)
        raise last_exc or AssertionError("unreachable")  # pragma: no cover

    def _grant(self, refresh_token: str | None) -> TokenResponse:
        s = self.settings
        form = {"client_id": s.client_id, "format": "json"}
        if s.client_secret is not None:
            form["client_secret"] = s.client_secret.get_secret_value()
        if s.auth == "password":
            password = (s.password.get_secret_value() if s.password else "") + (
                s.security_token.get_secret_value() if s.security_token else "")
            form.update(grant_type="password", username=s.username or "", password=password)
        else:
            if not refresh_token:
                raise ReauthorizationRequired("no refresh token stored or configured; authorise the connection",
                                              vendor=VENDOR, method="POST", path="/services/oauth2/token")
            form.update(grant_type="refresh_token", refresh_token=refresh_token)
        return self._token_request(form)

    def _exchange(self, refresh_token: str | None) -> _Token:
        """One grant; the new token set is saved before it is used (a rotated refresh token replaces the old)."""
        answer = self._grant(refresh_token)
        token = _Token(answer.access_token, answer.instance_url,
                       answer.refresh_token or (refresh_token if self.settings.auth == "refresh_token" else None),
                       answer.issued_at)
        self.tokens.save(self.settings.connection_name, token.to_dict())
        log.info("salesforce session renewed", connection=self.settings.connection_name,
                 rotated=answer.refresh_token is not None and answer.refresh_token != refresh_token)
        return token

    def _renew(self, stale: str | None) -> _Token:
        """A session other than ``stale``: another process's if it renewed already, else a new grant."""
        s = self.settings
        with self._lock, self.tokens.lock(s.connection_name):
            stored = self._load_token()
            if stored is not None and stored.access_token and stored.access_token != stale:
                return self._use(stored)
            initial = s.refresh_token.get_secret_value() if s.refresh_token else None
            refresh = (stored.refresh_token if stored is not None and stored.refresh_token else None) or initial
            try:
                return self._use(self._exchange(refresh))
            except _InvalidGrant as exc:
                if s.auth == "password":
                    raise AuthError("Salesforce refused the username-password login; check the credentials",
                                    vendor=VENDOR, status=exc.status, code=exc.code, method="POST",
                                    path="/services/oauth2/token") from None
            # The refresh token was refused: a sibling process may have rotated it meanwhile.
            again = self._load_token()
            if again is not None and again.refresh_token and again.refresh_token != refresh:
                if again.access_token and again.access_token != stale:
                    return self._use(again)
                try:
                    return self._use(self._exchange(again.refresh_token))
                except _InvalidGrant:
                    pass
            if initial and initial != refresh:
                # The stored token is dead but the configuration holds another one: the connection was
                # authorised again.
                try:
                    return self._use(self._exchange(initial))
                except _InvalidGrant:
                    pass
            log.error("salesforce refresh token rejected", connection=s.connection_name)
            raise ReauthorizationRequired("refresh token rejected; re-authorise the connection", vendor=VENDOR,
                                          status=400, code="invalid_grant", method="POST",
                                          path="/services/oauth2/token")

    def _use(self, token: _Token) -> _Token:
        s = self.settings
        origin = s.api_origin or token.instance_url
        parts = urlsplit(origin)
        if parts.scheme == "http":
            if not s.allow_http:
                raise AuthError("the token endpoint gave an http:// instance URL; https is required", vendor=VENDOR)
            https_origin = f"https://{parts.netloc}"
            if https_origin not in self._mounted:
                mount_plain_http(self.session, origin)
                self._mounted.add(https_origin)
        else:
            https_origin = f"https://{parts.netloc}"
        self._sf = Salesforce(instance_url=https_origin, session_id=token.access_token, session=self.session,
                              version=s.api_version, parse_float=Decimal, object_pairs_hook=dict)
        return token

    def _current(self) -> Salesforce:
        with self._lock:
            if self._sf is not None:
                return self._sf
            stored = self._load_token()
            if stored is not None and stored.access_token:
                self._use(stored)
            else:
                self._renew(None)
            assert self._sf is not None
            return self._sf

    @property
    def api_prefix(self) -> str:
        return f"/services/data/v{self.settings.api_version}/"

    # -- calls -------------------------------------------------------------------------------------
    def call(self, endpoint: str, fn: Callable[[Salesforce], T]) -> T:
        """Run one simple-salesforce call: paced, counted, retried on transient errors, errors mapped.

        ``endpoint`` (``"GET query"``) names the call in :attr:`stats`. A ``401 INVALID_SESSION_ID`` renews the
        session once and sends the call again; a second one is an :class:`~connectors.errors.AuthError`.
        """
        method, _, name = endpoint.partition(" ")
        path = self.api_prefix + name
        renewed = False
        for attempt in retrying(max_attempts=self.settings.max_attempts, stats=self.stats, sleep=self._sleep):
            with attempt:
                while True:
                    sf = self._current()
                    try:
                        return self._once(endpoint, method, path, fn, sf)
                    except _SessionExpired:
                        if renewed:
                            raise AuthError("Salesforce refused a renewed session (INVALID_SESSION_ID); "
                                            "check the integration user", vendor=VENDOR, status=401,
                                            code="INVALID_SESSION_ID", method=method, path=path) from None
                        self._renew(sf.session_id)
                        renewed = True
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, endpoint: str, method: str, path: str, fn: Callable[[Salesforce], T], sf: Salesforce) -> T:
        self._before_call(method, path)
        mapped: ConnectorError | None = None
        self.budget.acquire()
        try:
            self.stats.record(endpoint)
            try:
                return fn(sf)
            except Exception as exc:
                mapped = self._map_exception(exc, method, path)
                if mapped is None:
                    raise
        finally:
            self.budget.release()
        # Raised outside the except block so that no simple-salesforce or requests exception is chained to it.
        if isinstance(mapped, RateLimitedError):
            self.stats.rate_limited += 1
            if mapped.retry_after:
                self.budget.pause(mapped.retry_after)
        if isinstance(mapped, QuotaExhaustedError):
            with self._lock:
                self._exhausted = mapped
                self._exhausted_until = self._monotonic() + 3600.0 / self.settings.time_scale
            log.error("salesforce daily API allocation exhausted", usage=self.usage_text())
        raise mapped

    # -- the calls the adapter makes ---------------------------------------------------------------
    def query(self, soql: str, *, include_deleted: bool = False, batch_size: int | None = None) -> QueryPage:
        size = max(200, min(2000, batch_size or self.settings.query_batch_size))
        headers = {"Sforce-Query-Options": f"batchSize={size}"}
        endpoint = "GET queryAll" if include_deleted else "GET query"
        payload = self.call(endpoint, lambda sf: sf.query(soql, include_deleted=include_deleted, headers=headers,
                                                          timeout=self.settings.timeout_s))
        return parse_query_page(payload)

    def query_more(self, next_url: str) -> QueryPage:
        payload = self.call("GET query/next", lambda sf: sf.query_more(next_url, identifier_is_url=True,
                                                                       timeout=self.settings.timeout_s))
        return parse_query_page(payload)

    def query_all(self, soql: str, *, include_deleted: bool = False) -> Iterator[SfRecord]:
        page = self.query(soql, include_deleted=include_deleted)
        while True:
            yield from page.records
            if page.done or not page.next_url:
                return
            page = self.query_more(page.next_url)

    def rest(self, method: str, path: str, *, params: Mapping[str, str] | None = None, body: Any = None,
             endpoint: str | None = None) -> Any:
        """``restful(path)`` under :meth:`call`; the body is written with exact decimals."""
        data = dumps(body).encode("utf-8") if body is not None else None
        name = endpoint or path

        def run(sf: Salesforce) -> Any:
            return sf.restful(path, params=dict(params) if params else None, method=method, data=data,
                              timeout=self.settings.timeout_s)

        return self.call(f"{method} {name}", run)

    def tooling(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = dict(body) if body is not None else None
        return self.call(f"{method} tooling/{path}", lambda sf: sf.toolingexecute(
            path, method=method, data=data, timeout=self.settings.timeout_s))

    def limits(self) -> dict[str, tuple[int, int]]:
        return parse_limits(self.call("GET limits", lambda sf: sf.limits(timeout=self.settings.timeout_s)))

    def ids_in_chunks(self, ids: Sequence[str], size: int = 300) -> Iterator[list[str]]:
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), size):
            yield unique[i:i + size]

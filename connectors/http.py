"""The one HTTP and retry layer every connector uses.

- :class:`RateBudget` paces calls *before* they are sent (sliding windows plus a concurrency cap) and
  pauses when a vendor says so (``Retry-After``, limit headers at zero). :func:`shared_budget` hands the
  connectors of one process that reach the same vendor account one budget between them.
- :func:`retrying` is the single tenacity policy: it retries :class:`~connectors.errors.TransientError`
  (and so :class:`~connectors.errors.RateLimitedError`), waits what the vendor asked or an exponential
  backoff with full jitter, and re-raises the last error.
- :class:`VendorHttp` wraps one ``httpx.Client`` per connector instance: it counts calls, classifies
  transport failures and statuses into the error tree, and never retries a write that carries no
  idempotency key (such a failure is an :class:`~connectors.errors.AmbiguousWriteError`).

Vendor SDKs that do their own HTTP (hubspot-api-client) have their retries turned off and are wrapped in
:func:`retrying` by their adapter, so there is exactly one retry layer on every call path.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import httpx
import structlog
import tenacity

from connectors.errors import (
    AmbiguousWriteError,
    AuthError,
    ConnectorError,
    RateLimitedError,
    TransientError,
    VendorError,
)
from connectors.interfaces import ApiStats

__all__ = [
    "RateBudget",
    "VendorHttp",
    "backoff_jitter",
    "fingerprint",
    "forget_idle_budgets",
    "parse_retry_after",
    "retrying",
    "shared_budget",
]

log = structlog.get_logger("ledgerbridge.http")
T = TypeVar("T")

USER_AGENT = "ledgerbridge/0.1 (+https://github.com/ledgerbridge/ledgerbridge)"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds (fractions accepted) or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)


#: The real clock. A budget that sleeps and reads time with these may be shared (see :func:`shared_budget`);
#: one built with any other (a test's fake clock) never is.
_REAL_SLEEP = time.sleep
_REAL_MONOTONIC = time.monotonic


class RateBudget:
    """Client-side pacing for one (vendor, account): sliding windows and a concurrency cap.

    ``windows`` is a list of ``(limit, seconds)``. :meth:`acquire` blocks until a call fits in every
    window and no pause is in force; :meth:`pause` is called when the vendor says to wait.

    A vendor's limit belongs to its account (a Xero tenant, a QuickBooks realm, a HubSpot token...), not to
    a connector instance, and the daemon runs several jobs, each with its own connectors, at once. So the
    connectors build their budgets through :func:`shared_budget`: every connector of the process that reaches
    the same account with the same limits paces its calls, counts its concurrency and takes the vendor's
    remaining counts (:meth:`observe`) and pauses in the one budget they share.
    """

    def __init__(
        self,
        windows: list[tuple[int, float]],
        concurrency: int | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        slack: float = 0.05,
    ) -> None:
        # ``slack`` widens every window a little: the vendor starts counting when a request *arrives*,
        # after we sent it, so a window that frees exactly on our clock may not yet have freed on theirs.
        self.windows = [(limit, seconds + slack) for limit, seconds in windows]
        self.concurrency = concurrency or None
        self._hits: list[deque[float]] = [deque() for _ in windows]
        self._lock = threading.Lock()
        self._sem = threading.BoundedSemaphore(concurrency) if concurrency else None
        self._paused_until = 0.0
        self._sleep = sleep
        self._now = monotonic
        self.waited = 0.0

    @property
    def on_real_clock(self) -> bool:
        """True when the budget sleeps and reads time on the real clock (the defaults): it may be shared."""
        return self._sleep is _REAL_SLEEP and self._now is _REAL_MONOTONIC

    @property
    def limits(self) -> tuple[tuple[tuple[int, float], ...], int | None]:
        """The windows (slack included) and the concurrency cap: what a shared budget's key carries."""
        return tuple(self.windows), self.concurrency

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._now() + seconds)

    def _wait_needed(self, now: float) -> float:
        wait = max(self._paused_until - now, 0.0)
        for (limit, seconds), hits in zip(self.windows, self._hits, strict=True):
            while hits and hits[0] <= now - seconds:
                hits.popleft()
            if len(hits) >= limit:
                wait = max(wait, hits[0] + seconds - now)
        return wait

    def remaining(self) -> int:
        """Calls that fit in every window right now (0 while paused); reads the budget, changes nothing."""
        with self._lock:
            now = self._now()
            if self._paused_until > now:
                return 0
            return max(min(limit - sum(1 for hit in hits if hit > now - seconds)
                           for (limit, seconds), hits in zip(self.windows, self._hits, strict=True)), 0)

    def holds_calls(self) -> bool:
        """True while a pause is in force or some window still counts a call: the budget knows something a
        fresh one would not."""
        with self._lock:
            now = self._now()
            return self._paused_until > now or any(
                hits and hits[-1] > now - seconds for (_limit, seconds), hits in zip(self.windows, self._hits,
                                                                                     strict=True))

    def observe(self, remaining: int, window: int = 0) -> None:
        """The vendor says ``remaining`` calls are left in its ``window``-th window (its limit headers).

        Calls made by other processes or other instances on the same account count there and not here:
        the local count is raised to match, so a new instance does not burst into a window others used.
        When those calls were made is unknown; they are spread evenly over the window, so that the budget
        frees them as a sliding window would on average (all at once "now" would hold a whole window back).
        """
        with self._lock:
            now = self._now()
            limit, seconds = self.windows[window]
            hits = self._hits[window]
            while hits and hits[0] <= now - seconds:
                hits.popleft()
            missing = (limit - max(remaining, 0)) - len(hits)
            if missing > 0:
                step = seconds / (missing + 1)
                unknown = [now - seconds + step * (i + 1) for i in range(missing)]
                self._hits[window] = deque(sorted([*hits, *unknown]))

    def acquire(self) -> None:
        if self._sem is not None:
            self._sem.acquire()
        while True:
            with self._lock:
                now = self._now()
                wait = self._wait_needed(now)
                if wait <= 0:
                    for hits in self._hits:
                        hits.append(now)
                    return
            self.waited += wait
            self._sleep(min(wait, 5.0) + 0.001)

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()


_shared_lock = threading.Lock()
_shared: weakref.WeakValueDictionary[tuple[Hashable, ...], RateBudget] = weakref.WeakValueDictionary()
#: Budgets kept after their last connector has gone, for as long as their windows still count calls: the
#: daemon's runs follow one another with new connectors, and a run must see the calls of the run before it.
_recent: dict[tuple[Hashable, ...], RateBudget] = {}


def fingerprint(value: str) -> str:
    """A stand-in for a credential or an account name in a budget key: its SHA-256, never the value itself."""
    return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()


def shared_budget(key: tuple[Hashable, ...], factory: Callable[[], RateBudget]) -> RateBudget:
    """The process's one budget for ``key``: the budget ``factory`` builds, or the one already built for it.

    ``key`` names the account the vendor's limit applies to, e.g. ``("xero", api_url, tenant_id,
    fingerprint(client_id), transport)``: the vendor, the API address (two sandboxes on two ports are two
    accounts), the account identity (credentials only through :func:`fingerprint`), the limit's kind where
    a vendor has several, and the injected ``httpx`` transport where there is one (each in-process sandbox
    transport is an account of its own). The budget's limits (its windows and concurrency cap) are added to the key:
    connectors configured with other limits for the same account get a budget of their own.

    Only budgets on the real clock are shared. ``factory`` is called every time and its budget is returned
    as it is, unshared, when it sleeps or reads time any other way (a test's fake clock), so that such
    budgets stay isolated. Otherwise the first budget registered under the key is returned. A budget lives
    while a connector refers to it or its windows still count calls (so consecutive runs, each with new
    connectors, see each other's calls); after that it is dropped, and the next connector for that account
    starts with a fresh budget, which is then no different.
    """
    budget = factory()
    if not budget.on_real_clock:
        return budget
    full = (*key, budget.limits)
    with _shared_lock:
        # An empty budget is no different from a fresh one: drop it (nothing here keeps it alive after).
        for stale in [k for k, b in _recent.items() if not b.holds_calls()]:
            del _recent[stale]
        existing = _shared.get(full)
        if existing is not None:
            _recent[full] = existing
            return existing
        _shared[full] = _recent[full] = budget
        return budget


def forget_idle_budgets() -> None:
    """Drop every budget no connector refers to any more, whatever its windows still count (test isolation:
    a sandbox behind a reused address is a new account)."""
    with _shared_lock:
        _recent.clear()


def backoff_jitter(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0, min(cap, base * 2 ** max(attempt - 1, 0)))


class _Wait(tenacity.wait.wait_base):
    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        if isinstance(exc, TransientError) and exc.retry_after is not None:
            # The vendor told us when; add a little jitter so parallel workers do not stampede.
            return min(exc.retry_after, 3600.0) + random.uniform(0, 0.05)
        return backoff_jitter(retry_state.attempt_number, self.base, self.cap)


def _before_sleep(retry_state: tenacity.RetryCallState) -> None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
    log.warning(
        "retrying",
        attempt=retry_state.attempt_number,
        wait_s=round(wait, 3),
        error=str(exc) if exc else None,
    )


def retrying(
    *,
    max_attempts: int = 8,
    max_delay: float = 600.0,
    base: float = 0.5,
    cap: float = 30.0,
    stats: ApiStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tenacity.Retrying:
    """The retry policy: transient errors only, vendor-requested waits honoured, last error re-raised."""

    def before_sleep(rs: tenacity.RetryCallState) -> None:
        if stats is not None:
            stats.retries += 1
        _before_sleep(rs)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        wait=_Wait(base, cap),
        stop=tenacity.stop_after_attempt(max_attempts) | tenacity.stop_after_delay(max_delay),
        before_sleep=before_sleep,
        reraise=True,
        sleep=sleep,
    )


ErrorMapper = Callable[[httpx.Response], ConnectorError | None]


class VendorHttp:
    """One ``httpx.Client`` for one connector instance, with pacing, counting and error mapping.

    ``error_mapper`` turns a vendor's error body into the right error type; when it returns None the
    generic status mapping applies (429 -> RateLimitedError, 5xx -> TransientError, 401/403 ->
    AuthError, other 4xx -> VendorError).
    """

    def __init__(
        self,
        *,
        vendor: str,
        base_url: str,
        budget: RateBudget | None = None,
        stats: ApiStats | None = None,
        auth: httpx.Auth | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        error_mapper: ErrorMapper | None = None,
        on_response: Callable[[httpx.Response], None] | None = None,
        max_attempts: int = 8,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.vendor = vendor
        self.budget = budget
        self.stats = stats or ApiStats()
        self.error_mapper = error_mapper
        self.on_response = on_response
        self.max_attempts = max_attempts
        self._sleep = sleep
        self.client = httpx.Client(
            base_url=base_url,
            auth=auth,
            headers={"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
        )

    def close(self) -> None:
        self.client.close()

    def _error(self, resp: httpx.Response) -> ConnectorError:
        mapped = self.error_mapper(resp) if self.error_mapper else None
        if mapped is not None:
            return mapped
        kw: dict[str, Any] = {
            "vendor": self.vendor,
            "status": resp.status_code,
            "method": resp.request.method,
            "path": resp.request.url.path,
            "body": resp.text[:500],
        }
        if resp.status_code == 429:
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            return RateLimitedError("rate limited", retry_after=wait, **kw)
        if resp.status_code >= 500:
            return TransientError("server error", retry_after=parse_retry_after(resp.headers.get("Retry-After")), **kw)
        if resp.status_code in (401, 403):
            return AuthError("not authorised", **kw)
        return VendorError("request failed", **kw)

    def _send_once(self, request: httpx.Request, *, write: bool, replay_safe: bool) -> httpx.Response:
        endpoint = f"{request.method} {request.url.path}"
        if self.budget is not None:
            self.budget.acquire()
        try:
            self.stats.record(endpoint)
            try:
                resp = self.client.send(request)
            except httpx.ConnectError as exc:
                # Nothing reached the server: always safe to retry.
                raise TransientError(f"connect failed: {type(exc).__name__}", vendor=self.vendor,
                                     method=request.method, path=request.url.path) from None
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                msg = f"no response: {type(exc).__name__}"
                if write and not replay_safe:
                    raise AmbiguousWriteError(msg, vendor=self.vendor, method=request.method,
                                              path=request.url.path) from None
                raise TransientError(msg, vendor=self.vendor, method=request.method,
                                     path=request.url.path) from None
        finally:
            if self.budget is not None:
                self.budget.release()
        if self.on_response is not None:
            self.on_response(resp)
        if resp.status_code >= 400:
            err = self._error(resp)
            if isinstance(err, RateLimitedError):
                self.stats.rate_limited += 1
                if self.budget is not None and err.retry_after:
                    self.budget.pause(err.retry_after)
            if write and not replay_safe and isinstance(err, TransientError) and resp.status_code >= 500:
                raise AmbiguousWriteError(str(err.detail), vendor=self.vendor, status=resp.status_code,
                                          method=request.method, path=request.url.path)
            raise err
        return resp

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        replay_safe: bool | None = None,
    ) -> httpx.Response:
        """Send a request under the retry policy and return the successful response.

        Reads are always retried. A write is retried only when ``replay_safe`` (it carries an
        idempotency key the vendor honours, or is naturally idempotent like a PATCH of absolute values);
        otherwise an unanswered write raises :class:`AmbiguousWriteError` at once.
        """
        write = method.upper() in {"POST", "PUT", "PATCH", "DELETE"}
        safe = (not write) if replay_safe is None else replay_safe
        # Built once: every retry sends the identical body and headers (idempotency key included).
        request = self.client.build_request(method, url, params=params, json=json, content=content, headers=headers)
        last: list[ConnectorError] = []

        def attempt() -> httpx.Response:
            try:
                return self._send_once(request, write=write, replay_safe=safe)
            except ConnectorError as exc:
                last[:] = [exc]
                raise

        try:
            for att in retrying(max_attempts=self.max_attempts, stats=self.stats, sleep=self._sleep):
                with att:
                    return attempt()
        except TransientError as exc:
            if write:
                # Retries ran out on a write: whether it was applied is unknown.
                raise AmbiguousWriteError(f"gave up after retries: {exc.detail}", vendor=self.vendor,
                                          status=exc.status, method=method, path=request.url.path) from None
            raise
        raise AssertionError("unreachable")  # pragma: no cover

"""OAuth2 with single-use, rotating refresh tokens, as an ``httpx.Auth``.

Xero (and QuickBooks Online) hand out a new refresh token on every refresh and invalidate the old one.
Losing the new token breaks the connection until a person re-authorises it, so this module follows
one strict order:

1. take the refresh lock (in-process, plus an optional cross-process lock from ``lock_factory``);
2. re-read the :class:`~connectors.interfaces.TokenStore`: another thread or process may have refreshed
   already, in which case its access token is used and no refresh happens;
3. call the token endpoint (client authentication through HTTP Basic);
4. save the new token set to the store, and only then use the new access token.

On ``invalid_grant`` the store is read again: if it now holds a different refresh token, another process
won the race and that token set is used (or refreshed once more when its access token is stale).
Otherwise the connection needs a person: :class:`~connectors.errors.AuthError` is raised, never a loop.
The person re-authorises the connection and configures the new refresh token: every stored token set
remembers a fingerprint of the configured refresh token its chain started from (``origin``), so a
configured token that differs from it replaces the stored chain.

A token expiring within ``margin_s`` is refreshed before the request; a 401 answer triggers one forced
refresh and one re-send. Token values never reach a log line or an error message.

The stored token set is a dict with ``access_token``, ``refresh_token``, ``expires_at`` (epoch seconds),
``token_type``, ``scope`` and ``origin``.
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from pydantic import SecretStr

from connectors.errors import (
    AuthError,
    ConnectorError,
    ReauthorizationRequired,
    TransientError,
    VendorError,
    redact,
)
from connectors.http import USER_AGENT, parse_retry_after
from connectors.interfaces import ApiStats, TokenStore

__all__ = ["LockFactory", "RotatingOAuth2", "TokenSet"]

log = structlog.get_logger("ledgerbridge.oauth")

LockFactory = Callable[[str], AbstractContextManager[object]]


@dataclass(frozen=True)
class TokenSet:
    """One access token with the refresh token that replaces it. ``expires_at`` is epoch seconds."""

    access_token: str
    refresh_token: str
    expires_at: float
    token_type: str = "Bearer"
    scope: str | None = None
    #: Fingerprint of the configured refresh token this chain of rotated tokens started from (None: unknown).
    origin: str | None = None

    def __repr__(self) -> str:
        return f"TokenSet(expires_at={self.expires_at!r}, token_type={self.token_type!r})"

    def fresh(self, now: float, margin: float) -> bool:
        """True when the access token is still valid ``margin`` seconds from ``now``."""
        return bool(self.access_token) and self.expires_at - margin > now

    def to_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "expires_at": self.expires_at,
            "token_type": self.token_type,
            "scope": self.scope,
            "origin": self.origin,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet | None:
        refresh = data.get("refresh_token")
        if not isinstance(refresh, str) or not refresh:
            return None
        access = data.get("access_token")
        try:
            expires_at = float(data.get("expires_at") or 0.0)
        except (TypeError, ValueError):
            expires_at = 0.0
        scope = data.get("scope")
        origin = data.get("origin")
        return cls(
            access_token=access if isinstance(access, str) else "",
            refresh_token=refresh,
            expires_at=expires_at,
            token_type=str(data.get("token_type") or "Bearer"),
            scope=scope if isinstance(scope, str) else None,
            origin=origin if isinstance(origin, str) else None,
        )


def _secret(value: SecretStr | str | None) -> str | None:
    if value is None:
        return None
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class RotatingOAuth2(httpx.Auth):
    """Bearer auth that refreshes a rotating refresh token safely.

    ``connection`` names the token set in ``store`` (e.g. ``"xero:<pipeline>"``). ``initial_refresh_token``
    (from the config) is used only while the store holds nothing for the connection. ``now`` is the
    clock used for expiry; against a sandbox whose clock runs ``time_scale`` times faster than ``now``,
    lifetimes and the margin shrink by that factor. ``transport`` is used for the token endpoint calls
    (tests pass the sandbox's transport).
    """

    requires_response_body = False

    def __init__(
        self,
        *,
        vendor: str,
        token_url: str,
        client_id: str,
        client_secret: SecretStr | str,
        connection: str,
        store: TokenStore,
        initial_refresh_token: SecretStr | str | None = None,
        margin_s: float = 300.0,
        now: Callable[[], float] = time.time,
        stats: ApiStats | None = None,
        lock_factory: LockFactory | None = None,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
        extra_params: Mapping[str, str] | None = None,
        time_scale: float = 1.0,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.vendor = vendor
        self.time_scale = time_scale
        self.token_url = token_url
        self.connection = connection
        self.store = store
        self.margin_s = margin_s
        self.stats = stats if stats is not None else ApiStats()
        self._client_id = client_id
        self._client_secret = SecretStr(_secret(client_secret) or "")
        initial = _secret(initial_refresh_token)
        self._initial_refresh = SecretStr(initial) if initial else None
        self._now = now
        self._lock = threading.Lock()
        # Without an explicit factory, the token store's own lock (cross-process for the state store).
        self._lock_factory: LockFactory = lock_factory or store.lock
        self._extra = dict(extra_params or {})
        self._cached: TokenSet | None = None
        self._endpoint = f"POST {urlsplit(token_url).path or '/'}"
        self._http = httpx.Client(
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"RotatingOAuth2(vendor={self.vendor!r}, connection={self.connection!r})"

    def close(self) -> None:
        self._http.close()

    # -- httpx.Auth --------------------------------------------------------------------------------
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self.token()
        request.headers["Authorization"] = f"Bearer {token.access_token}"
        response = yield request
        if response.status_code == 401:
            # The token may have been revoked or the clocks disagree: refresh once, re-send once.
            token = self.token(stale_access_token=token.access_token)
            request.headers["Authorization"] = f"Bearer {token.access_token}"
            yield request

    # -- token management --------------------------------------------------------------------------
    def token(self, *, stale_access_token: str | None = None) -> TokenSet:
        """A usable token set, refreshing when it expires within the margin or is ``stale_access_token``."""
        cached = self._cached
        if cached is not None and self._usable(cached, stale_access_token):
            return cached
        with self._lock, self._lock_factory(self.connection):
            # Re-check under the lock: another thread or process may have refreshed meanwhile.
            stored = self._load()
            configured = self._configured_origin()
            if stored is not None and configured is not None and stored.origin not in (None, configured):
                # The connection was authorised again and its new refresh token configured: start from it.
                log.info("oauth refresh token in the config is new; it replaces the stored token set",
                         connection=self.connection)
                return self._refresh_locked(self._initial_token(), stale_access_token, configured)
            if stored is not None and self._usable(stored, stale_access_token):
                self._cached = stored
                return stored
            if stored is not None:
                return self._refresh_locked(stored.refresh_token, stale_access_token, stored.origin or configured)
            return self._refresh_locked(self._initial_token(), stale_access_token, configured)

    def _configured_origin(self) -> str | None:
        """Fingerprint of the configured refresh token (never the token itself): tells a new one apart."""
        if self._initial_refresh is None:
            return None
        return hashlib.sha256(self._initial_refresh.get_secret_value().encode()).hexdigest()[:16]

    def _usable(self, token: TokenSet, stale: str | None) -> bool:
        return token.fresh(self._now(), self.margin_s / self.time_scale) and token.access_token != stale

    def _initial_token(self) -> str:
        if self._initial_refresh is None:
            raise ReauthorizationRequired(
                "no refresh token stored or configured; authorise the connection",
                vendor=self.vendor,
                method="POST",
                path=self.token_url,
            )
        return self._initial_refresh.get_secret_value()

    def _load(self) -> TokenSet | None:
        data = self.store.load(self.connection)
        return TokenSet.from_dict(data) if data else None

    def _refresh_locked(self, refresh_token: str, stale: str | None, origin: str | None) -> TokenSet:
        try:
            return self._exchange(refresh_token, origin)
        except _InvalidGrant:
            pass
        # The refresh token was refused. A sibling process may have rotated it: look again.
        stored = self._load()
        if stored is not None and stored.refresh_token != refresh_token:
            log.info("oauth refresh token changed in the store; using it", connection=self.connection)
            if self._usable(stored, stale):
                self._cached = stored
                return stored
            try:
                return self._exchange(stored.refresh_token, stored.origin or origin)
            except _InvalidGrant:
                pass
        self._cached = None
        log.error("oauth refresh token rejected", connection=self.connection, vendor=self.vendor)
        raise ReauthorizationRequired(
            "refresh token rejected; re-authorise the connection",
            vendor=self.vendor,
            status=400,
            code="invalid_grant",
            method="POST",
            path=self.token_url,
        )

    def _exchange(self, refresh_token: str, origin: str | None) -> TokenSet:
        """One call to the token endpoint; saves the new token set before returning it."""
        basic = base64.b64encode(
            f"{self._client_id}:{self._client_secret.get_secret_value()}".encode()
        ).decode("ascii")
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **self._extra}
        self.stats.record(self._endpoint)
        self.refreshes += 1
        started = self._now()
        try:
            resp = self._http.post(self.token_url, data=data, headers={"Authorization": f"Basic {basic}"})
        except httpx.HTTPError as exc:
            raise TransientError(
                f"token endpoint unreachable: {type(exc).__name__}",
                vendor=self.vendor,
                method="POST",
                path=self.token_url,
            ) from None
        if resp.status_code != 200:
            raise self._error(resp)
        try:
            payload = resp.json()
            access = str(payload["access_token"])
            expires_in = float(payload.get("expires_in") or 0)
        except (ValueError, KeyError, TypeError):
            raise VendorError(
                "token endpoint answered without a usable token",
                vendor=self.vendor,
                status=resp.status_code,
                method="POST",
                path=self.token_url,
            ) from None
        new_refresh = payload.get("refresh_token")
        token = TokenSet(
            access_token=access,
            refresh_token=str(new_refresh) if new_refresh else refresh_token,
            expires_at=started + expires_in / self.time_scale,
            token_type=str(payload.get("token_type") or "Bearer"),
            scope=str(payload["scope"]) if payload.get("scope") else None,
            origin=origin,
        )
        # Persist first: the old refresh token is now dead, the new one exists only in memory.
        self.store.save(self.connection, token.to_dict())
        self._cached = token
        log.info("oauth token refreshed", connection=self.connection, vendor=self.vendor,
                 expires_in_s=round(expires_in))
        return token

    def _error(self, resp: httpx.Response) -> ConnectorError:
        code: str | None = None
        try:
            body = resp.json()
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                code = body["error"]
        except ValueError:
            body = None
        kw: dict[str, Any] = {
            "vendor": self.vendor,
            "status": resp.status_code,
            "code": code,
            "method": "POST",
            "path": self.token_url,
            "body": redact(resp.text[:300]),
        }
        if code == "invalid_grant":
            return _InvalidGrant("refresh token rejected", **kw)
        if code in {"invalid_client", "unauthorized_client"} or resp.status_code in (401, 403):
            return AuthError("client credentials rejected by the token endpoint", **kw)
        if resp.status_code == 429 or resp.status_code >= 500:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            return TransientError("token endpoint unavailable", retry_after=retry_after, **kw)
        return VendorError("token request failed", **kw)


class _InvalidGrant(AuthError):
    """Internal: the token endpoint refused the refresh token (``invalid_grant``)."""

"""RotatingOAuth2 against the Xero sandbox's token endpoint (single-use refresh tokens)."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from connectors.errors import AuthError, ReauthorizationRequired
from connectors.interfaces import ApiStats
from connectors.oauth import RotatingOAuth2
from connectors.xero.sandbox import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, XeroSandbox
from connectors.xero.testing import ManualClock, MemoryTokenStore

CONN = "xero:test"
TOKEN_URL = "https://identity.xero.com/connect/token"


class _Product:
    def __init__(self, sku: str, price: str, rate: str) -> None:
        self.sku, self.name, self.unit_price, self.tax_rate = sku, f"Produit {sku}", Decimal(price), Decimal(rate)


ITEMS = [_Product("SVC-1", "100", "20")]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sandbox(clock: ManualClock) -> XeroSandbox:
    return XeroSandbox(clock=clock, items=ITEMS)


def _auth(sandbox: XeroSandbox, store: MemoryTokenStore, refresh: str | None, clock: ManualClock,
          **kw: Any) -> RotatingOAuth2:
    return RotatingOAuth2(
        vendor="xero", token_url=TOKEN_URL, client_id=DEMO_CLIENT_ID, client_secret=DEMO_CLIENT_SECRET,
        connection=CONN, store=store, initial_refresh_token=refresh, now=clock.now,
        transport=sandbox.transport(), **kw,
    )


def _client(sandbox: XeroSandbox, auth: RotatingOAuth2, statuses: list[int] | None = None) -> httpx.Client:
    hooks = {"response": [lambda r: statuses.append(r.status_code)]} if statuses is not None else {}
    return httpx.Client(base_url="https://api.xero.com", transport=sandbox.transport(), auth=auth,
                        event_hooks=hooks)


def _refresh_raw(sandbox: XeroSandbox, refresh: str) -> httpx.Response:
    with httpx.Client(transport=sandbox.transport()) as c:
        return c.post(TOKEN_URL, data={"grant_type": "refresh_token", "refresh_token": refresh},
                      auth=(DEMO_CLIENT_ID, DEMO_CLIENT_SECRET))


class _WatchingStore(MemoryTokenStore):
    """Records, at each save, how many API calls the sandbox had answered."""

    def __init__(self, sandbox: XeroSandbox) -> None:
        super().__init__()
        self.sandbox = sandbox
        self.api_calls_at_save: list[int] = []

    def save(self, connection: str, token: dict[str, Any]) -> None:
        self.api_calls_at_save.append(sum(1 for e in self.sandbox.request_log if e["path"] == "/connections"))
        super().save(connection, token)


def test_rotated_refresh_token_is_saved_before_the_new_access_token_is_used(
    sandbox: XeroSandbox, clock: ManualClock
) -> None:
    """The first call stores the rotated token set before any API call, and the old refresh token is dead."""
    initial = sandbox.issue_tokens()["refresh_token"]
    store = _WatchingStore(sandbox)
    stats = ApiStats()
    auth = _auth(sandbox, store, initial, clock, stats=stats)
    with _client(sandbox, auth) as client:
        assert client.get("/connections").status_code == 200
    saved = store.load(CONN)
    assert saved is not None
    assert saved["refresh_token"] != initial
    assert saved["expires_at"] == pytest.approx(clock.now() + 1800)
    assert store.api_calls_at_save == [0]
    assert stats.by_endpoint == {"POST /connect/token": 1}
    assert _refresh_raw(sandbox, initial).json() == {"error": "invalid_grant"}
    assert _refresh_raw(sandbox, saved["refresh_token"]).status_code == 200


def test_sandbox_refuses_a_reused_refresh_token_unless_inside_the_grace_period(clock: ManualClock) -> None:
    """A used refresh token gets invalid_grant; with refresh_grace_s it works again until the grace ends."""
    strict = XeroSandbox(clock=clock, items=ITEMS)
    token = strict.issue_tokens()["refresh_token"]
    assert _refresh_raw(strict, token).status_code == 200
    second = _refresh_raw(strict, token)
    assert second.status_code == 400
    assert second.json() == {"error": "invalid_grant"}
    assert strict.refresh_calls == 2
    assert strict.refresh_rejected == 1

    lenient = XeroSandbox(clock=clock, items=ITEMS, refresh_grace_s=1800)
    token = lenient.issue_tokens()["refresh_token"]
    assert _refresh_raw(lenient, token).status_code == 200
    clock.advance(1700)
    assert _refresh_raw(lenient, token).status_code == 200
    clock.advance(200)
    assert _refresh_raw(lenient, token).json() == {"error": "invalid_grant"}


def test_invalid_grant_rereads_the_store_when_another_process_rotated_the_token(
    sandbox: XeroSandbox, clock: ManualClock
) -> None:
    """A refresh lost to a sibling process adopts the sibling's stored token set instead of failing."""
    shared = MemoryTokenStore()
    first = _auth(sandbox, shared, sandbox.issue_tokens()["refresh_token"], clock)
    with _client(sandbox, first) as client:
        assert client.get("/connections").status_code == 200
    clock.advance(1700)  # inside the refresh margin: the next call must refresh

    class RacingStore(MemoryTokenStore):
        """Our view of the shared store: the sibling rotates the token right after we read it."""

        raced = False

        def load(self, connection: str) -> dict[str, Any] | None:
            snapshot = shared.load(connection)
            if not self.raced:
                self.raced = True
                sibling = _auth(sandbox, shared, None, clock)
                sibling.token()
            return snapshot

        def save(self, connection: str, token: dict[str, Any]) -> None:
            shared.save(connection, token)

    loser = _auth(sandbox, RacingStore(), None, clock)
    calls_before = sandbox.refresh_calls
    with _client(sandbox, loser) as client:
        assert client.get("/connections").status_code == 200
    # Our refresh with the stale token was refused, the sibling's fresh token set was adopted.
    assert sandbox.refresh_calls - calls_before == 2
    assert sandbox.refresh_rejected == 1
    assert loser.token().access_token == shared.load(CONN)["access_token"]  # type: ignore[index]


def test_token_is_refreshed_before_it_expires(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """Within the margin the token is refreshed first, so the API never answers 401."""
    statuses: list[int] = []
    auth = _auth(sandbox, MemoryTokenStore(), sandbox.issue_tokens()["refresh_token"], clock, margin_s=300)
    with _client(sandbox, auth, statuses) as client:
        client.get("/connections")
        clock.advance(1400)  # 400 s left: still fresh
        client.get("/connections")
        assert sandbox.refresh_calls == 1
        clock.advance(150)  # 250 s left: inside the margin
        client.get("/connections")
        assert sandbox.refresh_calls == 2
        clock.advance(2000)  # long expired
        client.get("/connections")
    assert sandbox.refresh_calls == 3
    assert statuses == [200, 200, 200, 200]


def test_a_401_refreshes_once_and_resends(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """An access token the server no longer accepts triggers one refresh and one re-send."""
    statuses: list[int] = []
    auth = _auth(sandbox, MemoryTokenStore(), sandbox.issue_tokens()["refresh_token"], clock)
    with _client(sandbox, auth, statuses) as client:
        client.get("/connections")
        sandbox.expire_access_tokens()
        resp = client.get("/connections")
    assert resp.status_code == 200
    assert statuses == [200, 401, 200]
    assert sandbox.refresh_calls == 2


def test_revoked_connection_raises_auth_error_without_looping(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """A revoked refresh token fails once with AuthError naming re-authorisation; no secret in the message."""
    initial = sandbox.issue_tokens()["refresh_token"]
    store = MemoryTokenStore()
    auth = _auth(sandbox, store, initial, clock)
    with _client(sandbox, auth) as client:
        client.get("/connections")
        access = store.load(CONN)["access_token"]  # type: ignore[index]
        rotated = store.load(CONN)["refresh_token"]  # type: ignore[index]
        sandbox.revoke_refresh_tokens()
        clock.advance(3600)
        with capture_logs() as logs, pytest.raises(ReauthorizationRequired) as err:
            client.get("/connections")
    assert "re-authorise" in str(err.value)
    assert sandbox.refresh_calls == 2  # the first refresh, then exactly one refused attempt
    text = str(err.value) + repr(err.value) + repr(logs)
    for secret in (initial, rotated, access, DEMO_CLIENT_SECRET):
        assert secret not in text


def test_eight_threads_needing_a_refresh_share_one_refresh_call(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """Eight threads over two instances (one shared store and lock) hitting an expired token refresh once."""
    store = MemoryTokenStore()
    initial = sandbox.issue_tokens()["refresh_token"]
    cross_process = threading.Lock()
    auths = [_auth(sandbox, store, initial, clock, lock_factory=lambda _c: cross_process) for _ in range(2)]
    clients = [_client(sandbox, a) for a in auths]
    barrier = threading.Barrier(8)
    results: list[int] = []

    def worker(i: int) -> None:
        barrier.wait()
        results.append(clients[i % 2].get("/connections").status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    for c in clients:
        c.close()
    assert results == [200] * 8
    assert sandbox.refresh_calls == 1
    assert store.saves == 1


def test_missing_refresh_token_is_an_auth_error(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """With nothing stored and nothing configured the connection must be authorised first."""
    auth = _auth(sandbox, MemoryTokenStore(), None, clock)
    with pytest.raises(ReauthorizationRequired, match="authorise the connection"):
        auth.token()
    assert sandbox.refresh_calls == 0


def test_wrong_client_secret_is_an_auth_error_without_the_secret(sandbox: XeroSandbox, clock: ManualClock) -> None:
    """invalid_client maps to AuthError and the message carries neither secret nor token."""
    initial = sandbox.issue_tokens()["refresh_token"]
    auth = RotatingOAuth2(vendor="xero", token_url=TOKEN_URL, client_id=DEMO_CLIENT_ID,
                          client_secret="canary-wrong-secret-93f1", connection=CONN, store=MemoryTokenStore(),
                          initial_refresh_token=initial, now=clock.now, transport=sandbox.transport())
    with pytest.raises(AuthError) as err:
        auth.token()
    assert err.value.code == "invalid_client"
    # A wrong client secret is the operator's configuration, not a connection someone must authorise again.
    assert not isinstance(err.value, ReauthorizationRequired)
    assert "canary-wrong-secret-93f1" not in str(err.value)
    assert initial not in str(err.value)
    assert "canary-wrong-secret-93f1" not in repr(auth)

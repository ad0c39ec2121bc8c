"""RateBudget follows the vendor's own count of a window when another instance has used it, and the
connectors of one process that reach the same vendor account share one budget."""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref
from typing import Any, Literal

import pytest

from connectors import http
from connectors.errors import RateLimitedError
from connectors.http import RateBudget, shared_budget
from connectors.hubspot.adapter import HubSpotSource
from connectors.pennylane.client import PennylaneClient
from connectors.pipedrive.client import PipedriveClient
from connectors.quickbooks.client import QuickBooksClient
from connectors.registry import connector_class
from connectors.salesforce.client import SalesforceClient
from connectors.sandboxkit import Clock, serve
from connectors.xero.client import XeroClient
from connectors.xero.sandbox import XeroSandbox
from connectors.xero.settings import XeroSettings
from connectors.xero.testing import MemoryTokenStore
from sync.observability import rate_budgets
from sync.sandboxes import CRM_SANDBOXES, crm_sandbox_settings, ledger_sandbox_settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_fresh_budget_takes_the_vendors_remaining_count_and_frees_it_over_the_window() -> None:
    clock = FakeClock()
    budget = RateBudget([(10, 10.0)], sleep=clock.sleep, monotonic=clock.monotonic, slack=0.0)
    assert budget.remaining() == 10
    budget.observe(3)  # the vendor counts 7 calls made elsewhere in its window, when is unknown
    assert budget.remaining() == 3
    for _ in range(3):
        budget.acquire()
    assert clock.slept == []
    # The 7 unknown calls are taken as spread over the last 10 s (one every 1.25 s): the fourth call waits
    # for the oldest to leave the window, not for a whole window.
    budget.acquire()
    assert sum(clock.slept) == pytest.approx(1.25, abs=0.01)
    clock.now += 4.0
    assert budget.remaining() == 3  # 4 of the unknown calls have left the window; 3 of them and our 4 remain
    clock.now += 10.0
    assert budget.remaining() == 10


def test_observing_more_room_than_the_local_count_changes_nothing() -> None:
    clock = FakeClock()
    budget = RateBudget([(10, 10.0)], sleep=clock.sleep, monotonic=clock.monotonic, slack=0.0)
    for _ in range(6):
        budget.acquire()
    budget.observe(9)  # the vendor has seen fewer (some still in flight): the local count stands
    assert budget.remaining() == 4
    budget.observe(-5)  # nonsense from a header never frees more than the window
    assert budget.remaining() == 0


# --------------------------------------------------------------------------------------------------
# One budget per vendor account in a process (connectors.http.shared_budget)
# --------------------------------------------------------------------------------------------------


_ports = itertools.count(20_000)


def fresh_url() -> str:
    """An address no other test uses: budgets of an earlier test's clients (not yet collected) stay apart."""
    return f"http://127.0.0.1:{next(_ports)}"


@pytest.fixture
def url() -> str:
    return fresh_url()


def block(vendor: str, url: str, **overrides: Any) -> dict[str, Any]:
    """A connector block pointing at ``url`` (no call is made unless a test makes one)."""
    made = crm_sandbox_settings(vendor, url) if vendor in CRM_SANDBOXES else ledger_sandbox_settings(vendor, url)
    return {**made, **overrides}


def build(vendor: str, fields: dict[str, Any], **kw: Any) -> Any:
    """The object that owns the vendor's rate budget: its API client (the HubSpot source for HubSpot)."""
    kind: Literal["crm", "ledger"] = "crm" if vendor in CRM_SANDBOXES else "ledger"
    settings: Any = connector_class(kind, vendor).Settings.model_validate(fields)
    if vendor == "hubspot":
        return HubSpotSource(settings, **kw)
    client: dict[str, Any] = {"xero": XeroClient, "quickbooks": QuickBooksClient, "pennylane": PennylaneClient,
                              "pipedrive": PipedriveClient, "salesforce": SalesforceClient}
    return client[vendor](settings, MemoryTokenStore(), **kw)


#: Per vendor, a change of the account identity that must give a budget of its own.
OTHER_ACCOUNT: dict[str, dict[str, Any]] = {
    "xero": {"tenant_id": "another-tenant"},
    "quickbooks": {"realm_id": "4620816365999999999"},
    "pennylane": {"api_token": "another-company-token"},
    "pipedrive": {"api_token": "another-company-token"},
    "salesforce": {"client_id": "another-connected-app"},
    "hubspot": {"access_token": "another-portal-token"},
}


@pytest.mark.parametrize("vendor", sorted(OTHER_ACCOUNT))
def test_clients_of_one_account_share_one_budget_and_other_accounts_do_not(vendor: str, url: str) -> None:
    first, second = build(vendor, block(vendor, url)), build(vendor, block(vendor, url))
    other_account = build(vendor, block(vendor, url, **OTHER_ACCOUNT[vendor]))
    other_address = build(vendor, block(vendor, fresh_url()))
    other_limits = build(vendor, block(vendor, url, time_scale=2.0))
    try:
        # The very same objects, as the daemon's metrics find them (HubSpot: the general and the search budget).
        assert len(rate_budgets(first)) == (2 if vendor == "hubspot" else 1)
        assert all(a is b for a, b in zip(rate_budgets(first), rate_budgets(second), strict=True))
        for other in (other_account, other_address, other_limits):
            assert not set(map(id, rate_budgets(first))) & set(map(id, rate_budgets(other)))
    finally:
        for owner in (first, second, other_account, other_address, other_limits):
            owner.close()


def test_no_credential_appears_in_a_budget_key(url: str) -> None:
    secrets_in_play = ["hubspot-portal-token-canary", "pipedrive-token-canary", "pennylane-token-canary"]
    owners = [build("hubspot", block("hubspot", url, access_token=secrets_in_play[0])),
              build("pipedrive", block("pipedrive", url, api_token=secrets_in_play[1])),
              build("pennylane", block("pennylane", url, api_token=secrets_in_play[2]))]
    try:
        keys = repr(list(http._shared.keys()))
        assert "sha256:" in keys
        assert not [s for s in secrets_in_play if s in keys]
    finally:
        for owner in owners:
            owner.close()


def test_two_xero_clients_of_one_tenant_draw_on_one_window(url: str) -> None:
    """Calls through either client count in the tenant's one minute window (60 s: nothing frees in the test)."""
    fields = block("xero", url, calls_per_minute=5)
    first, second = build("xero", fields), build("xero", fields)
    try:
        assert first.budget is second.budget
        for _ in range(3):
            first.budget.acquire()
            first.budget.release()
        assert second.budget.remaining() == 2
        for _ in range(2):
            second.budget.acquire()
            second.budget.release()
        assert first.budget.remaining() == 0
        first.budget.observe(0, 1)  # Xero's day count, taken through either client, is the shared one too
        assert second.budget.remaining() == 0
        second.budget.pause(30)  # a 429 answered to one client holds back the other
        assert first.budget.remaining() == 0
    finally:
        first.close()
        second.close()


def test_the_concurrency_cap_of_a_quickbooks_realm_is_shared(url: str) -> None:
    """With 2 calls in flight through one client, a third through another client waits for one to end."""
    fields = block("quickbooks", url, concurrency=2)
    first, second = build("quickbooks", fields), build("quickbooks", fields)
    started = threading.Event()
    try:
        first.budget.acquire()
        first.budget.acquire()

        def third() -> None:
            second.budget.acquire()
            started.set()
            second.budget.release()

        waiter = threading.Thread(target=third, daemon=True)
        waiter.start()
        assert not started.wait(0.3)
        first.budget.release()
        assert started.wait(5.0)
        waiter.join(5.0)
        first.budget.release()
    finally:
        first.close()
        second.close()


def test_a_budget_outlives_its_clients_while_its_windows_count_calls_then_is_dropped(url: str) -> None:
    """A run's connectors go, the next run's come: the calls of the first still count for the second until
    the windows have passed; then the budget is dropped and a new client starts afresh."""
    fields = block("xero", url, calls_per_minute=5, time_scale=86_400)  # windows: minute 0.7 ms, day 1 s
    first, second = build("xero", fields), build("xero", fields)
    budget = weakref.ref(first.budget)
    for _ in range(5):
        first.budget.acquire()
        first.budget.release()
    first.close()
    del first
    gc.collect()
    assert budget() is second.budget  # still held by the second client
    second.close()
    del second
    gc.collect()
    later = build("xero", fields)  # no client is left, but the day window still counts the five calls
    try:
        assert later.budget is budget()
        assert later.budget.holds_calls()
    finally:
        later.close()
        del later
    gc.collect()
    time.sleep(1.2)  # every window has passed
    fresh = build("xero", fields)
    try:
        gc.collect()
        assert budget() is None  # dropped once its windows were empty and nothing referred to it
        assert fresh.budget.remaining() == 5
        assert not fresh.budget.holds_calls()
    finally:
        fresh.close()


def test_budgets_on_a_fake_clock_are_never_shared(url: str) -> None:
    clock = FakeClock()
    fields = block("xero", url)
    real = build("xero", fields)
    fakes = [build("xero", fields, sleep=clock.sleep, monotonic=clock.monotonic) for _ in range(2)]
    # A real sleep passed in is not the default: the budget stays the client's own as well.
    wrapped = build("xero", fields, sleep=lambda s: time.sleep(s))
    try:
        budgets = [real.budget, *(f.budget for f in fakes), wrapped.budget]
        assert len(set(map(id, budgets))) == 4
        assert build("xero", fields).budget is real.budget
        made = [shared_budget(("test", "account"), lambda: RateBudget([(1, 1.0)], monotonic=clock.monotonic))
                for _ in range(2)]
        assert made[0] is not made[1]
    finally:
        for owner in (real, *fakes, wrapped):
            owner.close()


def _hammer(clients: list[XeroClient], calls: int) -> tuple[list[int], float]:
    """``calls`` GET /Currencies through each client, one thread per client; 429s met per client, seconds."""
    met = [0] * len(clients)

    def run(i: int) -> None:
        for _ in range(calls):
            try:
                clients[i].request("GET", "/Currencies")
            except RateLimitedError:
                met[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    return met, time.monotonic() - t0


def test_two_xero_clients_on_one_tenant_from_two_threads_meet_no_429() -> None:
    """Against the Xero sandbox (12 calls a minute, 5 in flight, a minute lasting 0.5 s), two clients of one
    tenant in two threads share the budget and meet no 429; two that pace alone (the old behaviour) do."""
    per_minute, scale, calls = 12, 120.0, 12
    sandbox = XeroSandbox(clock=Clock(scale=scale), calls_per_minute=per_minute)
    server = serve(sandbox)
    try:
        tokens = MemoryTokenStore()
        fields = {**block("xero", server.url, time_scale=scale, calls_per_minute=per_minute),
                  "refresh_token": sandbox.issue_tokens()["refresh_token"]}
        settings = XeroSettings.model_validate(fields)
        # max_attempts=1: a 429 is counted, not retried, so the two runs are compared call for call.
        shared = [XeroClient(settings, tokens, max_attempts=1) for _ in range(2)]
        met, took = _hammer(shared, calls)
        assert shared[0].budget is shared[1].budget
        assert met == [0, 0]
        assert sandbox.rate_limited == {}
        # 24 calls at 12 per 0.5 s window: the second dozen waited for the first to leave the window.
        assert took >= 0.5
        for c in shared:
            c.close()

        alone = [XeroClient(settings, tokens, max_attempts=1, sleep=lambda s: time.sleep(s)) for _ in range(2)]
        time.sleep(2 * 60.0 / scale)  # let the sandbox's minute window empty
        met, _ = _hammer(alone, calls)
        assert alone[0].budget is not alone[1].budget
        assert sum(met) > 0
        assert sum(sandbox.rate_limited.values()) == sum(met)
        for c in alone:
            c.close()
    finally:
        server.stop()


def test_forgetting_idle_budgets_keeps_the_ones_in_use(url: str) -> None:
    fields = block("xero", url, calls_per_minute=5)
    held = build("xero", fields)
    gone = build("xero", block("xero", url, calls_per_minute=4))
    try:
        gone_budget = weakref.ref(gone.budget)
        gone.budget.acquire()
        gone.budget.release()
        gone.close()
        del gone
        gc.collect()
        assert gone_budget() is not None  # its window still counts a call
        http.forget_idle_budgets()
        gc.collect()
        assert gone_budget() is None
        again = build("xero", fields)
        assert again.budget is held.budget  # in use: kept
        again.close()
    finally:
        held.close()
